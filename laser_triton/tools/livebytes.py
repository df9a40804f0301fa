"""CPU byte accounting of live tensors: the stand-in for the CUDA allocator's statistics.

`LiveBytes` counts the bytes of storages allocated while it is active that are still alive,
and their peak, per storage. perf/bench_trm.py and the non-inferiority study use it for peak
memory on CPU (on CUDA, `torch.cuda.max_memory_allocated` is the measure). `StepPeak` picks
the one that applies to a device; `laser-triton demo` reads a training step's peak from it.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytes", "StepPeak"]


class LiveBytes(TorchDispatchMode):
    """Bytes of storages allocated while active that are still alive, and their peak.

    A storage counts once however many views of it exist; outputs that alias an input (views,
    in-place ops) are not new. Frees are noticed lazily: the running total is an upper bound,
    pruned whenever it would set a new peak, so `peak` is exact at every allocation.
    Intended for CPU accounting (the CUDA allocator's statistics are used on GPU).
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[StorageWeakRef, int] = {}
        self._total = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                key = StorageWeakRef(t.untyped_storage())
                if key not in inputs and key not in self._live:
                    n = t.untyped_storage().nbytes()
                    self._live[key] = n
                    self._total += n
        if self._total > self.peak:
            self.peak = max(self.peak, self.live())
        return out

    def live(self) -> int:
        """Bytes alive now (prunes freed storages)."""
        dead = [k for k in self._live if k.expired()]
        for k in dead:
            self._total -= self._live.pop(k)
        return self._total

    def reset_peak(self) -> None:
        self.peak = self.live()


class StepPeak:
    """Peak bytes allocated during a block above what was allocated when it began: the CUDA
    allocator's statistics on a GPU, `LiveBytes` on CPU (which slows the block down; measure
    one step, not a run). `peak` is set on exit."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.peak = 0
        self._live: LiveBytes | None = None
        self._start = 0

    def __enter__(self) -> StepPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._live = LiveBytes().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            assert self._live is not None
            self._live.__exit__(*exc)
            self.peak = self._live.peak
