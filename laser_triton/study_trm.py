"""One study run on the TRM: train a seed in one arm, checkpointing, and evaluate (study.py).

Wraps `laser_triton.train.Trainer` without changing it:
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
import json
import os
import time
from collections.abc import Iterator

import torch

from .storage import storage_key
from .study import RunFn, StudyProtocol

__all__ = ["SavedBytesCounter", "trm_run_one", "make_trainer"]


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
    from .train import Trainer
    from .training import TrainConfig

    cfg = TrainConfig.for_preset(protocol.preset, seed=seed, steps=protocol.steps,
                                 use_laser=arm == "laser", **protocol.train)
    if arm == "laser":
        cfg.laser = {**cfg.laser, **protocol.laser}
    return Trainer(cfg, data=data)


def trm_run_one(protocol: StudyProtocol, progress: bool = True) -> RunFn:
    """The study's `run_one` for the TRM: (seed, arm, run_dir) -> metrics."""
    cache: dict = {}

    def run(seed: int, arm: str, run_dir: str) -> dict:
        from .train import Trainer

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
