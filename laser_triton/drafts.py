"""What a `SiteTracker` hands back: a `Draft` awaiting its fidelity decision, and the
`Stored` form kept for backward (docs/design.md §2.3, §2.4, §5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .estimates import batch_error

__all__ = ["Draft", "Stored"]


@dataclass
class Draft:
    """A compressed candidate for X, awaiting the batched fidelity decision.

    The error is not computed per tensor: `stats` holds the compress pass's four scalars in one
    device buffer, and the Laser decides a whole batch from them on the host (`host_error`),
    one transfer per network call. `err` computes this draft's device estimate on demand.
    """

    X: torch.Tensor  # (N, D), kept alive until decided
    C: torch.Tensor | None  # None when the site had no basis yet
    U: torch.Tensor | None
    stats: torch.Tensor  # (4,) fp32: e_X, e_C (the measured error if `measured`), row err, max|C|
    consts: tuple[float, ...]  # of `error_consts`: what turns `stats` into the error
    measured: bool = False
    shrink_gram: torch.Tensor | None = None  # U^T Y (r x r) when a shrink check is due
    # A shrink check is due. A batched tracker leaves shrink_gram to its decision batch,
    # which computes every due draft's gram in one product per (width, rank).
    shrink_due: bool = False
    scale: float | None = None  # C = round(scale * X U) (see magnitude.py); None: unscaled
    Y: torch.Tensor | None = None  # the pass's power product X^T X U (partial-view checks)
    _err: torch.Tensor | None = None

    @property
    def e_X(self) -> torch.Tensor:
        return self.stats[0]

    @property
    def row_err(self) -> torch.Tensor:
        return self.stats[2]

    @property
    def err(self) -> torch.Tensor:
        """fp32 device estimate of the relative error (inf when undecidable without a reset)."""
        if self._err is None:
            consts = torch.tensor([self.consts], dtype=torch.float64, device=self.stats.device)
            measured = torch.tensor([self.measured], device=self.stats.device)
            self._err = batch_error(self.stats[None].double(), consts, measured)[0].float()
        return self._err


@dataclass
class Stored:
    """What is kept for one matrix: either (C, U) or the raw X."""

    C: torch.Tensor | None = None
    U: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    err: torch.Tensor | None = None  # estimated relative error (device scalar), 0 for raw
    row_err: torch.Tensor | None = None
    scale: float | None = None  # C was computed from scale * X; rebuild with magnitude.rebuild

    @property
    def is_raw(self) -> bool:
        return self.raw is not None

    def nbytes(self) -> int:
        if self.raw is not None:
            return self.raw.numel() * self.raw.element_size()
        return self.C.numel() * self.C.element_size()  # U is counted once per basis by callers
