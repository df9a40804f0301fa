"""`laser-triton study --protocol FILE`: the pre-declared non-inferiority study from a trunk.

The protocol file (perf/results/study_ni_protocol.json, issue 15) is committed before any run
and read here as it is; nothing in it can be overridden except by `--smoke`, which shrinks the
run to a quick check and labels every output as not the declared configuration.

Stages, each resumable from the work folder:
1. `trunk`: train the declared TrainConfig plainly to its step count (checkpoints every 50
   steps); trunk.pt is the start of every fork.
2. `select`: tau60 from the trunk alone (the protocol's rule), written to tau60.json before any
   fork runs, with the trunk's memory and gradient-cosine measurements per tau (the Pareto
   curve's first half).
3. `forks`: for every fork seed and arm, continue the trunk for the declared steps with the
   data stream, halting generator and torch RNG re-seeded from the fork seed; evaluate with EMA
   weights on the trunk's held-out puzzles (runs.csv, one row per run).
4. analysis (ni_report.py): one-sided paired non-inferiority per LASER arm in the
   declared order, secondaries, the Pareto table and plot.

Before anything runs, the code is checked against the declared commit (`code_check.check_code`,
which also knows the issue 18 move of the tools).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

from .code_check import check_code
from .ni_measure import measure_steps, probe_batches

__all__ = ["load_protocol", "check_code", "fork_trainer",
           "run_trunk", "select_tau60", "run_fork", "pareto_taus", "arm_laser", "run_protocol"]

STAGES = ("trunk", "select", "forks", "report")


def load_protocol(path: str, smoke: dict | None = None) -> dict:
    """The declared protocol; `smoke` overrides (trunk_steps, fork_steps, fork_seeds, taus,
    train: TrainConfig overrides of the trunk, probe/memory/peak intervals) make a quick run
    that every output labels as not the declared study."""
    with open(path) as f:
        p = json.load(f)
    for key in ("code_commit", "trunk", "fork", "tau60_rule", "primary", "pareto"):
        if key not in p:
            raise ValueError(f"{path}: the protocol has no {key!r}")
    p["smoke"] = bool(smoke)
    if smoke:
        unknown = set(smoke) - {"trunk_steps", "fork_steps", "fork_seeds", "taus", "train",
                                "probe_every", "memory_every", "peak_every"}
        if unknown:
            raise ValueError(f"--smoke: unknown fields {sorted(unknown)}")
        t = p["trunk"]["train"]
        over = dict(smoke.get("train", {}))
        t["model"] = {**t.get("model", {}), **over.pop("model", {})}
        t.update(over)
        t["steps"] = smoke.get("trunk_steps", t["steps"])
        p["fork"]["steps"] = smoke.get("fork_steps", p["fork"]["steps"])
        p["fork"]["seeds"] = smoke.get("fork_seeds", p["fork"]["seeds"])
        p["pareto"]["taus"] = smoke.get("taus", p["pareto"]["taus"])
        for key in ("probe_every", "memory_every", "peak_every"):
            p[key] = smoke.get(key, p.get(key))
    return p


def pareto_taus(p: dict) -> list[float]:
    return [float(t) for t in p["pareto"]["taus"]]


def arm_laser(p: dict, arm: str, tau60: float | None) -> dict | None:
    """LaserConfig options of an arm (None for plain); 'tau60' resolved; `pareto_<tau>` arms
    are the LASER arms' options at another tau."""
    arms = p["fork"]["arms"]
    if arm.startswith("pareto_"):
        base = dict(arms["laser_default"]["laser"])
        base["tau"] = float(arm.removeprefix("pareto_"))
        return base
    spec = arms[arm]
    if not spec.get("use_laser"):
        return None
    opts = dict(spec["laser"])
    if opts.get("tau") == "tau60":
        if tau60 is None:
            raise RuntimeError("tau60 is not selected yet (stage 'select')")
        opts["tau"] = tau60
    return opts


# -- training pieces -----------------------------------------------------------------------
def _trainer(cfg_dict: dict, data=None):
    from ..trainer import Trainer
    from ..training import TrainConfig

    return Trainer(TrainConfig(**cfg_dict), data=data)


def run_trunk(p: dict, work: str, log=print) -> str:
    """Train the trunk plainly (resuming from trunk_partial.pt); returns trunk.pt."""
    from ..trainer import Trainer

    path, partial = os.path.join(work, "trunk.pt"), os.path.join(work, "trunk_partial.pt")
    if os.path.exists(path):
        return path
    cfg = dict(p["trunk"]["train"])
    if cfg.get("use_laser"):
        raise ValueError("the trunk is trained plainly: trunk.train.use_laser must be false")
    trainer = Trainer.from_checkpoint(partial) if os.path.exists(partial) else _trainer(cfg)
    t0 = time.time()
    while trainer.step < cfg["steps"]:
        row = trainer.train_step()
        if trainer.step % 50 == 0 or trainer.step == cfg["steps"]:
            trainer.save(partial)
            log(f"[study_ni] trunk step {trainer.step}/{cfg['steps']} loss {row['loss']:.3f} "
                f"({time.time() - t0:.0f} s)")
    ev = trainer.evaluate()
    with open(os.path.join(work, "trunk_eval.json"), "w") as f:
        json.dump({**ev, "train_s": time.time() - t0}, f, indent=1)
    trainer.save(path)
    return path


