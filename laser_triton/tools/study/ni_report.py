"""Outputs of the non-inferiority study (ni.py): the decision, the runs, the Pareto curve.

Primary: per LASER arm in the declared order, a one-sided paired non-inferiority test of the
primary endpoint against the plain arm of the same fork seed (`stats.paired_noninferiority`),
fixed sequence: an arm after the first is confirmatory only if every arm before it passed.
Secondaries are estimates with two-sided 95% intervals, exploratory.
"""

from __future__ import annotations

import json
import math
import os

import pandas as pd

from . import stats

__all__ = ["decide", "pareto_frame", "write_outputs"]

SECONDARY = ("exact_acc", "cell_acc", "loss")


def decide(p: dict, runs: pd.DataFrame) -> dict:
    """The primary tests in the declared order and the secondary estimates."""
    prim = p["primary"]
    ep, margin, alpha = prim["endpoint"], float(prim["margin"]), float(prim["alpha"])
    plain = runs[runs.arm == "plain"].set_index("seed")
    out: dict = {"endpoint": ep, "margin": margin, "alpha": alpha, "smoke": p["smoke"],
                 "arms": {}}
    chain_ok = True
    for arm in prim["order"]:
        las = runs[runs.arm == arm].set_index("seed")
        seeds = sorted(set(las.index) & set(plain.index))
        res: dict = {"seeds": [int(s) for s in seeds], "confirmatory": chain_ok}
        if len(seeds) >= 2:
            ni = stats.paired_noninferiority(las.loc[seeds, ep], plain.loc[seeds, ep], margin,
                                             alpha)
            res["primary"] = ni.as_dict()
            res["tau"] = float(las.tau.iloc[0])
            for col in SECONDARY:
                t = stats.paired_t_test(las.loc[seeds, col], plain.loc[seeds, col])
                res[col] = {"mean_diff": t.mean_diff, "ci95": [t.ci_low, t.ci_high],
                            "p_two_sided": t.p_value}
            for col in ("held_bytes", "peak_bytes"):
                res[f"{col}_saved"] = 1 - float(las.loc[seeds, col].mean()
                                                / plain.loc[seeds, col].mean())
            res["grad_cos"] = float(las.loc[seeds, "grad_cos"].mean())
            res["grad_cos_min"] = float(las.loc[seeds, "grad_cos_min"].min())
            res["grad_cos_noise"] = float(las.loc[seeds, "grad_cos_noise"].mean())
            passed = ni.non_inferior
        else:
            passed = False
        res["verdict"] = ("not run" if len(seeds) < 2 else
                          ("non-inferior" if passed else "non-inferiority NOT shown")
                          + ("" if chain_ok else " (exploratory: an earlier arm failed)"))
        out["arms"][arm] = res
        chain_ok = chain_ok and passed
    return out


def pareto_frame(p: dict, runs: pd.DataFrame, selection: dict) -> pd.DataFrame:
    """Per tau: trunk memory saving (held, peak) and gradient cosine, and held-out accuracy
    after a fork of the first seed (LASER minus plain of the same seed)."""
    seed = int(p["fork"]["seeds"][0])
    first = runs[runs.seed == seed]
    base = first[first.arm == "plain"]
    rows = []
    for r in selection["per_tau"]:
        hit = first[(first.arm != "plain") & ((first.tau - r["tau"]).abs() < 1e-12)]
        acc = float(hit.blank_acc.iloc[0]) if len(hit) else math.nan
        ref = float(base.blank_acc.iloc[0]) if len(base) else math.nan
        rows.append({"tau": r["tau"], "held_saved": r["held_saved"],
                     "peak_saved": r["peak_saved"], "grad_cos": r["grad_cos"],
                     "grad_cos_noise": r["grad_cos_noise"], "fork_seed": seed,
                     "blank_acc": acc, "blank_acc_vs_plain": acc - ref})
    return pd.DataFrame(rows)


