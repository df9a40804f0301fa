"""CSV and markdown outputs of `laser-triton study` (see runner.py)."""

from __future__ import annotations

import json
import os

from . import stats
from .protocol import RUN_COLUMNS, StudyProtocol

__all__ = ["write_outputs", "verdict"]


def verdict(ep: dict, alpha: float) -> str:
    """One sentence on an endpoint's t-test and TOST."""
    t, tost = ep.get("t_test"), ep.get("tost")
    if t is None:
        return "too few pairs to test"
    diff = f"mean difference (LASER - baseline) {t['mean_diff']:+.4g}"
    sig = (f"significant (p = {t['p_value']:.3g})" if t["p_value"] < alpha
           else f"not significant (p = {t['p_value']:.3g})")
    if tost is None:
        return f"{diff}, {sig}; no equivalence test (the baseline level is 0)"
    eq = (f"equivalent within +-{ep['margin']:.4g} (TOST p = {tost['p_value']:.3g}, "
          f"90% CI [{tost['ci_low']:+.4g}, {tost['ci_high']:+.4g}])" if tost["equivalent"] else
          f"equivalence NOT shown within +-{ep['margin']:.4g} (TOST p = {tost['p_value']:.3g}, "
          f"90% CI [{tost['ci_low']:+.4g}, {tost['ci_high']:+.4g}])")
    return f"{diff}; difference {sig}; {eq}"


def _table(df) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                     for v in r) + " |")
    return "\n".join(out)


def write_outputs(results_dir: str, name: str, protocol: StudyProtocol, result: dict) -> list[str]:
    os.makedirs(results_dir, exist_ok=True)
    runs = result["runs"].sort_values(["seed", "arm"])
    csv_path = os.path.join(results_dir, f"{name}.csv")
    cols = [c for c in RUN_COLUMNS if c in runs.columns] + ["analysed"]
    runs[cols].to_csv(csv_path, index=False, float_format="%.6g")
    a, d = result["analysis"], result["decision"]
    p = protocol
    primary = a["endpoints"][p.primary]
    mem = a["memory"]
    lines = [
        f"# Paired study: baseline vs LASER ({p.preset} preset, {p.steps} steps)", "",
        "**What this tests.** Whether LASER breaks the training of a small TRM at CPU scale: "
        "same seeds, initialization and data order in both arms, differences analysed per "
        "seed. It does not test the paper's full-scale claim (Sudoku-Extreme, hidden 512, "
        "tens of thousands of steps), which needs GPU scale.", "",
        "## Protocol (declared before the runs: protocol.json)", "",
        "```json", json.dumps(p.to_dict(), indent=1), "```", "",
        f"- Primary endpoint: held-out `{p.primary}`; secondary (exploratory): "
        f"{', '.join(p.secondary)}.",
        f"- Equivalence margin: +-{p.margin_fraction:.0%} of the baseline level, fixed as an "
        f"absolute number from the pilot; alpha {p.alpha}, power {p.power} for the seed count.",
        "", "## Pilot and sample size (decision.json)", "",
        f"- Pilot seeds {d['pilot_seeds']}: paired differences "
        f"[{', '.join(f'{v:+.4g}' for v in d['pilot_diffs'])}], "
        f"SD {d['sd_diff']:.4g}; baseline level {d['pilot_baseline_level']:.4g} -> margin "
        f"+-{d['margin']:.4g}.",
        f"- Seeds needed for {p.power:.0%} TOST power: {d['seeds_needed']}; used: {d['seeds']}"
        + (f" (capped at max_seeds = {p.max_seeds}: the study is underpowered)" if d["capped"] else "")
        + (" (the pilot seeds are the first seeds of the sample)" if not p.separate_pilot else ""),
        f"- Power of the TOST at the n used, from the pilot SD (t approximation): "
        f"{stats.tost_power(d['sd_diff'], d['margin'], d['seeds'], p.alpha):.1%}"
        + (f"; n was fixed by min_seeds = max_seeds = {p.max_seeds}, so the pilot could not "
           "change it" if p.min_seeds == p.max_seeds else "") + ".",
        "", "## Results", "",
        f"Analysed seeds: {a['seeds']} (n = {a['n']}).", "",
        f"- **Primary, {p.primary}**: baseline {primary['baseline_mean']:.4g}, LASER "
        f"{primary['laser_mean']:.4g}; {verdict(primary, p.alpha)}.",
    ]
    tost = primary.get("tost")
    if tost is not None:
        reach = max(abs(tost["ci_low"]), abs(tost["ci_high"]))
        lines.append(f"  The {1 - 2 * p.alpha:.0%} CI would pass symmetric margins down to "
                     f"+-{reach:.4g} ({primary['margin'] / reach:.1f}x tighter than declared); "
                     f"its lower end {tost['ci_low']:+.4g} is the one-sided "
                     f"{1 - p.alpha:.0%} lower bound that a non-inferiority test would use.")
    for ep in p.secondary:
        e = a["endpoints"][ep]
        lines.append(f"- {ep}: baseline {e['baseline_mean']:.4g}, LASER {e['laser_mean']:.4g}; "
                     f"{verdict(e, p.alpha)}.")
    lines += [
        f"- **Activation memory** (mean over the run's sampled steps, bytes autograd holds for "
        f"the gradient cycle): baseline {mem['baseline_bytes'] / 2**20:.2f} MiB, LASER "
        f"{mem['laser_bytes'] / 2**20:.2f} MiB: **{mem['saved_fraction']:.1%} saved**"
        + (f"; at the last training step {mem['final_saved_fraction']:.1%} saved "
           f"({mem['final_laser_bytes'] / 2**20:.2f} MiB)" if "final_saved_fraction" in mem
           else "") + ".", "",
        "## Runs", "", _table(runs[cols]), "",
        f"Total training time: {runs.train_s.sum() / 60:.1f} min "
        f"(baseline {runs[runs.arm == 'baseline'].train_s.mean():.0f} s/run, LASER "
        f"{runs[runs.arm == 'laser'].train_s.mean():.0f} s/run).", ""]
    md_path = os.path.join(results_dir, f"{name}.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    return [csv_path, md_path]
