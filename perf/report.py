"""Turn the benchmark CSVs into a markdown summary and PNG plots.

    python -m perf.report                        # perf/results/*/ -> perf/results/SUMMARY.md
    python -m perf.report --results DIR --summary DIR/SUMMARY.md --no-plots

A results set is a folder holding `kernels.csv` and/or `trm.csv` (+ `trm_sites.csv`), as
perf/gpu_check.sh writes them; `--results` may also point at one such folder. A GPU set's
`model_compare.csv` (`laser-triton bench compare`, perf/compare.py) adds the static model's
predictions beside the measured times, summarized by binding bound. Each set is
described by the GPU, torch/triton versions and date its rows record. Sets measured on a CPU
(`gpu == "cpu"`) are dry runs: the summary shows their byte accounting and says plainly that
they make no timing claims; their kernel timings are left out. Plots per set:
`trm_memory_time.png` (peak memory against step time for every variant; bars of bytes when
there are no timings) and `kernels_roofline.png` (achieved throughput against the measured
roofline), drawn by report_plots.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

# Bars from the issues (perf goals) and docs/design.md §11 (an H200 attention proxy, not the presets).
GOAL_ACT_VS_COMPILED = 0.40
GOAL_TIME_VS_COMPILED = 1.15
EAGER_BARS = {"ckpt": (0.20, 1.30), "sac": (0.61, 1.18), "naive torch LASER": (0.29, 2.17)}
KERNEL_ROOFLINE_GOAL = 0.80
KERNEL_SPEEDUP_GOAL = 3.0
ALL_VARIANTS = [base + suffix for suffix in ("", "+compile")
                for base in ("plain", "ckpt", "sac", "laser_torch", "laser_triton")]


def find_sets(root: Path) -> list[Path]:
    if (root / "kernels.csv").is_file() or (root / "trm.csv").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (
        (p / "kernels.csv").is_file() or (p / "trm.csv").is_file()))


def load(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 0 else None


def describe(df: pd.DataFrame) -> dict[str, str]:
    first = df.iloc[0]
    return {k: str(first.get(k, "?")) for k in ("gpu", "torch_version", "triton_version", "date")}


def forward_dtype(df: pd.DataFrame, cpu: bool) -> str:
    """The forward dtype a set was measured with. Sets from before the `forward_dtype` column
    ran the TRM's `auto` dtype: fp32 on CPU, bf16 on CUDA."""
    if "forward_dtype" in df.columns and df.forward_dtype.notna().any():
        return ", ".join(sorted(set(df.forward_dtype.dropna().astype(str))))
    return "float32 (not recorded; the CPU default)" if cpu else "bfloat16 (not recorded)"


def dtype_note(dtype: str, cpu: bool) -> str:
    """What the forward dtype means for carrying a set's ratios over to a GPU."""
    if not cpu:
        return f"Forward dtype: {dtype}."
    if dtype == "bfloat16":
        return ("Forward dtype: bfloat16, as on a GPU (bf16 activations, fp32 RMSNorm input "
                "copies, bf16 weight copies), so these bytes predict a GPU's held bytes.")
    return (f"Forward dtype: {dtype}. On a GPU the TRM runs its forward in bf16 (bf16 "
            "activations, fp32 RMSNorm input copies, bf16 weight copies): these ratios do not "
            "carry over; `laser-triton bench trm` now accounts in bf16 by default.")


def is_cpu(meta: dict[str, str]) -> bool:
    return meta["gpu"].lower().startswith("cpu")


