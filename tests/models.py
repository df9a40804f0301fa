"""Small test models: an MLP with shared-storage views and a post-norm transformer block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CastLinear(nn.Linear):
    """A Linear that casts its weight to the input dtype (saves a weight copy, docs/design.md §2.2)."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class GatedMLP(nn.Module):
    """SwiGLU with a fused gate_up projection: g and u are two views of one output."""

    def __init__(self, d=160, hidden=288):
        super().__init__()
        self.gate_up = CastLinear(d, 2 * hidden, bias=False)
        self.down = CastLinear(hidden, d, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    """Post-norm transformer block; attention internals run inside laser.raw()."""

    def __init__(self, d=160, heads=4, laser=None):
        super().__init__()
        self.heads = heads
        self.qkv = CastLinear(d, 3 * d, bias=False)
        self.o = CastLinear(d, d, bias=False)
        self.mlp = GatedMLP(d, 2 * d)
        self.laser = laser

    def attention(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        ctx = self.laser.raw() if self.laser is not None else _null()
        with ctx:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(B, L, D))

    def forward(self, x):
        x = F.rms_norm(x + self.attention(x), (x.shape[-1],))
        return F.rms_norm(x + self.mlp(x), (x.shape[-1],))


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def low_rank_tokens(B, L, d, rank, seed, dtype=torch.float32, noise=1e-3):
    """Token activations on a rank-`rank` subspace plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=torch.Generator().manual_seed(99))
    coef = torch.randn(B, L, rank, generator=g)
    x = coef @ basis / rank**0.5 + noise * torch.randn(B, L, d, generator=g)
    return x.to(dtype)
