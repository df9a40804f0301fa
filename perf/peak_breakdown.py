"""Where a training step's peak comes from: plain vs LASER, CPU byte accounting (issue 15).

    python -m perf.peak_breakdown --out perf/results/cpu/peak_breakdown.csv

One measured step per (preset, variant) as `bench_trm` runs it (full step, batch 8, bf16
forward as on a GPU, untrained weights, LASER's torch backend at tau 0.05, after the same
warm-up). A `PeakTrace` (LiveBytes that also remembers who allocated each live storage) takes a
snapshot at the step's peak: the phase (forward, backward, optimizer), the Python function
that was allocating at that moment, and the live bytes by origin: the function of LASER's
package that allocated the storage (e.g. `tracker.draft`, `storage.unpack`), `model` for the
TRM's own ops (activations, outputs), `autograd` for gradients the engine makes. Of the model's
live bytes, those LASER still holds as undecided raw regions at that moment are split out.
Rows per (preset, variant): each phase's `peak` (what was allocating then), `peak with
state` (plus weights, optimizer and EMA, as bench_trm's peak_mem_mib), `held`, and the bytes
live at each phase's peak by origin and dtype. `--label` names the code measured in a `code`
column and replaces that label's rows in an existing CSV; the committed `before` rows were
measured with the earlier commit's laser_triton/reference.py checked out (perf/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

import laser_triton as lt
from laser_triton.tools.livebytes import LiveBytes

from .harness import backend_env
from .trm_run import CPU_BATCH, Run, make_batches, preset_config
from .trm_variants import install_variant, parse_variant, state_bytes

MiB = 2**20
_PKG = os.sep + "laser_triton" + os.sep
_SKIP = (os.sep + "tools" + os.sep, os.sep + "trm" + os.sep, "launches.py", "eager.py")


# LASER's own autograd Functions that run the model's forward ops (their outputs and weight
# copies are the model's, as in plain).
_MODEL_FNS = {("lowrank", "linear"), ("lowrank", "forward"), ("lowrank", "rms_norm")}


def origin(depth: int = 2) -> str:
    """Who is allocating: the innermost `depth` functions of LASER's package on the Python
    stack ("module.function<-caller"), `model` when the innermost is the TRM's code or one of
    LASER's Functions that run its ops, else `autograd` (the engine: no such Python frame)."""
    f = sys._getframe(2)
    names: list[str] = []
    while f is not None and len(names) < depth:
        path = f.f_code.co_filename
        if _PKG in path or os.sep + "kernels" + os.sep in path:
            mod = Path(path).stem
            if (mod, f.f_code.co_name) in _MODEL_FNS or os.sep + "trm" + os.sep in path:
                if not names:
                    return "model"
                break
            if not any(s in path for s in _SKIP):
                names.append(f"{mod}.{f.f_code.co_name}")
        f = f.f_back
    return "<-".join(names) if names else "autograd"


class PeakTrace(LiveBytes):
    """LiveBytes that books each storage to its origin and snapshots the origins at the peak."""

    def __init__(self, laser: lt.Laser | None) -> None:
        super().__init__()
        self.laser = laser
        self.where: dict[StorageWeakRef, str] = {}
        self.by: dict[str, int] = {}  # live bytes per origin (pruned with the total)
        self.phase = "forward"
        self.at_peak: dict = {}  # snapshot at the step's peak
        self.phase_peaks: dict[str, dict] = {}  # phase -> snapshot at that phase's own peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        base = None
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                key = StorageWeakRef(t.untyped_storage())
                if key not in inputs and key not in self._live:
                    n = t.untyped_storage().nbytes()
                    base = base or origin()
                    who = f"{base} [{str(t.dtype).removeprefix('torch.')}]"
                    self._live[key] = n
                    self.where[key] = who
                    self.by[who] = self.by.get(who, 0) + n
                    self._total += n
        if self._total > self.phase_peaks.get(self.phase, {}).get("total", 0):
            now = self.live()
            self.peak = max(self.peak, now)
            if now > self.phase_peaks.get(self.phase, {}).get("total", 0):
                self.phase_peaks[self.phase] = self._snapshot(func, now)
                if now >= self.peak:
                    self.at_peak = self.phase_peaks[self.phase]
        return out

    def live(self) -> int:
        for k in [k for k in self._live if k.expired()]:
            n = self._live.pop(k)
            self._total -= n
            who = self.where.pop(k)
            self.by[who] -= n
        return self._total

    def _snapshot(self, func, now: int) -> dict:
        by = {k: v for k, v in self.by.items() if v}
        undecided = 0
        step = self.laser._step if self.laser is not None else None
        if step is not None:  # raw regions LASER still holds for undecided drafts
            seen = set()
            for e in step.entries.values():
                if e.draft is not None and e.draft.X is not None:
                    k = StorageWeakRef(e.draft.X.untyped_storage())
                    if k in self._live and k not in seen and self.where.get(k, "").startswith("model"):
                        seen.add(k)
                        undecided += self._live[k]
        if undecided:
            by["model [bfloat16]"] -= undecided
            by["undecided raw (model activations)"] = undecided
        return {"total": now, "phase": self.phase, "at": origin(3), "op": str(func), "by": by}