def fork_trainer(trunk: str, seed: int, laser: dict | None, total_steps: int):
    """The trunk's Trainer continued as one arm of a fork: same weights, optimizer state, EMA,
    carry and data; data order, halting exploration and torch RNG re-seeded from `seed`."""
    from laser_triton.data.sudoku import PuzzleStream

    from ..trainer import Trainer

    over = {"seed": seed, "steps": total_steps, "use_laser": laser is not None,
            "laser": dict(laser or {})}
    trainer = Trainer.from_checkpoint(trunk, **over)
    cfg = trainer.cfg
    train_p, train_s = trainer.data[0], trainer.data[1]
    trainer.stream = PuzzleStream(train_p, train_s, cfg.batch_size, seed=seed,
                                  augment=cfg.augment)
    trainer.gen.manual_seed(seed + 1)
    torch.manual_seed(seed)
    return trainer


def _mean(rows: list[dict], key: str) -> float:
    v = [r[key] for r in rows if key in r and r[key] == r[key]]
    return sum(v) / len(v) if v else math.nan


def select_tau60(p: dict, work: str, trunk: str, log=print) -> dict:
    """The protocol's tau60 rule on the trunk: 4 steps per tau and 4 plain steps from the same
    state; held and peak saving, gradient cosine. Writes tau60.json (once)."""
    path = os.path.join(work, "tau60.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    steps, seed = 4, int(p["fork"]["seeds"][0])
    total = p["trunk"]["train"]["steps"] + steps

    def probe(laser: dict | None) -> dict:
        tr = fork_trainer(trunk, seed, laser, total)
        rows = measure_steps(tr, steps, probe_every=steps, probe_stream=probe_batches(tr, seed))
        return {"held_bytes": _mean(rows, "held_bytes"), "peak_bytes": _mean(rows, "peak_bytes"),
                "grad_cos": _mean(rows, "grad_cos"), "grad_cos_noise": _mean(rows, "grad_cos_noise")}

    plain = probe(None)
    rows = []
    for tau in pareto_taus(p):
        r = probe(arm_laser(p, f"pareto_{tau}", None))
        rows.append({"tau": tau, **r, "held_saved": 1 - r["held_bytes"] / plain["held_bytes"],
                     "peak_saved": 1 - r["peak_bytes"] / plain["peak_bytes"]})
        log(f"[study_ni] trunk, tau {tau}: held saved {rows[-1]['held_saved']:.1%}, peak saved "
            f"{rows[-1]['peak_saved']:.1%}, grad cos {r['grad_cos']:.4f}")
    reach = [r["tau"] for r in rows if r["held_saved"] >= 0.60]
    tau60 = min(reach) if reach else max(r["tau"] for r in rows)
    out = {"tau60": tau60, "reached_60": bool(reach), "plain": plain, "per_tau": rows}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


def run_fork(p: dict, work: str, trunk: str, seed: int, arm: str, tau60: float | None,
             log=print) -> dict:
    """One fork run (resumable at 25-step checkpoints); its row for runs.csv."""
    from ..trainer import Trainer

    run_dir = os.path.join(work, "runs", f"seed{seed}_{arm}")
    os.makedirs(run_dir, exist_ok=True)
    ckpt, side = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "progress.json")
    laser = arm_laser(p, arm, tau60)
    start = int(p["trunk"]["train"]["steps"])
    total = start + int(p["fork"]["steps"])
    if os.path.exists(ckpt) and os.path.exists(side):
        trainer = Trainer.from_checkpoint(ckpt)
        with open(side) as f:
            prog = json.load(f)
    else:
        trainer = fork_trainer(trunk, seed, laser, total)
        prog = {"rows": [], "train_s": 0.0, "probe_draws": 0}
    probes = probe_batches(trainer, seed)
    for _ in range(prog["probe_draws"]):  # the probe stream resumes where it was
        next(probes)
    every = int(p.get("probe_every", 25))
    while trainer.step < total:
        t0 = time.time()
        n = min(25 - (trainer.step - start) % 25, total - trainer.step)
        rows = measure_steps(trainer, n, memory_every=int(p.get("memory_every", 10)),
                             peak_every=int(p.get("peak_every", 25)), probe_every=every,
                             probe_stream=probes if laser is not None else None,
                             fork_step0=start)
        prog["probe_draws"] += 2 * sum("grad_cos" in r for r in rows)
        prog["rows"] += rows
        prog["train_s"] += time.time() - t0
        trainer.save(ckpt)
        with open(side + ".tmp", "w") as f:
            json.dump(prog, f)
        os.replace(side + ".tmp", side)
        log(f"[study_ni] seed {seed} {arm}: step {trainer.step}/{total}")
    ev = trainer.evaluate()  # EMA weights, the trunk's held-out puzzles
    rows = prog["rows"]
    return {"seed": seed, "arm": arm, "tau": laser["tau"] if laser else 0.0,
            "blank_acc": ev["blank_acc"], "cell_acc": ev["cell_acc"],
            "exact_acc": ev["exact_acc"], "loss": ev["loss"],
            "grad_cos": _mean(rows, "grad_cos"), "grad_cos_min": min(
                (r["grad_cos"] for r in rows if "grad_cos" in r), default=math.nan),
            "grad_cos_noise": _mean(rows, "grad_cos_noise"),
            "held_bytes": _mean(rows, "held_bytes"), "peak_bytes": _mean(rows, "peak_bytes"),
            "steps": trainer.step, "train_s": prog["train_s"]}


