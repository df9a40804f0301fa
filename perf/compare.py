"""The static performance model against a GPU run: predicted and measured side by side.

    laser-triton bench compare --measured perf/results/<gpu>_<date>/kernels.csv [--out X.csv]

Runs on a CPU after a GPU run's `kernels.csv` (perf/bench_kernels.py, run by
perf/gpu_check.sh) comes back: it costs no device time. For every `triton` row with valid
timing, the model of perf/audit.py (compress_pass, reconstruct) or perf/audit_orth.py
(orthonormalize, single and batched) is evaluated at exactly that shape (N, D, r, activation
dtype, C dtype), with the configs the config store resolves for an H200 (shipped files, then
the built-in defaults), every launch compiled for sm_90 at that shape's specialization (the
Triton cache is used: a second run costs seconds). reconstruct is modelled without the basis
split: the bench times many calls with one basis, whose bf16 halves its first, untimed call
split and `kernels._basis` keeps; orthonormalize with the copy that packs the bench's bases
(column-major, so `orthonormalize_batched` concatenates them: one more launch). Run it on the tree the GPU run measured:
the configs and kernels compared must be the ones that were timed.

Writes (default: next to the measured CSV)
- `model_compare.csv`: one row per measured shape: the measured time (`graph`, CUDA-graph
  device time, what the model predicts; `eager` beside it), the predicted time, measured /
  predicted, the op's binding bound (the bound of the launch that takes longest, or `launch
  gap` when the gaps between launches outweigh every launch), each launch's predicted time
  and bound, the predicted and measured fractions of the model's roofline (and the bench's
  own `frac_of_roofline`, against the copy and matmul rates it measured);
- `model_compare_summary.csv`: per binding bound, the median (min, max) of measured /
  predicted over the shapes with graph timing, and the model assumption that bound rests on.
  A median far from 1 for one bound says which assumption to correct (the L2 bandwidth, the
  loaded HBM latency, the issue rate or orthonormalize's cycles per instruction, the launch
  gap).
Rows measured in eager mode only (the graph capture failed) are kept with their eager ratio
and left out of the summary (eager time includes host launch overhead). Rows with an error,
invalid timing (a CPU dry run: `valid_timing` False) or another provider are skipped; when
nothing remains the command says why and writes nothing (exit status 1).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import pandas as pd

from . import audit

DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32",
         "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
LINEAR_OPS = ("compress_pass", "reconstruct")
_ORTH = re.compile(r"^orthonormalize(?:_x(\d+))?$")
COLUMNS = ["op", "layout", "N", "D", "r", "dtype", "coeff", "gpu", "measured_graph_us",
           "measured_eager_us", "predicted_us", "measured_over_predicted",
           "eager_over_predicted", "bound", "dominant_kernel", "dominant_bounds_us", "kernels",
           "launch_gaps_us", "roofline_us", "predicted_fraction", "measured_fraction",
           "bench_frac_of_roofline", "note"]
SUMMARY_COLUMNS = ["bound", "assumption", "shapes", "median_ratio", "min_ratio", "max_ratio",
                   "ops"]


def assumptions() -> dict[str, str]:
    """What each binding bound rests on (the constants of perf/audit.py and audit_orth.py)."""
    orth = audit._orth_module()
    return {
        "memory": f"HBM {audit.BW / 1e12:g} TB/s (the measured copy rate)",
        "L2": f"L2 -> SM {audit.L2_BW / 1e12:g} TB/s (ASSUMED)",
        "latency": f"loaded HBM latency {audit.HBM_LATENCY_S * 1e6:g} us and the bytes in "
                   "flight per pipeline stage (ASSUMED)",
        "tensor": f"HGMMA {audit.MMA_RATE['HGMMA'] / 1e12:g} TFLOP/s and the wgmma shapes' "
                  "shared-memory clocks",
        "issue": "4 warp instructions per clock per SM at 1.98 GHz x the SASS loop bodies",
        "one program": f"{orth.CPI:g} cycles per instruction of one warp (orthonormalize's "
                       "factor, ASSUMED)",
        "fp64 tensor": f"DMMA {orth.FP64_MMA / 1e12:g} TFLOP/s",
        "launch gap": f"{audit.LAUNCH_S * 1e6:g} us per extra launch (ASSUMED)",
    }


def _truthy(col: pd.Series) -> pd.Series:
    return col.astype(str).str.strip().str.lower().isin(("true", "1", "1.0"))


def measured_points(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per measured Triton shape (kernel, N, D, r, dtype, coeff) with its graph and
    eager medians (ms), and the count of rows skipped per reason."""
    skipped: dict[str, int] = {}

    def drop(mask: pd.Series, why: str) -> pd.DataFrame:
        if mask.any():
            skipped[why] = skipped.get(why, 0) + int(mask.sum())
        return df[~mask]

    df = drop(df.provider.astype(str) != "triton", "other providers (torch, reference)")
    err = df["error"].notna() if "error" in df else pd.Series(False, index=df.index)
    df = drop(err | df.ms_median.isna(), "errors or no time")
    valid = _truthy(df.valid_timing) if "valid_timing" in df else pd.Series(False, index=df.index)
    df = drop(~valid, "valid_timing False (a CPU dry run times nothing)")
    df = drop(~df["mode"].isin(("graph", "eager")), "modes other than graph and eager")
    known = df.kernel.isin(LINEAR_OPS) | df.kernel.astype(str).str.match(_ORTH.pattern)
    df = drop(~known, "kernels the model does not cover")
    if df.empty:
        return pd.DataFrame(), skipped
    orth = ~df.kernel.isin(LINEAR_OPS)
    # orthonormalize: the bench passes fp32 bases whatever its --dtype, and there is no C
    df = df.assign(dtype=df["dtype"].astype(str).map(lambda d: DTYPE.get(d, d)).mask(orth, "fp32"))
    # The bench stores C in X's dtype; a `coeff_dtype` column (newer CSVs) says so per row.
    coeff = df.coeff_dtype if "coeff_dtype" in df else pd.Series(float("nan"), index=df.index)
    df = df.assign(coeff=[("" if o else DTYPE.get(str(c), d) if isinstance(c, str) else d)
                          for c, d, o in zip(coeff, df["dtype"], orth)])
    keys = ["kernel", "N", "D", "r", "dtype", "coeff"]
    points = []
    for key, g in df.groupby(keys, sort=False):
        by_mode = {m: g[g["mode"] == m] for m in ("graph", "eager")}
        graph = by_mode["graph"]
        points.append({**dict(zip(keys, key)), "layout": g.layout.iloc[0] if "layout" in g else "",
                       "gpu": str(g.gpu.iloc[0]) if "gpu" in g else "",
                       "graph_ms": graph.ms_median.median() if len(graph) else math.nan,
                       "eager_ms": (by_mode["eager"].ms_median.median() if len(by_mode["eager"])
                                    else math.nan),
                       "bench_frac": (graph.frac_of_roofline.median()
                                      if len(graph) and "frac_of_roofline" in g else math.nan)})
    return pd.DataFrame(points), skipped


