"""`laser-triton study`: a paired baseline-vs-LASER training study with a pre-declared analysis.

Design (issue 6):
- Paired: each seed trains both arms with the same seed, so the same initialization, data
  pool, data order and halting exploration; only LASER differs. The analysis works on per-seed
  differences (LASER - baseline).
- Declared first: `protocol.json` (endpoints, relative margin, alpha, power, seed limits, the
  training preset and the LASER configuration) is written before any run and must match on
  resume.
- Pilot: the first `pilot_seeds` pairs estimate the SD of the paired differences of the primary
  endpoint. From it and the margin (fraction x the pilot baseline's mean, fixed here as an
  absolute number), `stats.seeds_for_tost` fixes the number of seeds n (>= min_seeds, capped
  at max_seeds) in `decision.json`, before any main run. By default the pilot pairs are the
  first n seeds (an internal pilot: only the variance is used, which barely affects the error
  rates; Wittes & Brittain 1990); `--separate-pilot` uses fresh seeds instead.
- Analysis: paired t-test and paired TOST on the primary endpoint with the fixed margin;
  secondary endpoints with the same relative margin, as exploratory results; activation memory
  of both arms.
- Mechanics: `run_one(seed, arm, run_dir)` trains and evaluates one run (the TRM version
  checkpoints inside run_dir and resumes there); finished runs are recorded in `runs.csv`
  (rewritten atomically), so the study resumes after an interruption at the last checkpoint.
  Orchestration is independent of the model: tests drive it with a fake `run_one`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable

import pandas as pd

from ..cliutil import add_threads_argument, apply_threads
from . import stats
from .protocol import ARMS, RUN_COLUMNS, RunFn, StudyProtocol

__all__ = ["ARMS", "RUN_COLUMNS", "RunFn", "StudyProtocol", "Study", "analyze_runs", "cli_main"]


# The LASER arm's default. tau 0.2: on the tiny preset trained 200 steps, `analyze` found that
# tau 0.05 (the library default) compresses almost nothing (the rank it needs is ~70% of the
# width), 0.1 saves ~40% and 0.2 ~60%, the paper's figure. fp32 coefficients, so that on CPU
# (fp32 activations) the saving comes from the rank alone, as with bf16/bf16 on a GPU.
DEFAULT_LASER = {"tau": 0.2, "rank": 16, "max_rank": 128, "coeff_dtype": "float32"}


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def analyze_runs(runs: pd.DataFrame, protocol: StudyProtocol, decision: dict,
                 seeds: list[int]) -> dict:
    """Paired tests on the analysed seeds: the primary endpoint with the fixed absolute margin,
    secondary endpoints with the declared relative margin (exploratory)."""
    main = runs[runs.seed.isin(seeds)]
    wide = main.pivot_table(index="seed", columns="arm", values=list(
        {protocol.primary, *protocol.secondary, "activation_bytes", "raw_activation_bytes"}))
    out: dict = {"n": int(len(wide)), "seeds": [int(v) for v in wide.index], "endpoints": {}}
    for ep in (protocol.primary, *protocol.secondary):
        base, las = wide[(ep, "baseline")].tolist(), wide[(ep, "laser")].tolist()
        res = {"baseline_mean": sum(base) / len(base), "laser_mean": sum(las) / len(las),
               "primary": ep == protocol.primary}
        if len(base) >= 2:
            res["t_test"] = stats.paired_t_test(las, base).as_dict()
            if ep == protocol.primary:
                margin = decision["margin"]
            else:
                level = res["baseline_mean"]
                margin = protocol.margin_fraction * abs(level) if level else math.nan
            res["margin"] = margin
            if margin > 0:
                res["tost"] = stats.paired_tost(las, base, -margin, margin,
                                                protocol.alpha).as_dict()
        out["endpoints"][ep] = res
    out["memory"] = {}
    for key, col in (("", "activation_bytes"), ("final_", "activation_bytes_final")):
        if col not in main.columns:
            continue
        mem = main.groupby("arm")[col].mean()
        out["memory"].update({
            f"{key}baseline_bytes": float(mem["baseline"]), f"{key}laser_bytes": float(mem["laser"]),
            f"{key}saved_fraction": 1 - float(mem["laser"] / mem["baseline"])
            if mem["baseline"] else 0.0})
    return out


class Study:
    """Runs the protocol in `work` (runs.csv, protocol.json, decision.json, runs/)."""

    def __init__(self, work: str, protocol: StudyProtocol, run_one: RunFn,
                 log: Callable[[str], None] = print):
        self.work, self.protocol, self.run_one, self.log = work, protocol, run_one, log
        os.makedirs(work, exist_ok=True)
        self.runs_path = os.path.join(work, "runs.csv")

    # -- state on disk ------------------------------------------------------------------------
    def declare(self) -> None:
        path = os.path.join(self.work, "protocol.json")
        mine = self.protocol.to_dict()
        if os.path.exists(path):
            with open(path) as f:
                theirs = json.load(f)
            if theirs != mine:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise RuntimeError(f"{path} declares a different protocol (fields {diff}); "
                                   "use a new work folder to change the protocol")
        else:
            _write_json(path, mine)

    def runs(self) -> pd.DataFrame:
        if os.path.exists(self.runs_path):
            return pd.read_csv(self.runs_path)
        return pd.DataFrame(columns=RUN_COLUMNS)

    def _record(self, row: dict) -> None:
        df = pd.concat([self.runs(), pd.DataFrame([row])], ignore_index=True)
        tmp = self.runs_path + ".tmp"
        df.to_csv(tmp, index=False)
        os.replace(tmp, self.runs_path)

    def ensure(self, seed: int, arm: str, phase: str) -> dict:
        """The recorded result of (seed, arm), running it first if needed."""
        df = self.runs()
        hit = df[(df.seed == seed) & (df.arm == arm)]
        if len(hit):
            return hit.iloc[0].to_dict()
        run_dir = os.path.join(self.work, "runs", f"seed{seed}_{arm}")
        os.makedirs(run_dir, exist_ok=True)
        self.log(f"[study] {phase} run: seed {seed}, {arm}")
        res = self.run_one(seed, arm, run_dir)
        row = {c: res.get(c, math.nan) for c in RUN_COLUMNS}
        row.update(phase=phase, seed=seed, arm=arm)
        self._record(row)
        self.log(f"[study] seed {seed} {arm}: " + ", ".join(
            f"{k}={row[k]:.4g}" for k in ("loss", "cell_acc", "blank_acc", "exact_acc",
                                          "activation_bytes")))
        return row

    # -- phases -------------------------------------------------------------------------------
    def pilot_seeds(self) -> list[int]:
        p = self.protocol
        return list(range(p.first_seed, p.first_seed + p.pilot_seeds))

    def decide(self) -> dict:
        """Fix n and the absolute margin from the pilot (once; reloaded on resume)."""
        path = os.path.join(self.work, "decision.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        p = self.protocol
        df = self.runs()
        pilot = df[df.seed.isin(self.pilot_seeds())].pivot_table(
            index="seed", columns="arm", values=p.primary)
        diffs = (pilot["laser"] - pilot["baseline"]).tolist()
        level = float(pilot["baseline"].mean())
        sd = float(pd.Series(diffs).std(ddof=1))
        margin = p.margin_fraction * abs(level)
        if not margin > 0:
            raise RuntimeError(f"the pilot baseline level of {p.primary} is {level}: a relative "
                               "margin needs a non-zero level")
        needed = stats.seeds_for_tost(sd, margin, p.alpha, p.power, min_n=p.min_seeds)
        n = min(max(needed, p.min_seeds), p.max_seeds)
        decision = {"pilot_seeds": self.pilot_seeds(), "pilot_diffs": diffs,
                    "pilot_baseline_level": level, "sd_diff": sd, "margin": margin,
                    "seeds_needed": needed, "seeds": n, "capped": needed > p.max_seeds}
        _write_json(path, decision)
        self.log(f"[study] decision: {decision}")
        return decision

    def main_seeds(self, decision: dict) -> list[int]:
        p, n = self.protocol, decision["seeds"]
        start = p.first_seed + (p.pilot_seeds if p.separate_pilot else 0)
        return list(range(start, start + n))

    def run(self) -> dict:
        self.declare()
        pilot = self.pilot_seeds()
        for seed in pilot:
            for arm in ARMS:
                self.ensure(seed, arm, "pilot")
        decision = self.decide()
        main = self.main_seeds(decision)
        for seed in main:
            for arm in ARMS:
                self.ensure(seed, arm, "main")
        runs = self.runs().assign(analysed=lambda f: f.seed.isin(main))
        return {"decision": decision, "runs": runs,
                "analysis": analyze_runs(runs, self.protocol, decision, main)}


# -- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="laser-triton study", description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/study", help="checkpoints and study state")
    p.add_argument("--results", default="perf/results", help="where study.csv/.md go")
    p.add_argument("--name", default="study", help="base name of the result files")
    d = StudyProtocol()
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--train", default="{}", help="JSON TrainConfig overrides (both arms)")
    p.add_argument("--laser", default=json.dumps(DEFAULT_LASER),
                   help="JSON LaserConfig options of the LASER arm")
    p.add_argument("--primary", default=d.primary)
    p.add_argument("--margin-fraction", type=float, default=d.margin_fraction)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--power", type=float, default=d.power)
    p.add_argument("--pilot-seeds", type=int, default=d.pilot_seeds)
    p.add_argument("--min-seeds", type=int, default=d.min_seeds)
    p.add_argument("--max-seeds", type=int, default=d.max_seeds)
    p.add_argument("--first-seed", type=int, default=d.first_seed)
    p.add_argument("--separate-pilot", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--memory-every", type=int, default=d.memory_every)
    add_threads_argument(p)
    p.add_argument("--protocol", default=None,
                   help="a declared non-inferiority protocol file (perf/results/"
                        "study_ni_protocol.json): runs study_ni instead; the options above "
                        "that it declares are ignored")
    p.add_argument("--stages", nargs="+", default=["trunk", "select", "forks", "report"],
                   choices=["trunk", "select", "forks", "report"], help="with --protocol")
    p.add_argument("--smoke", default=None,
                   help="with --protocol: JSON shrinking it to a labelled smoke run, e.g. "
                        '\'{"trunk_steps": 4, "fork_steps": 2, "fork_seeds": [1, 2]}\'')
    p.add_argument("--estimate", action="store_true",
                   help="with --protocol: time a few steps per arm, print the projected cost")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from .report import write_outputs
    from .trm import trm_run_one

    args.threads = apply_threads(args.threads, "cpu", prog="laser-triton study")
    if args.protocol:
        from . import ni

        if args.estimate:
            ni.estimate(args.protocol, args.work)
            return 0
        name = args.name if args.name != "study" else "study_ni"
        paths = ni.run_protocol(args.protocol, args.work, args.results,
                                      name + ("_smoke" if args.smoke else ""), args.stages,
                                      json.loads(args.smoke) if args.smoke else None)
        print("[study_ni] wrote " + ", ".join(paths))
        return 0
    protocol = StudyProtocol(
        preset=args.preset, steps=args.steps, train=json.loads(args.train),
        laser=json.loads(args.laser), primary=args.primary,
        margin_fraction=args.margin_fraction, alpha=args.alpha, power=args.power,
        pilot_seeds=args.pilot_seeds, min_seeds=args.min_seeds, max_seeds=args.max_seeds,
        first_seed=args.first_seed, separate_pilot=args.separate_pilot,
        checkpoint_every=args.checkpoint_every, memory_every=args.memory_every)
    from .trm import pin_train_config

    pin_train_config(args.work, protocol)
    study = Study(args.work, protocol, trm_run_one(protocol))
    result = study.run()
    paths = write_outputs(args.results, args.name, protocol, result)
    print("[study] wrote " + ", ".join(paths))
    return 0
