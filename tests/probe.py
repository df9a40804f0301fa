"""Measures what backward receives: an autograd Function that saves the tensors it is given and
records, in backward, the tensors autograd hands back (through LASER's unpack when inside
`compress()`). Tests compare those with copies taken at save time, never with LASER's report."""

from __future__ import annotations

import torch


class _Save(torch.autograd.Function):
    @staticmethod
    def forward(ctx, record: list, anchor: torch.Tensor, *ts: torch.Tensor) -> torch.Tensor:
        ctx.record, ctx.anchor_shape = record, anchor.shape
        ctx.save_for_backward(*ts)
        return anchor.sum() * 0.0

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        got = ctx.saved_tensors  # raises here when a saved tensor must not be served
        ctx.record.append([t.detach().clone() for t in got])
        return (None, torch.zeros(ctx.anchor_shape)) + (None,) * len(got)


def save(record: list, *ts: torch.Tensor) -> torch.Tensor:
    """Save ts for backward; backward of the result appends what it received to `record`."""
    anchor = torch.zeros(1, requires_grad=True)
    return _Save.apply(record, anchor, *ts)


def with_history(x: torch.Tensor) -> torch.Tensor:
    """x as an activation: same values, produced by an autograd op (LASER keeps leaves raw)."""
    return x.detach().clone().requires_grad_() * 1


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error in fp64 (inf when got is non-finite where want is finite)."""
    g, w = got.double(), want.double()
    n = torch.linalg.vector_norm(w)
    d = torch.linalg.vector_norm(g - w)
    return float(d / n) if n > 0 else float(d)
