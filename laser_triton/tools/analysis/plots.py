"""Plots and the markdown report of `laser-triton analyze` (see analyze.py)."""

from __future__ import annotations

import math
import os

import pandas as pd

__all__ = ["plot_all", "write_markdown", "site_table"]

_COLORS = {"untrained": "tab:gray", "baseline": "tab:blue", "laser": "tab:red"}


def _call_label(role: str, call: int) -> str:
    return f"{role}{call + 1}" if role == "z" else role


def site_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Median ranks per model and site stem (role-free site name), over roles and steps."""
    g = steps.groupby(["model", "stem"], sort=False)
    return g.agg(width=("width", "first"), rows=("rows", "first"),
                 rank90=("rank90", "median"), rank95=("rank95", "median"),
                 rank99=("rank99", "median"), rank_tau=("rank_tau", "median"),
                 eff_rank=("eff_rank", "median"), participation=("participation", "median"),
                 drift_max_deg=("drift_max_deg", "median")).reset_index()


def plot_all(out: str, steps: pd.DataFrame, spec: pd.DataFrame, tau: float | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    paths = []
    stems = list(dict.fromkeys(steps.stem))
    models = list(dict.fromkeys(steps.model))
    spec = spec.copy().assign(stem=spec.site.str.split("/", n=1).str[1])
    ecols = [c for c in spec.columns if c.startswith("e") and c[1:].isdigit()]
    ncol = 6
    nrow = math.ceil(len(stems) / ncol)
    for kind in ("spectrum", "error"):
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol, 2.4 * nrow), squeeze=False)
        for ax, stem in zip(axes.flat, stems):
            for model in models:
                for role, style in (("z", "-"), ("y", ":")):
                    d = spec[(spec.model == model) & (spec.stem == stem)
                             & (spec.site.str.startswith(role + "/"))]
                    if d.empty:
                        continue
                    e = d[ecols].iloc[0].fillna(0.0)
                    e = e[e > 0]
                    if kind == "spectrum":
                        yv = e.to_numpy()
                    else:  # Eckart-Young error of the best rank-r approximation
                        yv = (1 - e.cumsum()).clip(lower=1e-12).to_numpy() ** 0.5
                    ax.plot(range(1, len(yv) + 1), yv, style, color=_COLORS.get(model), lw=1,
                            label=f"{model} {role}")
            if kind == "spectrum":
                ax.set_ylim(bottom=1e-8)  # fp64 rounding of exact zeros (structural rank) below
            if kind == "error":
                if tau:
                    ax.axhline(tau, color="k", lw=0.6, ls="--")
                ax.set_ylim(1e-3, 1.2)  # one scale for all sites; exact tails drop off it
            ax.set_yscale("log")
            # Log axes with minor ticks dominate the drawing time on CPU: keep major ones only.
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_title(stem, fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(stems):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=5)
        fig.suptitle("normalized sigma^2 per site (mean over steps), full width; below 1e-8 "
                     "(rounding of exact zeros) cut" if kind == "spectrum" else
                     "optimal relative error vs rank (Eckart-Young); dashed: tau", fontsize=9)
        fig.subplots_adjust(left=0.04, right=0.99, bottom=0.06, top=0.9, wspace=0.3, hspace=0.5)
        path = os.path.join(out, "spectra.png" if kind == "spectrum" else "optimal_error.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)

    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 0.3 * len(stems) + 1.5),
                             squeeze=False)
    for ax, model in zip(axes.flat, models):
        d = steps[steps.model == model].assign(
            col=lambda f: [_call_label(r, c) for r, c in zip(f.role, f.call)])
        cols = sorted(set(d.col), key=lambda c: (c == "y", int(c[1:]) if c[1:].isdigit() else 0))
        piv = d.pivot_table(index="stem", columns="col", values="rank_tau", aggfunc="median")
        piv = piv.reindex(index=stems, columns=cols)
        width = d.groupby("stem").width.first().reindex(stems)
        frac = piv.div(width, axis=0)
        im = ax.imshow(frac.values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(piv.shape[0]):
            for j in range(piv.shape[1]):
                v = piv.values[i, j]
                if v == v:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w")
        ax.set_xticks(range(len(cols)), cols, fontsize=7)
        ax.set_yticks(range(len(stems)), [f"{s} ({w})" for s, w in zip(stems, width)]
                      if model == models[0] else [], fontsize=6)
        ax.set_title(f"{model}: rank for tau (median)", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="rank / width", shrink=0.8)
    path = os.path.join(out, "rank_heatmap.png")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
    return paths


def spectrum_lines(steps: pd.DataFrame) -> list[str]:
    """Uncentred vs centred participation ratio per model: the median over matrices and the
    range of the per-site medians, computed from `steps` (so the text cannot drift from it)."""
    cols = [c for c in ("participation", "participation_centred", "mean_energy", "top_mean_cos")
            if c in steps.columns]
    if "participation_centred" not in cols:
        return []
    out = ["## Spectra: uncentred vs centred", "",
           "LASER compresses the uncentred matrix, so its ranks follow the uncentred spectrum; "
           "the centred participation ratio measures spread around the column mean. Median over "
           "all matrices, and [min, max] of the per-site medians.", "",
           "| model | participation, uncentred | participation, centred | mean's share of energy "
           "| cos(top direction, mean) |", "|---|---|---|---|---|"]
    for model, d in steps.groupby("model", sort=False):
        per_site = d.groupby("site")[cols].median()
        cells = [f"{d[c].median():.3g} [{per_site[c].min():.3g}, {per_site[c].max():.3g}]"
                 for c in cols]
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    return out + [""]


def _md_table(df: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: str, steps: pd.DataFrame, summary: pd.DataFrame, info: dict,
                   args: dict, seconds: float, roles: pd.DataFrame | None = None) -> None:
    lines = ["# Activation-manifold analysis (`laser-triton analyze`)", "",
             f"Command options: `{ {k: v for k, v in args.items() if v is not None} }`; "
             f"wall time {seconds:.0f} s.", "", "## Controls", ""]
    for name, d in info.items():
        lines.append(f"- **{name}**: {d}")
    goals = []
    for r in summary.itertuples():
        goals.append(
            f"- {r.model}, {r.mode}: ideal tracking within {r.ratio_bound}x on "
            f"{r.fixed_within_bound:.1%} of matrices "
            f"({'meets' if r.fixed_within_bound >= 0.95 else 'misses'} the 95% goal); "
            f"SiteTracker within {r.ratio_bound}x on {r.tracker_within_bound:.1%} of the matrices "
            f"it compressed; resets on {r.reset_rate:.1%} of matrices "
            f"({'meets' if r.reset_rate <= 0.05 else 'misses'} the 5% goal), "
            f"{r.reset_rate_compressing:.1%} on the {r.sites_compressing}/{r.sites} sites that "
            f"compress; raw fallbacks {r.raw_rate:.1%}; stored/raw bytes {r.stored_over_raw:.3f}.")
    table = summary.drop(columns=["ratio_bound", "warmup"]).set_index(["model", "mode"]).T
    table.columns = [f"{a} {b}" for a, b in table.columns]
    lines += ["", "## Tracking and memory per model and mode", "",
              f"tau = {summary.tau.iloc[0]}; scores after each site's first "
              f"{summary.warmup.iloc[0]} matrices.", "", *goals, "",
              "`fixed_*`: ideal fixed-rank subspace iteration (rank = what the site's first "
              "matrix needs for tau), error over the optimal error at that rank. `tracker_*`: "
              "the project's SiteTracker over the matrices it compressed, against the optimal "
              "error at the rank it used; `tracked_*` the same without reset steps. "
              "`stored_over_raw`: bytes of coefficients + bases (or raw) over raw bytes. "
              "`row_err_max`: worst per-row relative error; `pos0_row_err_max`: the same over "
              "the rows of position 0, which feeds the halting head.", "",
              _md_table(table.reset_index().rename(columns={"index": "metric"})), "",
              *spectrum_lines(steps),
              "## By role", "",
              "z sites see n matrices per training step (one per latent update), y sites one. "
              "Drift: median largest principal angle between the top-16 subspaces of a site's "
              "consecutive matrices, within one recursion (z calls 2..n) or across training "
              "steps (a new batch partly, and updated weights).", "",
              _md_table(roles) if roles is not None else "", "",
              "## Ranks per site (medians over roles and steps)", "",
              _md_table(site_table(steps)), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