def _orth_parts(kernels: str) -> list[dict]:
    """[{kernel, t, bound}] from audit_orth's 'name(flags):12.3us/bound + ...' string."""
    parts = []
    for item in kernels.split(" + "):
        name, rest = item.rsplit(":", 1)
        t_us, bound = rest.split("us/", 1)
        parts.append({"kernel": name, "t": float(t_us) * 1e-6, "bound": bound})
    return parts


def predict_point(store, p: dict) -> dict:
    """The model at one measured shape: {predicted_s, roofline_s, parts, launch_gaps}."""
    N, D, r = int(p["N"]), int(p["D"]), int(p["r"])
    if p["kernel"] in LINEAR_OPS:
        # The bench times many calls with one basis: its bf16 halves are split by the first
        # (untimed) call and cached, so a timed reconstruct launches no split.
        m = audit.model_op(store, p["kernel"], N, D, r, p["dtype"], p["coeff"], verbose=False,
                           basis_split=True)
        return {"predicted_s": m["t"], "roofline_s": m["roofline"], "parts": m["parts"],
                "launch_gaps": m["launch_gaps"]}
    from laser_triton.kernels._audit import audit as audit_kernel  # noqa: PLC0415
    from laser_triton.kernels._audit import check

    sites = int(_ORTH.match(p["kernel"])[1] or 1)  # bench: N holds the batch of sites
    _, row, _ = audit._orth_module().audit_call(store, D, r, sites, "", audit_kernel, check)
    parts = _orth_parts(row["kernels"])
    # The bench's bases (torch.linalg.qr's column-major Q, scaled) are not one contiguous
    # fp32 buffer, so orthonormalize_batched packs them with torch.cat first: one copy
    # launch (read and write S D r fp32) that the audit, which models the kernels, omits.
    pack = 2 * sites * D * r * 4 / audit.BW
    parts = [{"kernel": "pack(torch.cat)", "t": pack, "bound": "memory"}] + parts
    return {"predicted_s": row["predicted_us"] * 1e-6 + pack + audit.LAUNCH_S,
            "roofline_s": math.nan, "parts": parts,
            "launch_gaps": audit.LAUNCH_S * (len(parts) - 1)}