def run_protocol(protocol_path: str, work: str, results: str, name: str, stages: list[str],
                 smoke: dict | None = None, log=print) -> list[str]:
    """Run the requested stages in order (each resumes from `work`); returns written paths."""
    from .ni_report import write_outputs

    p = load_protocol(protocol_path, smoke)
    os.makedirs(work, exist_ok=True)
    declared = os.path.join(work, "protocol.json")
    if os.path.exists(declared):
        with open(declared) as f:
            if json.load(f) != p:
                raise RuntimeError(f"{declared} holds a different protocol: use a new work folder")
    else:
        with open(declared, "w") as f:
            json.dump(p, f, indent=1)
    code = check_code(p)
    log(f"[study_ni] code {code['head'][:10]} (declared {p['code_commit'][:10]}); "
        + ("SMOKE configuration: not the declared study" if p["smoke"] else "declared study"))
    trunk = run_trunk(p, work, log) if "trunk" in stages else os.path.join(work, "trunk.pt")
    sel = None
    if "select" in stages or "forks" in stages:
        sel = select_tau60(p, work, trunk, log)
    if "forks" in stages:
        runs_path = os.path.join(work, "runs.csv")
        done = _read_runs(runs_path)
        arms = list(p["fork"]["arms"])
        extra = [f"pareto_{t}" for t in pareto_taus(p)
                 if t not in (0.05, sel["tau60"])]  # the arms' runs already cover those taus
        plan = [(s, a) for s in p["fork"]["seeds"] for a in arms]
        plan += [(p["fork"]["seeds"][0], a) for a in extra]
        for seed, arm in plan:
            if (int(seed), arm) in {(int(r["seed"]), r["arm"]) for r in done}:
                continue
            row = run_fork(p, work, trunk, int(seed), arm, sel["tau60"], log)
            row.update(head=code["head"], code_changed=len(code["code_changed"]))
            done.append(row)
            _write_runs(runs_path, done)
    if "report" in stages:
        return write_outputs(p, work, results, name)
    return []


def _read_runs(path: str) -> list[dict]:
    import pandas as pd

    return pd.read_csv(path).to_dict("records") if os.path.exists(path) else []


def _write_runs(path: str, rows: list[dict]) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path + ".tmp", index=False)
    os.replace(path + ".tmp", path)


def estimate(protocol_path: str, work: str, steps: int = 3, log=print) -> dict:
    """Seconds per training step, plain and LASER (tau 0.05), on the trunk's configuration
    from scratch, and the projected CPU time of the declared study."""
    p = load_protocol(protocol_path)
    cfg = dict(p["trunk"]["train"])
    out = {}
    for arm, laser in (("plain", None), ("laser", arm_laser(p, "laser_default", None))):
        tr = _trainer({**cfg, "use_laser": laser is not None, "laser": laser or {}})
        tr.train_step()  # warm-up (first bases)
        t0, c0 = time.time(), time.process_time()
        for _ in range(steps):
            tr.train_step()
        out[f"{arm}_s_per_step"] = (time.time() - t0) / steps
        # CPU seconds too: on a shared machine wall time is mostly waiting for a core.
        out[f"{arm}_cpu_s_per_step"] = (time.process_time() - c0) / steps
    n_seeds, fork = len(p["fork"]["seeds"]), int(p["fork"]["steps"])
    laser_runs = n_seeds * (len(p["fork"]["arms"]) - 1) + len(pareto_taus(p)) - 2
    out["projected_s"] = (cfg["steps"] * out["plain_s_per_step"]
                          + n_seeds * fork * out["plain_s_per_step"]
                          + laser_runs * fork * out["laser_s_per_step"])
    out["projected_cpu_s"] = out["projected_s"] * (
        out["laser_cpu_s_per_step"] / out["laser_s_per_step"])
    log(f"[study_ni] estimate (wall; cpu scales the wall projection by LASER's cpu/wall): {out}")
    return out
