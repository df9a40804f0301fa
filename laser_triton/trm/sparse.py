"""Per-puzzle embeddings and the SignSGD optimizer that trains them.

The reference keeps the embedding table in a buffer, copies the batch's rows into a
gradient-carrying "local weights" buffer each forward, and updates the touched rows with
SignSGD and decoupled weight decay (Adam on a very sparse gradient behaves like SignSGD).

Here the table is an `nn.Parameter` (so `parameters()` counts it: 512 weights for the Sudoku
presets, which have a single puzzle identifier) excluded from AdamW and from the EMA, and the
forward records which rows the batch used. `SparseSignSGD` then updates exactly those rows with
the summed gradient's sign, and decays exactly those rows, as the reference does; rows the batch
did not touch are left alone (a dense optimizer would decay them too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PuzzleEmbedding", "SparseSignSGD"]


class PuzzleEmbedding(nn.Module):
    """Zero-initialized table (num_ids, dim) looked up per sample."""

    def __init__(self, num_ids: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_ids, dim))
        # Rows touched by the last training forward; what SparseSignSGD updates and decays.
        self.register_buffer("last_ids", torch.zeros(0, dtype=torch.long), persistent=False)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ids = ids.reshape(-1).long()
        if self.training and torch.is_grad_enabled():
            self.last_ids = ids.detach().clone()
        return F.embedding(ids, self.weight).to(dtype)


class SparseSignSGD(torch.optim.Optimizer):
    """SignSGD with decoupled weight decay on the rows of PuzzleEmbedding tables that the last
    forward touched: w[r] <- w[r] * (1 - lr * wd) - lr * sign(grad[r])."""

    def __init__(self, embeddings: list[PuzzleEmbedding], lr: float = 1e-4,
                 weight_decay: float = 1.0) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError("SparseSignSGD: lr and weight_decay must be >= 0")
        self._embeddings = list(embeddings)
        super().__init__([e.weight for e in self._embeddings],
                         dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        lr, wd = self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]
        for emb in self._embeddings:
            w, grad = emb.weight, emb.weight.grad
            if grad is None or emb.last_ids.numel() == 0:
                continue
            rows = torch.unique(emb.last_ids)
            w[rows] = w[rows] * (1.0 - lr * wd) - lr * torch.sign(grad[rows])
        return None