def fmt(v: object, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def md_table(df: pd.DataFrame, cols: list[tuple[str, str, str]]) -> list[str]:
    """cols: (column, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in df.itertuples(index=False):
        d = r._asdict()
        lines.append("| " + " | ".join(fmt(d.get(c), s) for c, _, s in cols) + " |")
    return lines


def trm_section(trm: pd.DataFrame, cpu: bool) -> list[str]:
    out = []
    cols = [("variant", "variant", ""), ("batch", "batch", "d"),
            ("peak_mem_mib", "peak MiB", ".1f"), ("activation_mib", "activation MiB", ".1f"),
            ("act_ratio_vs_plain", "act / plain", ".2f"),
            ("mem_ratio_vs_plain", "peak / plain", ".2f")]
    if not cpu:
        cols += [("step_ms", "step ms", ".1f"), ("time_ratio_vs_plain", "time / plain", ".2f"),
                 ("act_ratio_vs_compiled_plain", "act / compiled plain", ".2f"),
                 ("time_ratio_vs_compiled_plain", "time / compiled plain", ".2f")]
    cols.append(("status", "status", ""))
    for (preset, scope), g in trm.groupby(["preset", "scope"], sort=False):
        what = "full training step" if scope == "step" else "gradient-carrying cycle"
        out += ["", f"**{preset}, {what}**", ""] + md_table(g, cols)
        out += lean_line(trm, preset, scope, g)
    measured = set(trm[trm.status == "ok"].variant)
    missing = [v for v in ALL_VARIANTS if v not in measured]
    if missing:
        out += ["", "Not measured in this set: " + ", ".join(f"`{v}`" for v in missing) +
                (" (torch.compile variants and the Triton backend are run on GPUs only)."
                 if cpu else ".")]
    if measured & {"laser_torch", "laser_triton", "laser_torch+compile", "laser_triton+compile"}:
        def values(col: str) -> str:
            return ", ".join(sorted(set(trm.get(col, pd.Series(["?"])).astype(str))))
        out += ["", f"LASER: `LaserConfig` {values('laser_config')}; weights "
                f"{values('weights')}. Ranks, and so memory, differ on trained activations; on "
                "untrained weights at tau 0.05 almost all of LASER's saving comes from tensors "
                "that are low-rank by construction (the MLPs' gate/up outputs; "
                "perf/results/evidence.md, section 3)."]
    if not cpu:
        out += [""] + goal_lines(trm)
    return out


def lean_line(trm: pd.DataFrame, preset: str, scope: str, g: pd.DataFrame) -> list[str]:
    """For a '+lean' preset: activation memory against the plain run of the unmodified preset
    (same set, same scope), so both effects show: lean saves alone, and LASER on top."""
    if not preset.endswith("+lean"):
        return []
    base = trm[(trm.preset == preset.removesuffix("+lean")) & (trm.scope == scope)
               & (trm.variant == "plain") & (trm.status == "ok")]
    ok = g[g.status == "ok"]
    if base.empty or ok.empty:
        return []
    ref = float(base.activation_mib.iloc[0])
    parts = [f"{r.variant} {r.activation_mib / ref:.2f}x" for r in ok.itertuples()]
    return ["", f"`lean_saves` (RMSNorm and SwiGLU recomputed in backward): activation memory "
                f"against plain `{preset.removesuffix('+lean')}`: " + ", ".join(parts) + "."]


def goal_lines(trm: pd.DataFrame) -> list[str]:
    """The issue's goals, checked on the headline rows that exist (paper_sudoku, full step)."""
    lines = ["Goals (paper_sudoku, full training step):"]
    head = trm[(trm.preset == "paper_sudoku") & (trm.scope == "step") & (trm.status == "ok")]
    rows = {r.variant: r for r in head.itertuples()}
    laser, base = rows.get("laser_triton+compile"), rows.get("plain+compile")
    if laser is None or base is None:
        lines.append("- LASER (Triton, compiled) vs compiled plain: not measured in this set.")
    else:
        # "Peak activation memory": the step's peak above what was allocated when it began.
        peak = laser.act_peak_mib / base.act_peak_mib
        held = laser.activation_mib / base.activation_mib
        t = laser.step_ms / base.step_ms
        ok = peak <= GOAL_ACT_VS_COMPILED and t <= GOAL_TIME_VS_COMPILED
        lines.append(f"- LASER (Triton, compiled) vs compiled plain: peak activation memory "
                     f"{peak:.2f}x (goal <= {GOAL_ACT_VS_COMPILED}), held for backward "
                     f"{held:.2f}x, step time {t:.2f}x (goal <= {GOAL_TIME_VS_COMPILED}): "
                     f"**{'met' if ok else 'not met'}**.")
    lean = trm[(trm.preset == "paper_sudoku+lean") & (trm.scope == "step")
               & (trm.status == "ok") & (trm.variant == "laser_triton")]
    if base is not None and len(lean):
        r = lean.iloc[0]
        lines.append(f"- eager LASER (Triton) on `paper_sudoku+lean` vs compiled plain: peak "
                     f"activation memory {r.act_peak_mib / base.act_peak_mib:.2f}x, step time "
                     f"{r.step_ms / base.step_ms:.2f}x.")
    plain = rows.get("plain")
    eager = [v for v in ("ckpt", "sac", "laser_torch", "laser_triton") if v in rows]
    if plain is not None and eager:
        parts = [f"{v} {rows[v].step_ms / plain.step_ms:.2f}x time at "
                 f"{rows[v].act_peak_mib / plain.act_peak_mib:.2f}x peak activation" for v in eager]
        lines.append("- eager, against eager plain: " + "; ".join(parts) + ".")
    bars = "; ".join(f"{n} {t:.2f}x time at {m:.2f}x memory" for n, (m, t) in EAGER_BARS.items())
    lines.append(f"- bars to beat (docs/design.md §11, an H200 attention proxy, not these presets): {bars}.")
    return lines


def kernel_section(k: pd.DataFrame) -> list[str]:
    k = k[k.error.isna()] if "error" in k else k
    mode = "graph" if (k["mode"] == "graph").any() else "eager"
    tri = k[(k.provider == "triton") & (k["mode"] == mode)]
    out = ["", f"Triton kernels, {mode} timing (torch = the best plain composition, same mode). "
           "Cells: fraction of the measured roofline / speedup over torch, by rank r:", ""]
    lin = tri[tri.kernel.isin(["compress_pass", "reconstruct"])].copy()
    if len(lin):
        lin["cell"] = [f"{f:.2f} / {x:.1f}x" for f, x in zip(lin.frac_of_roofline,
                                                              lin.speedup_vs_torch)]
        pivot = lin.pivot_table(index=["kernel", "layout", "N", "D"], columns="r",
                                values="cell", aggfunc="first").reset_index()
        pivot.columns = [str(c) for c in pivot.columns]
        out += md_table(pivot, [(c, c if c in ("kernel", "layout", "N", "D") else f"r={c}", "")
                                for c in pivot.columns])
    cp = tri[tri.kernel == "compress_pass"]
    core = cp[cp.layout.isin(["channel", "mlp_t"]) & (cp.N >= 65536)]
    if len(core):
        met = ((core.frac_of_roofline >= KERNEL_ROOFLINE_GOAL)
               & (core.speedup_vs_torch >= KERNEL_SPEEDUP_GOAL)).mean()
        out += ["", f"compress_pass goal (>= {KERNEL_ROOFLINE_GOAL} of roofline and >= "
                f"{KERNEL_SPEEDUP_GOAL}x torch, TRM layouts, N >= 65,536): met on "
                f"{met:.0%} of {len(core)} shapes."]
    rec = tri[tri.kernel == "reconstruct"]
    if len(rec):
        out.append(f"reconstruct goal (>= {KERNEL_ROOFLINE_GOAL} of copy bandwidth): met on "
                   f"{(rec.frac_of_copy_bw >= KERNEL_ROOFLINE_GOAL).mean():.0%} of {len(rec)} "
                   "shapes.")
    orth = tri[tri.kernel.str.startswith("orthonormalize")]
    if len(orth):
        out += ["", "orthonormalize (fp32 output):", ""]
        out += md_table(orth, [("kernel", "kernel", ""), ("D", "D", "d"), ("r", "r", "d"),
                               ("ms_median", "ms", ".4f"), ("target_ms", "target ms", ".3f"),
                               ("speedup_vs_torch", "vs torch.linalg.qr", ".2f"),
                               ("rel_err", "max |QᵀQ - I|", ".1e")])
    full = tri.sort_values(["kernel", "layout", "D", "r", "N"])
    cols = [("kernel", "kernel", ""), ("layout", "layout", ""), ("N", "N", "d"), ("D", "D", "d"),
            ("r", "r", "d"), ("ms_median", "ms", ".4f"), ("gbps", "GB/s", ".0f"),
            ("frac_of_roofline", "of roofline", ".2f"), ("speedup_vs_torch", "vs torch", ".2f"),
            ("rel_err", "rel err", ".1e")]
    return out + ["", "<details><summary>every Triton row</summary>", ""] + \
        md_table(full, cols) + ["", "</details>"]


MODEL_COMPARE = "model_compare.csv"  # written by `laser-triton bench compare` (perf/compare.py)


def model_section(cmp: pd.DataFrame) -> list[str]:
    """The static model's predictions next to this set's measured times (perf/compare.py)."""
    from .compare import summarize  # noqa: PLC0415

    out = ["", "**The performance model against this run** (`model_compare.csv`, "
           "`laser-triton bench compare`): perf/audit.py's static model, an ESTIMATE, "
           "evaluated at each measured Triton shape with an H200's configs; measured = CUDA-graph "
           "device time. By the model's binding bound (the bound of the launch predicted "
           "longest), measured / predicted (> 1: slower than predicted):", ""]
    out += md_table(summarize(cmp), [
        ("bound", "bound", ""), ("assumption", "rests on", ""), ("shapes", "shapes", "d"),
        ("median_ratio", "median", ".2f"), ("min_ratio", "min", ".2f"),
        ("max_ratio", "max", ".2f"), ("ops", "ops", "")])
    eager_only = int(cmp.measured_over_predicted.isna().sum())
    if eager_only:
        out += ["", f"{eager_only} shape(s) timed in eager mode only are left out of this table."]
    cols = [("op", "op", ""), ("N", "N", "d"), ("D", "D", "d"), ("r", "r", "d"),
            ("dtype", "dtype", ""), ("measured_graph_us", "measured us", ".1f"),
            ("measured_eager_us", "eager us", ".1f"), ("predicted_us", "predicted us", ".1f"),
            ("measured_over_predicted", "measured / predicted", ".2f"), ("bound", "bound", ""),
            ("predicted_fraction", "predicted of roofline", ".2f"),
            ("measured_fraction", "measured of roofline", ".2f")]
    return out + ["", "<details><summary>every compared shape</summary>", ""] + \
        md_table(cmp.sort_values(["op", "D", "r", "N"]), cols) + ["", "</details>"]


def render(sets: list[Path], summary: Path, plots: bool) -> str:
    if plots:
        from .report_plots import plot_kernels, plot_trm
    lines = ["# Performance results", "",
             "Generated by `laser-triton bench report` (perf/report.py) from the CSVs under "
             "perf/results/; regenerate, do not edit. Every ratio compares runs measured side "
             "by side in one process."]
    gpu_sets, body = [], []
    for d in sets:
        trm, kern = load(d / "trm.csv"), load(d / "kernels.csv")
        meta = describe(trm if trm is not None else kern)
        cpu = is_cpu(meta)
        gpu_sets += [] if cpu else [d]
        rel = d.name if d.parent == summary.parent else str(d)
        head = (f"## `{rel}`: {meta['gpu']}, torch {meta['torch_version']}, triton "
                f"{meta['triton_version']}, {meta['date']}")
        body += ["", head, ""]
        if cpu:
            body.append("CPU dry run: proves the benchmarks run end to end. Memory columns are "
                        "byte accounting (storages created in the step and alive), not an "
                        "allocator; there are no timing claims. `activation MiB` is what the "
                        "step holds for backward; `peak MiB` (weights, optimizer state and "
                        "workspaces included) is what decides an out-of-memory error, and "
                        "LASER lowers it much less than the held bytes.")
        if trm is not None:
            body += ["", dtype_note(forward_dtype(trm, cpu), cpu)]
        if trm is not None:
            body += trm_section(trm, cpu)
            if plots:
                plot_trm(trm, d / "trm_memory_time.png", head.removeprefix("## "))
                body += ["", f"![TRM memory vs time]({rel}/trm_memory_time.png)"]
        if kern is not None:
            if cpu:
                body += ["", f"Kernel benchmark: {len(kern)} rows over a tiny grid (timings on "
                         "CPU are meaningless and not shown); max relative error of any provider "
                         f"{kern.rel_err.max():.1e}."]
            else:
                body += kernel_section(kern)
            cmp = load(d / MODEL_COMPARE)
            if cmp is not None and not cpu:
                body += model_section(cmp)
            if plots:
                plot_kernels(kern, d / "kernels_roofline.png", head.removeprefix("## "),
                             KERNEL_ROOFLINE_GOAL)
                body += ["", f"![kernel roofline]({rel}/kernels_roofline.png)"]
    status = ("GPU results: " + ", ".join(f"`{d.name}`" for d in gpu_sets) if gpu_sets else
              "**GPU results are pending**: no GPU run has been committed yet. The numbers below "
              "come from CPU dry runs and make no performance claims. To add GPU results: "
              "`OUT=<dir> bash perf/gpu_check.sh` on the GPU (or `laser-triton bench all`), copy "
              "its CSVs to perf/results/<gpu>_<date>/, run `laser-triton bench report`.")
    return "\n".join(lines + ["", status] + body) + "\n"


README_BEGIN, README_END = "<!-- perf-summary:begin -->", "<!-- perf-summary:end -->"


def readme_block(sets: list[Path]) -> str:
    """The README's performance paragraph, from the same CSVs as SUMMARY.md."""
    out = []
    for d in sets:
        trm = load(d / "trm.csv")
        if trm is None:
            continue
        meta = describe(trm)
        cpu = is_cpu(meta)
        ok = trm[(trm.status == "ok") & (trm.scope == "step")]
        dtype = forward_dtype(trm, cpu)
        where = (f"CPU dry run `{d.name}` (torch {meta['torch_version']}, Triton "
                 f"{meta['triton_version']}, {meta['date']}; forward dtype {dtype}; byte "
                 "accounting, no timing claims)"
                 if cpu else f"`{d.name}`: {meta['gpu']} (torch {meta['torch_version']}, Triton "
                 f"{meta['triton_version']}, {meta['date']})")
        out.append(f"- {where}, full training step, held activation memory against plain "
                   "(peak memory in parentheses):")
        for preset, g in ok.groupby("preset", sort=False):
            base = ok[(ok.preset == preset.removesuffix("+lean")) & (ok.variant == "plain")]
            if base.empty:
                continue
            ref = base.iloc[0]
            parts = []
            for r in g.itertuples():
                if r.variant == "plain" and not preset.endswith("+lean"):
                    continue
                t = "" if cpu else f", {r.step_ms / ref.step_ms:.2f}x time"
                parts.append(f"{r.variant} {r.activation_mib / ref.activation_mib:.2f}x "
                             f"(peak {r.peak_mem_mib / ref.peak_mem_mib:.2f}x{t})")
            out.append(f"  - `{preset}` (batch {int(g.batch.iloc[0])}): " + "; ".join(parts))
        if not cpu:
            out += ["  " + line for line in goal_lines(trm)]
    return "\n".join(out)


def update_readme(readme: Path, block: str) -> bool:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    here = Path(__file__).resolve().parent
    ap.add_argument("--results", type=Path, default=here / "results")
    ap.add_argument("--summary", type=Path, default=None,
                    help="markdown output (default: <results>/SUMMARY.md)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--readme", type=Path, default=None,
                    help="README whose perf-summary block to regenerate (default: the "
                         "checkout's README when --results is the default)")
    args = ap.parse_args(argv)
    sets = find_sets(args.results) if args.results.is_dir() else []
    if not sets:
        print(f"report: no kernels.csv or trm.csv under {args.results}", file=sys.stderr)
        return 1
    summary = args.summary or args.results / "SUMMARY.md"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(render(sets, summary, not args.no_plots))
    print(f"report: {len(sets)} result set(s) -> {summary}")
    readme = args.readme
    if readme is None and args.results == here / "results":
        readme = here.parent / "README.md"
    if readme is not None and readme.is_file() and update_readme(readme, readme_block(sets)):
        print(f"report: updated the performance block of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