def measure(preset: str, variant_name: str, tau: float, seed: int = 0) -> list[dict]:
    cfg = preset_config(preset).replace(forward_dtype="bfloat16")
    batches = make_batches(cfg, CPU_BATCH, 4, seed)
    run = Run(cfg, "step", batches, torch.device("cpu"), seed, None)
    variant = parse_variant(variant_name)
    laser = install_variant(run.model, variant, lt.LaserConfig(tau=tau))
    with backend_env(variant.laser_backend):
        for _ in range(2 if laser is not None else 1):  # as bench_trm: optimizer state, bases
            run.step(lambda name: None)
        marks: dict[str, int] = {}
        state = state_bytes(*run.state())  # weights, optimizer, EMA, carry: as bench_trm
        trace = PeakTrace(laser)

        def mark(name: str) -> None:
            marks[name] = trace.live()
            if name == "loss":
                trace.phase = "backward"

        with trace:
            _step_with_phases(run, mark, trace)
    base = {"preset": preset, "variant": variant_name, "tau": tau}
    rows = [{**base, "phase": "step", "what": "peak", "mib": trace.at_peak["total"] / MiB,
             "allocating": f"{trace.at_peak['phase']}: {trace.at_peak['at']}",
             "op": trace.at_peak["op"]},
            {**base, "phase": "step", "what": "peak with state", "mib":
             (state + trace.at_peak["total"]) / MiB, "allocating": "", "op": ""},
            {**base, "phase": "forward end", "what": "held", "mib":
             (marks["loss"] - marks["fwd"]) / MiB, "allocating": "", "op": ""}]
    for phase, snap in trace.phase_peaks.items():
        rows.append({**base, "phase": phase, "what": "peak", "mib": snap["total"] / MiB,
                     "allocating": snap["at"], "op": snap["op"]})
        for who, n in sorted(snap["by"].items(), key=lambda kv: -kv[1]):
            if n >= 0.01 * MiB:
                rows.append({**base, "phase": phase, "what": who, "mib": n / MiB,
                             "allocating": "", "op": ""})
    return rows


def _step_with_phases(run: Run, mark, trace: PeakTrace) -> None:
    """Run.step with the optimizer phase marked (backward ends when the optimizer starts)."""
    opt_step = run.opt.step

    def step(*a, **k):
        trace.phase = "optimizer"
        return opt_step(*a, **k)

    run.opt.step = step
    try:
        run.step(mark)
    finally:
        del run.opt.step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("perf/results/cpu/peak_breakdown.csv"))
    p.add_argument("--presets", nargs="+", default=["tiny", "paper_sudoku"])
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--label", default="", help="a column naming the code measured")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for preset in args.presets:
        for v in ("plain", "laser_torch"):
            rows += measure(preset, v, args.tau)
    df = pd.DataFrame(rows)
    df.insert(0, "code", args.label)
    if args.out.exists() and args.label:
        old = pd.read_csv(args.out)
        df = pd.concat([old[old.code != args.label], df])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False, float_format="%.3f")
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
