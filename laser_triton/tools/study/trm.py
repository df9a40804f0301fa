"""One study run on the TRM: train a seed in one arm, checkpointing, and evaluate (runner.py).

Wraps `laser_triton.tools.train.Trainer` without changing it:
- both arms build `TrainConfig.for_preset(preset, seed=seed, ...)`, so model initialization
  (torch.manual_seed(seed) before the model), the data pool, data order and halting
  exploration are identical; the LASER arm only adds `use_laser` and its options;
- activation memory is sampled every `memory_every` steps: the LASER arm from
  `Laser.summary()` (bytes held vs bytes autograd would hold), the baseline arm by counting
  the distinct storages its gradient cycle saves (`SavedBytesCounter`, parameters excluded,
  as in the hooks' accounting);
- a checkpoint (`last.pt`, the Trainer's full state) plus `progress.json` (memory samples,
  seconds spent) every `checkpoint_every` steps; a killed run restarts from there. The Trainer
  checkpoint holds no LASER tracker state, so a resumed LASER run rebuilds its bases on its
  first step (one reset per site): resumed LASER runs are not bit-identical to uninterrupted
  ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator

import torch

from laser_triton.storage import storage_key

from .protocol import RunFn, StudyProtocol

__all__ = ["SavedBytesCounter", "trm_run_one", "make_trainer", "resolved_train_configs",
           "pin_train_config"]


class SavedBytesCounter:
    """A `SaveContext` that keeps every saved tensor and counts the bytes of the distinct
    storages saved inside one `compress()` block, parameters excluded."""

    def __init__(self, model: torch.nn.Module):
        self.params = {storage_key(p) for p in model.parameters()}
        self.nbytes = 0
        self._seen: set = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in self._seen and key not in self.params:
            self._seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def compress(self) -> Iterator[SavedBytesCounter]:
        self.nbytes, self._seen = 0, set()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self
        self._seen = set()

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[None]:
        yield


def make_trainer(protocol: StudyProtocol, seed: int, arm: str, data=None):
    from ..trainer import Trainer
    from ..training import TrainConfig

    cfg = TrainConfig.for_preset(protocol.preset, seed=seed, steps=protocol.steps,
                                 use_laser=arm == "laser", **protocol.train)
    if arm == "laser":
        cfg.laser = {**cfg.laser, **protocol.laser}
    return Trainer(cfg, data=data)


def resolved_train_configs(protocol: StudyProtocol) -> dict[str, dict]:
    """Both arms' full TrainConfig (seed left out), as the runs will build them."""
    from ..training import TrainConfig

    out = {}
    for arm in ("baseline", "laser"):
        cfg = TrainConfig.for_preset(protocol.preset, seed=0, steps=protocol.steps,
                                     use_laser=arm == "laser", **protocol.train)
        if arm == "laser":
            cfg.laser = {**cfg.laser, **protocol.laser}
        d = cfg.to_dict()
        d.pop("seed")
        out[arm] = d
    return out


_MISSING = object()


def _same(field_name: str, now: object, pinned: object) -> bool:
    """Equal, or a TrainConfig field added after pinning that still has its default."""
    if pinned is _MISSING and now is not _MISSING:
        from ..training import TrainConfig

        for f in dataclasses.fields(TrainConfig):
            if f.name == field_name and f.default is not dataclasses.MISSING:
                return json.loads(json.dumps(f.default, default=str)) == now
    return now == pinned


def pin_train_config(work: str, protocol: StudyProtocol) -> None:
    """Record the resolved training configuration next to protocol.json; refuse to resume if
    the preset has changed since (a preset is code, and code moves)."""
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "train_config.json")
    now = json.loads(json.dumps(resolved_train_configs(protocol)))
    if os.path.exists(path):
        with open(path) as f:
            pinned = json.load(f)
        diff = sorted({k for arm in now for k in set(now[arm]) | set(pinned.get(arm, {}))
                       if not _same(k, now[arm].get(k, _MISSING),
                                    pinned.get(arm, {}).get(k, _MISSING))})
        if diff:
            raise RuntimeError(f"preset {protocol.preset!r} now resolves differently from "
                               f"{path} (fields {diff}); pin them with --train to resume")
        return
    with open(path, "w") as f:
        json.dump(now, f, indent=1, sort_keys=True)


def trm_run_one(protocol: StudyProtocol, progress: bool = True) -> RunFn:
    """The study's `run_one` for the TRM: (seed, arm, run_dir) -> metrics."""
    cache: dict = {}

    def run(seed: int, arm: str, run_dir: str) -> dict:
        from ..trainer import Trainer

        ckpt = os.path.join(run_dir, "last.pt")
        side = os.path.join(run_dir, "progress.json")
        if os.path.exists(ckpt) and os.path.exists(side):
            trainer = Trainer.from_checkpoint(ckpt)
            with open(side) as f:
                prog = json.load(f)
        else:
            trainer = make_trainer(protocol, seed, arm, cache.get("data"))
            prog = {"memory": [], "train_s": 0.0}
        cache.setdefault("data", trainer.data)  # generated once; identical for every run
        steps = protocol.steps
        t0 = time.time()
        while trainer.step < steps:
            sample = (trainer.step + 1) % protocol.memory_every == 0 or trainer.step + 1 == steps
            counter = None
            if sample and trainer.laser is None:
                counter = trainer.model.laser = SavedBytesCounter(trainer.model)
            trainer.train_step()
            if counter is not None:
                trainer.model.laser = None
                prog["memory"].append([trainer.step, counter.nbytes, counter.nbytes])
            elif sample:
                s = trainer.laser.summary()
                prog["memory"].append([trainer.step, s["raw_bytes"], s["stored_bytes"]])
            if progress and trainer.step % 10 == 0:
                print(f"  seed {seed} {arm}: step {trainer.step}/{steps} "
                      f"loss {trainer.history[-1]['loss']:.3f}", flush=True)
            if trainer.step % protocol.checkpoint_every == 0 or trainer.step == steps:
                prog["train_s"] += time.time() - t0
                t0 = time.time()
                trainer.save(ckpt)
                tmp = side + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(prog, f)
                os.replace(tmp, side)
        ev = trainer.evaluate()
        mem = prog["memory"]
        raw = sum(m[1] for m in mem) / max(len(mem), 1)
        held = sum(m[2] for m in mem) / max(len(mem), 1)
        return {"loss": ev["loss"], "exact_acc": ev["exact_acc"], "cell_acc": ev["cell_acc"],
                "blank_acc": ev["blank_acc"], "activation_bytes": held,
                "raw_activation_bytes": raw, "activation_bytes_final": mem[-1][2] if mem else 0,
                "steps": trainer.step, "train_s": prog["train_s"] + time.time() - t0}

    return run
