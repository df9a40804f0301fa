"""Building blocks of the TRM network: casted linears, RMSNorm, RoPE, SwiGLU, attention, blocks.

As in the reference, parameters live in fp32 and are cast to the activation dtype at use
(`F.linear(x, w.to(x.dtype))`), and RMSNorm has no weights and computes in fp32. Blocks are
post-norm: h = rms_norm(h + sublayer(h)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import lowrank
from .attention import attention_core
from .config import TRMConfig, swiglu_width
from .lean import linear_lean, rms_norm_lean, swiglu_down

__all__ = ["trunc_normal_", "CastedLinear", "CastedEmbedding", "rms_norm", "RotaryEmbedding",
           "SwiGLU", "Attention", "Block", "ReasoningNet"]


def trunc_normal_(tensor: torch.Tensor, std: float = 1.0, lower: float = -2.0,
                  upper: float = 2.0) -> torch.Tensor:
    """Normal init truncated to [lower, upper] standard deviations whose *actual* standard
    deviation is `std` (JAX/Flax semantics; torch.nn.init.trunc_normal_ leaves the std short by
    the truncation). Inverse-CDF sampling: uniform in [Phi(lower), Phi(upper)], then erfinv."""
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        sqrt2 = math.sqrt(2.0)
        a, b = math.erf(lower / sqrt2), math.erf(upper / sqrt2)
        z = (b - a) / 2
        pdf = lambda v: math.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
        # variance of a standard normal truncated to [lower, upper]
        var = 1 - (upper * pdf(upper) - lower * pdf(lower)) / z - ((pdf(upper) - pdf(lower)) / z) ** 2
        scale = std / math.sqrt(var)
        tensor.uniform_(a, b).erfinv_().mul_(sqrt2 * scale).clamp_(lower * scale, upper * scale)
    return tensor


class CastedLinear(nn.Module):
    """Linear layer with truncated LeCun-normal init (std 1/sqrt(fan_in)), fp32 weights cast to
    the input's dtype at use, and an optional zero-initialized bias. `lean` (no bias): saves
    the input as given and the fp32 weight, not copies of them (trm/lean.py). While a Laser
    compresses (lowrank_backward on), the same saves go through `lowrank.linear`, whose weight
    gradient comes from a compressed input's coefficients without rebuilding it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 lean: bool = False) -> None:
        super().__init__()
        if lean and bias:
            raise ValueError("CastedLinear: lean=True supports no bias")
        self.weight = nn.Parameter(trunc_normal_(torch.empty(out_features, in_features),
                                                 std=in_features ** -0.5))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.lean = lean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and lowrank.active():  # LASER compressing: backward from (C, U)
            return lowrank.linear(x, self.weight, self.lean)
        if self.lean:
            return linear_lean(x, self.weight)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastedEmbedding(nn.Module):
    """Embedding table in fp32 with truncated-normal init, looked up in the activation dtype."""

    def __init__(self, num_embeddings: int, dim: int, init_std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_(torch.empty(num_embeddings, dim), std=init_std))

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.weight.to(dtype))


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm over the last axis, computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables (L, head_dim) for RoPE in the rotate-half layout, fp32."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos, self.sin


class SwiGLU(nn.Module):
    """down(silu(gate) * up) with gate and up from one fused projection. `lean`: the tail runs
    as one Function that saves only the gate/up output (see trm/lean.py)."""

    def __init__(self, width: int, expansion: float, lean: bool = False) -> None:
        super().__init__()
        inner = swiglu_width(width, expansion)
        self.gate_up_proj = CastedLinear(width, 2 * inner, lean=lean)
        self.down_proj = CastedLinear(inner, width, lean=lean)
        self.lean = lean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.lean:
            return swiglu_down(gate_up, self.down_proj.weight)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    """Non-causal multi-head self-attention (no GQA: kv heads = heads), fused qkv projection."""

    def __init__(self, hidden_size: int, num_heads: int, lean: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv_proj = CastedLinear(hidden_size, 3 * hidden_size, lean=lean)
        self.o_proj = CastedLinear(hidden_size, hidden_size, lean=lean)

    def forward(self, x: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        return self.o_proj(attention_core(self.qkv_proj(x), self.num_heads, cos_sin))


class Block(nn.Module):
    """Post-norm block: token mixing (attention, or mlp_t over the sequence axis), then a
    channel SwiGLU, each followed by a residual add and a weightless RMSNorm."""

    def __init__(self, config: TRMConfig) -> None:
        super().__init__()
        self.mlp_t_enabled = config.mlp_t
        self.eps = config.rms_norm_eps
        lean = config.lean_saves
        self.norm = rms_norm_lean if lean else rms_norm
        if config.mlp_t:
            # Token-mixing SwiGLU over the total_len positions (97 for Sudoku -> inner 512).
            self.mlp_t = SwiGLU(config.total_len, config.expansion, lean)
        else:
            self.self_attn = Attention(config.hidden_size, config.num_heads, lean)
        self.mlp = SwiGLU(config.hidden_size, config.expansion, lean)

    def forward(self, h: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.mlp_t_enabled:
            # (B, L, D) -> (B, D, L): the SwiGLU and its RMSNorm both act on the sequence axis.
            ht = h.transpose(1, 2)
            h = self._norm(ht + self.mlp_t(ht)).transpose(1, 2)
        else:
            h = self._norm(h + self.self_attn(h, cos_sin))
        return self._norm(h + self.mlp(h))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is rms_norm_lean and lowrank.active():
            # its saved output is the next projection's input: backward from (C, U) as well
            return lowrank.rms_norm(x, self.eps)
        return self.norm(x, self.eps)


class ReasoningNet(nn.Module):
    """The single network of a TRM: net(h, injection) = blocks(h + injection)."""

    def __init__(self, config: TRMConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))

    def forward(self, h: torch.Tensor, injection: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = h + injection
        for block in self.blocks:
            h = block(h, cos_sin)
        return h
