"""The plots of the performance summary (perf/report.py): per results set,
`trm_memory_time.png` (peak memory against step time for every variant; bars of bytes when
there are no timings) and `kernels_roofline.png` (achieved throughput against the measured
roofline). matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["plot_kernels", "plot_trm"]


def plot_trm(trm: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = trm[trm.status == "ok"]
    groups = list(ok.groupby(["preset", "scope"], sort=False))
    if not groups:
        return
    timed = ok.step_ms.notna().any()
    # A grid of at most 3 panels per row: one row of 12 panels made a 7260x495 px strip.
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.0 * nrows + 0.6),
                             squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax, ((preset, scope), g) in zip(axes.flat, groups):
        if timed:
            for r in g.itertuples():
                ax.scatter(r.step_ms, r.peak_mem_mib, marker="^" if r.compiled else "o", s=40)
                ax.annotate(r.variant, (r.step_ms, r.peak_mem_mib), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("step time (ms)")
            ax.set_ylabel("peak memory (MiB)")
        else:
            y = range(len(g))
            ax.barh([i + 0.2 for i in y], g.peak_mem_mib, height=0.4, label="peak")
            ax.barh([i - 0.2 for i in y], g.activation_mib, height=0.4, label="held for backward")
            ax.set_yticks(list(y), list(g.variant), fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("MiB (byte accounting; no timing on CPU)")
            ax.legend(fontsize=7)
        ax.set_title(f"{preset}, {scope}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kernels(k: pd.DataFrame, path: Path, title: str, roofline_goal: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = k[k.error.isna() & k.kernel.isin(["compress_pass", "reconstruct"])] if "error" in k else k
    if k.empty:
        return
    mode = "graph" if (k["mode"] == "graph").any() else k["mode"].iloc[0]
    k = k[k["mode"] == mode]
    bw, peak = float(k.copy_gbps.iloc[0]), float(k.matmul_tflops.iloc[0])
    ai = k.flops / k.bytes
    ridge = peak * 1e3 / bw  # flop/byte where the bandwidth and matrix-rate floors meet
    xs = sorted([float(ai.min()) / 2, ridge, float(ai.max()) * 2])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax1.plot(xs, [min(peak, x * bw / 1e3) for x in xs], "k-", lw=1, label="roofline (measured)")
    markers = {"compress_pass": "o", "reconstruct": "s"}
    for (kernel, provider), g in k.groupby(["kernel", "provider"]):
        ax1.scatter(g.flops / g.bytes, g.flops / g.ms_median / 1e9, s=18,
                    marker=markers.get(kernel, "x"), label=f"{kernel} / {provider}")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("arithmetic intensity (flop / byte)")
    ax1.set_ylabel("achieved TFLOP/s")
    ax1.legend(fontsize=7)
    tri = k[(k.provider == "triton") & (k.kernel == "compress_pass")]
    for (layout, D), g in tri.groupby(["layout", "D"]):
        g = g.groupby("r").frac_of_roofline.max()
        ax2.plot(g.index, g.values, marker="o", label=f"{layout} D={D}")
    ax2.axhline(roofline_goal, color="k", ls="--", lw=1, label="goal")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("rank r")
    ax2.set_ylabel("compress_pass: fraction of roofline")
    ax2.legend(fontsize=7)
    if mode == "cpu-wall":
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "CPU dry run:\nnot performance", transform=ax.transAxes,
                    ha="center", va="center", fontsize=20, color="red", alpha=0.3, rotation=20)
    fig.suptitle(f"{title} ({mode} timing)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