def _ratio(a: float, b: float) -> float:
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def compare_row(p: dict, m: dict) -> dict:
    """One output row from a measured point and its prediction."""
    graph_us, eager_us = p["graph_ms"] * 1e3, p["eager_ms"] * 1e3
    pred_us = m["predicted_s"] * 1e6
    top = max(m["parts"], key=lambda q: q["t"])
    gaps_us = m["launch_gaps"] * 1e6
    bound = "launch gap" if m["launch_gaps"] > top["t"] else top["bound"]
    bounds = ", ".join(f"{name} {top[k] * 1e6:.1f}" for k, name in (
        ("t_mem", "memory"), ("t_l2", "L2"), ("t_mma", "tensor"), ("t_issue", "issue"),
        ("t_lat", "latency")) if k in top)
    roof_us = m["roofline_s"] * 1e6
    note = "" if not math.isnan(graph_us) else "eager only (no graph timing): not in the summary"
    if p["gpu"] and "H200" not in p["gpu"]:
        note = "; ".join(filter(None, [note, f"measured on {p['gpu']}, modelled for an H200"]))
    return {"op": p["kernel"], "layout": p["layout"], "N": int(p["N"]), "D": int(p["D"]),
            "r": int(p["r"]), "dtype": p["dtype"], "coeff": p["coeff"], "gpu": p["gpu"],
            "measured_graph_us": graph_us, "measured_eager_us": eager_us,
            "predicted_us": pred_us, "measured_over_predicted": _ratio(graph_us, pred_us),
            "eager_over_predicted": _ratio(eager_us, pred_us), "bound": bound,
            "dominant_kernel": top["kernel"], "dominant_bounds_us": bounds,
            "kernels": " + ".join(f"{q['kernel']}:{q['t'] * 1e6:.1f}us/{q['bound']}"
                                  for q in m["parts"]),
            "launch_gaps_us": gaps_us, "roofline_us": roof_us,
            "predicted_fraction": _ratio(roof_us, pred_us),
            "measured_fraction": _ratio(roof_us, graph_us),
            "bench_frac_of_roofline": p["bench_frac"], "note": note}


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per binding bound (and all together): shapes with graph timing and the median, min and
    max of measured / predicted."""
    timed = rows[rows.measured_over_predicted.notna()]
    what = assumptions()
    out = []
    groups = list(timed.groupby("bound", sort=True)) + [("all", timed)]
    for bound, g in groups:
        if g.empty:
            continue
        ratio = g.measured_over_predicted
        ops = ", ".join(f"{op} {n}" for op, n in g["op"].value_counts().sort_index().items())
        out.append({"bound": bound, "assumption": what.get(bound, ""), "shapes": len(g),
                    "median_ratio": float(ratio.median()), "min_ratio": float(ratio.min()),
                    "max_ratio": float(ratio.max()), "ops": ops})
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def summary_path(out: Path) -> Path:
    return out.with_name(out.stem + "_summary.csv")


def compare(measured: Path, out: Path) -> int:
    """Write the comparison for `measured` to `out` (and its summary); 1 when nothing to
    compare."""
    from laser_triton.kernels.configs import ConfigStore  # noqa: PLC0415

    df = pd.read_csv(measured)
    points, skipped = measured_points(df)
    why = "; ".join(f"{n} {reason}" for reason, n in skipped.items()) or "no rows"
    if points.empty:
        print(f"compare: no Triton rows with valid timing in {measured} ({len(df)} rows: {why});"
              " nothing to compare, nothing written. Run it on the kernels.csv of a GPU run "
              "(perf/gpu_check.sh or `laser-triton bench kernels` on a GPU).", file=sys.stderr)
        return 1
    store = ConfigStore("NVIDIA H200", interpreter=False)
    rows = []
    for p in points.to_dict("records"):
        m = predict_point(store, p)
        row = compare_row(p, m)
        rows.append(row)
        print(f"compare: {row['op']:18s} N={row['N']:<7d} D={row['D']:<4d} r={row['r']:<3d} "
              f"{row['dtype']} measured {row['measured_graph_us']:8.1f} us (eager "
              f"{row['measured_eager_us']:.1f}) predicted {row['predicted_us']:8.1f} us "
              f"ratio {row['measured_over_predicted']:.2f} [{row['bound']}]", flush=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.4g")
    summary = summarize(table)
    summary.to_csv(summary_path(out), index=False, float_format="%.3g")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"compare: {len(table)} shapes ({why} skipped) -> {out} and {summary_path(out)} "
          "(measured against an ESTIMATE)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="laser-triton bench compare",
                                description=__doc__.split("\n")[0])
    p.add_argument("--measured", type=Path, required=True,
                   help="kernels.csv of a GPU run (perf/bench_kernels.py)")
    p.add_argument("--out", type=Path, default=None,
                   help="comparison CSV (default: model_compare.csv next to --measured)")
    args = p.parse_args(argv)
    if not args.measured.is_file():
        print(f"compare: {args.measured} is not a file", file=sys.stderr)
        return 2
    return compare(args.measured, args.out or args.measured.parent / "model_compare.csv")


if __name__ == "__main__":
    sys.exit(main())
