"""What `lowrank` serves in a backward, measured against its error bound (perf and tests).

- `SavedRegions(laser)`, around a forward: a copy of every region the Laser compresses, as it
  was saved (before any in-place change or compression).
- `ServedGradients(saved)`, around a backward: every weight gradient `lowrank` computed from
  (C, U), with the saved view it stands for, the entries served as (C, U) to any consumer
  (linear layers and norms), and the rebuilds (`ops.reconstruct` calls and the
  bytes they produced). `bound_ratios(tau)` gives, per served layer,
  ||dW - G^T X||_F / (||G||_2 tau ||X||_F) with X as saved: lowrank's bound is 1
  (laser_triton/lowrank.py).

Both wrap the package's functions for their duration (the Laser instance's pack hook, and
`ops.reconstruct`, `lowrank.serve`, `lowrank.weight_grad`) and restore them at exit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import lowrank, ops
from ..hooks import Laser
from ..lowrank import LowRankInput
from ..storage import Entry, Packed, region_view

__all__ = ["SavedRegions", "Served", "ServedGradients"]


class SavedRegions:
    """Copies of every region `laser` compresses inside this block, keyed by its entry."""

    def __init__(self, laser: Laser | None) -> None:
        self.laser = laser
        # id(entry) -> (entry, copy); the entry is held so that its id is not reused
        self.regions: dict[int, tuple[Entry, torch.Tensor]] = {}

    def __enter__(self) -> SavedRegions:
        if self.laser is not None:
            pack = self.laser._pack

            def copying_pack(t: torch.Tensor):
                p = pack(t)
                e = getattr(p, "entry", None)
                if e is not None and id(e) not in self.regions:
                    self.regions[id(e)] = (e, region_view(t, e.region).clone())
                return p

            self.laser._pack = copying_pack
        return self

    def __exit__(self, *exc: object) -> None:
        if self.laser is not None:
            del self.laser._pack  # back to the class's method

    def matrix(self, p: Packed) -> torch.Tensor:
        """The saved view `p` as it was saved, as an fp64 (rows, K) matrix."""
        region = self.regions[id(p.entry)][1]
        x = region.as_strided(p.size, p.stride, region.storage_offset() + p.offset).double()
        return x.reshape(-1, x.shape[-1])


@dataclass
class Served:
    """One weight gradient computed from (C, U). `grad_out` and `dw` are copies, kept only
    when the bound is to be measured (a `SavedRegions` was given)."""

    packed: Packed
    input: LowRankInput
    out: int  # the layer's output features
    grad_out: torch.Tensor | None
    dw: torch.Tensor | None


class ServedGradients:
    """The weight gradients `lowrank` serves and the rebuilds inside this block."""

    def __init__(self, saved: SavedRegions | None = None) -> None:
        self.saved = saved
        self.calls: list[Served] = []
        self.served_entries: set[int] = set()  # ids of every entry served as (C, U)
        self.rebuilds = 0
        self.rebuild_bytes = 0
        self._packed: dict[int, Packed] = {}  # id(LowRankInput) -> the view it was served for
        self._orig = None

    def __enter__(self) -> ServedGradients:
        self._orig = rebuild, serve, wgrad = ops.reconstruct, lowrank.serve, lowrank.weight_grad
        keep = self.saved is not None

        def counted_rebuild(C: torch.Tensor, U: torch.Tensor, dtype=None) -> torch.Tensor:
            out = rebuild(C, U, dtype)
            self.rebuilds += 1
            self.rebuild_bytes += out.numel() * out.element_size()
            return out

        def noted_serve(p: object) -> torch.Tensor | None:
            out = serve(p)
            if out is not None:
                self._packed[id(lowrank.served_input())] = p
                self.served_entries.add(id(p.entry))
            return out

        def recorded_wgrad(g: torch.Tensor, h: LowRankInput) -> torch.Tensor:
            dw = wgrad(g, h)
            self.calls.append(Served(self._packed.pop(id(h)), h, g.shape[-1],
                                     g.detach().clone() if keep else None,
                                     dw.detach().clone() if keep else None))
            return dw

        ops.reconstruct, lowrank.serve, lowrank.weight_grad = (counted_rebuild, noted_serve,
                                                               recorded_wgrad)
        return self

    def __exit__(self, *exc: object) -> None:
        ops.reconstruct, lowrank.serve, lowrank.weight_grad = self._orig

    def bound_ratios(self, tau: float, slack: float = 0.0) -> list[float]:
        """Per served layer, (||dW - G^T X||_F - slack ||G^T X||_F) / (||G||_2 tau ||X||_F),
        X as saved; `slack` allows for the fp32 rounding of dW."""
        if self.saved is None:
            raise RuntimeError("bound_ratios needs the regions as saved: pass a SavedRegions")
        out = []
        for c in self.calls:
            X = self.saved.matrix(c.packed)
            G = c.grad_out.reshape(-1, c.grad_out.shape[-1]).double()
            exact = G.t() @ X
            err = float((c.dw.double() - exact).norm()) - slack * float(exact.norm())
            out.append(err / (float(torch.linalg.matrix_norm(G, ord=2)) * tau * float(X.norm())))
        return out