def _plot(df: pd.DataFrame, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, col, label in ((axes[0], "held_saved", "held"), (axes[1], "peak_saved", "peak")):
        ax.plot(df[col], df.blank_acc_vs_plain * 100, "o-")
        for r in df.itertuples():
            ax.annotate(f"tau {r.tau:g}\ncos {r.grad_cos:.3f}",
                        (getattr(r, col), r.blank_acc_vs_plain * 100), fontsize=6)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel(f"activation memory saved, {label} (trunk)")
        ax.set_ylabel("blank-cell accuracy vs plain (points)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(p: dict, work: str, results: str, name: str) -> list[str]:
    os.makedirs(results, exist_ok=True)
    runs = pd.read_csv(os.path.join(work, "runs.csv"))
    with open(os.path.join(work, "tau60.json")) as f:
        selection = json.load(f)
    decision = {**decide(p, runs), "tau60": selection["tau60"],
                "tau60_reached_60": selection["reached_60"]}
    paths = [os.path.join(results, f"{name}{ext}") for ext in
             (".csv", "_decision.json", "_pareto.csv", "_pareto.png", ".md")]
    runs.to_csv(paths[0], index=False, float_format="%.6g")
    with open(paths[1], "w") as f:
        json.dump(decision, f, indent=1)
    pareto = pareto_frame(p, runs, selection)
    pareto.to_csv(paths[2], index=False, float_format="%.6g")
    label = "SMOKE configuration (not the declared study)" if p["smoke"] else "declared study"
    _plot(pareto, paths[3], f"tau Pareto curve, {label}")
    lines = [f"# Non-inferiority study from a trunk ({label})", ""]
    if p["smoke"]:
        lines += ["**This is a smoke run of the tooling, shrunk from the declared protocol. "
                  "Its numbers are not results of the study.**", ""]
    lines += [f"Protocol: `{p['name']}`, code commit `{p['code_commit'][:10]}`; trunk "
              f"{p['trunk']['train']['steps']} steps, forks of {p['fork']['steps']} steps over "
              f"seeds {p['fork']['seeds']}; tau60 = {selection['tau60']} "
              f"({'reaches' if selection['reached_60'] else 'does not reach'} 60% held saving "
              "on the trunk).", "",
              f"Primary: `{decision['endpoint']}`, one-sided paired non-inferiority at "
              f"{decision['margin']:+g}, alpha {decision['alpha']}, fixed sequence "
              f"{p['primary']['order']}.", ""]
    for arm, r in decision["arms"].items():
        if "primary" not in r:
            lines.append(f"- {arm}: {r['verdict']}.")
            continue
        ni = r["primary"]
        lines.append(
            f"- **{arm}** (tau {r['tau']:g}): mean difference {ni['mean_diff'] * 100:+.2f} "
            f"points, one-sided 95% lower bound {ni['lower_bound'] * 100:+.2f}, p = "
            f"{ni['p_value']:.3g}: **{r['verdict']}** (n = {ni['n']}). Held bytes "
            f"{r['held_bytes_saved']:.1%} saved, peak {r['peak_bytes_saved']:.1%}; gradient "
            f"cosine {r['grad_cos']:.4f} (min {r['grad_cos_min']:.4f}) against "
            f"{r['grad_cos_noise']:.4f} between two minibatches. Secondary: " + "; ".join(
                f"{c} {r[c]['mean_diff']:+.4f} [{r[c]['ci95'][0]:+.4f}, {r[c]['ci95'][1]:+.4f}]"
                for c in SECONDARY) + ".")
    lines += ["", "## Pareto curve (trunk memory and gradient; accuracy after one fork)", "",
              "| tau | held saved | peak saved | grad cos | noise cos | blank acc vs plain |",
              "|---|---|---|---|---|---|"]
    for r in pareto.itertuples():
        lines.append(f"| {r.tau:g} | {r.held_saved:.1%} | {r.peak_saved:.1%} | "
                     f"{r.grad_cos:.4f} | {r.grad_cos_noise:.4f} | "
                     f"{r.blank_acc_vs_plain * 100:+.2f} |")
    lines += ["", f"![Pareto]({name}_pareto.png)", ""]
    with open(paths[4], "w") as f:
        f.write("\n".join(lines))
    return paths
