"""Lean saves: RMSNorm and the SwiGLU tail recomputed in backward (docs/design.md §2.10).
Mathematically the same functions as `layers.rms_norm` and `down(silu(gate) * up)`; only what
autograd keeps for backward changes.

Plain autograd keeps, per weightless RMSNorm, an fp32 copy of its input (twice the bytes of a
bf16 activation) and, per SwiGLU, the fused gate/up output plus silu(gate) and the product
silu(gate) * up (both inner-width), plus a bf16 copy of the down weight. Here:
- `rms_norm_lean` keeps its *output* y and the per-row scale r = rsqrt(mean(x^2) + eps). The
  output is the next layer's input, saved there anyway (one storage, held once). The gradient
  follows from y = x r alone: dx = r (dy - y mean(dy y)).
- `swiglu_down` keeps the gate/up output and the fp32 down weight (a parameter: no extra
  memory); backward recomputes silu(gate) * up for the weight gradient.
- `linear_lean` keeps its input as given and the fp32 weight. Plain autograd keeps the cast
  weight copy and, for a non-contiguous input (mlp_t's transposed view), the 2-D copy F.linear
  makes of it: rows as narrow as the sequence (97), which LASER must store raw. Kept as given,
  the input is a view of a storage the network saves anyway, compressed once at its full width.

The activations these keep are ordinary saved tensors, so LASER compresses them like any other.
Backward recomputation runs on what unpack returns; it adds no saves of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lowrank import RMSNormSavingOutput

__all__ = ["linear_lean", "rms_norm_lean", "swiglu_down"]


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx = dout @ weight.to(dout.dtype)
        dweight = dout.reshape(-1, dout.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return dx, dweight.to(weight.dtype)


def linear_lean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight.to(x.dtype)) (no bias) saving x as given and the weight itself."""
    return _Linear.apply(x, weight)


def rms_norm_lean(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm in fp32, returned in x's dtype; saves its output and row scales."""
    return RMSNormSavingOutput.apply(x, eps)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up, weight)
        return F.linear(F.silu(gate) * up, weight.to(gate_up.dtype))

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate_up, weight = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        silu = F.silu(gate)  # exactly as in forward, so h matches the forward's bit for bit
        h = silu * up
        dh = dout @ weight.to(dout.dtype)
        dweight = dout.reshape(-1, dout.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
        # the same ops autograd runs for silu(gate) * up: gradients match the plain path
        dgate = torch.ops.aten.silu_backward(dh * up, gate)
        return torch.cat((dgate, dh * silu), dim=-1), dweight.to(weight.dtype)


def swiglu_down(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(silu(gate) * up, weight.to(dtype)) for [gate, up] = gate_up.chunk(2, -1); saves
    only gate_up and the (fp32) weight itself."""
    return _SwiGLUDown.apply(gate_up, weight)
