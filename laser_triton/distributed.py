"""Basis synchronization across data-parallel ranks (`LaserConfig(sync_basis=True)`).

Every rank tracks its own bases by default. With `sync_basis`, ranks share them: the power
products Y and the small Gram matrices are summed across ranks (so the basis is that of the
global batch), and every reset decision is all-reduced first, so all ranks take the same
branch and issue the same collectives in the same order; a spike on one rank resets all
(docs/design.md §2.9). What each rank stores stays local:
a tensor that misses `tau` on its rank is stored raw there.
"""

from __future__ import annotations

import torch

__all__ = ["LocalSync", "DistSync", "make_sync"]


class LocalSync:
    """No-op synchronization for single-process training."""

    active = False

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum_many(self, ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return ts

    def any(self, flag: torch.Tensor) -> torch.Tensor:
        return flag

    def min_int(self, v: int, device: torch.device) -> int:
        return v

    def min_float(self, v: float, device: torch.device) -> float:
        return v


class DistSync(LocalSync):
    """Sums and logical-ors over a torch.distributed process group."""

    active = True

    def __init__(self, group=None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("LaserConfig(sync_basis=True) needs torch.distributed to be "
                               "initialized (e.g. under torchrun) before compress()")
        self.dist, self.group = dist, group

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum_many([t])[0]

    def sum_many(self, ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """One all-reduce for many tensors; non-finite local values contribute zero."""
        if not ts:
            return ts
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in ts])
        flat = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat))
        self.dist.all_reduce(flat, op=self.dist.ReduceOp.SUM, group=self.group)
        out, i = [], 0
        for t in ts:
            n = t.numel()
            out.append(flat[i:i + n].view(t.shape).to(t.dtype))
            i += n
        return out

    def any(self, flag: torch.Tensor) -> torch.Tensor:
        f = flag.to(torch.float32).clone()
        self.dist.all_reduce(f, op=self.dist.ReduceOp.MAX, group=self.group)
        return f > 0

    def min_int(self, v: int, device: torch.device) -> int:
        t = torch.tensor([v], dtype=torch.int64, device=device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN, group=self.group)
        return int(t)

    def min_float(self, v: float, device: torch.device) -> float:
        t = torch.tensor([v], dtype=torch.float64, device=device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN, group=self.group)
        return float(t)


def make_sync(enabled: bool, group=None) -> LocalSync:
    return DistSync(group) if enabled else LocalSync()
