"""Self-attention that saves only its qkv projection, for LASER (docs/design.md §2.2).

Plain autograd through RoPE + SDPA saves q and k after RoPE, v (a view keeping the whole qkv
output alive), the attention output and its logsumexp. The softmax backward uses that exact
logsumexp; if q or k come back lossy (as LASER rebuilds them) the softmax becomes inconsistent
and dq errors reach several times tau. `attention_core` instead saves one tensor, the qkv
projection output (B, L, 3*H*Dh): a plain activation LASER may compress like any other. Backward
recomputes RoPE and attention from it, under identity saved-tensor hooks so that nothing of the
recomputation is ever compressed, even when backward runs inside `laser.compress()`. At 97
tokens the recomputation is a small fraction of the block's cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_core", "attention_reference", "apply_rope"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on x (B, L, H, Dh) with cos/sin (L, Dh), computed in cos's dtype (fp32)
    and returned in x's dtype, as the reference does."""
    xc = x.to(cos.dtype)
    out = xc * cos.unsqueeze(-2) + _rotate_half(xc) * sin.unsqueeze(-2)
    return out.to(x.dtype)


def attention_reference(qkv: torch.Tensor, num_heads: int,
                        cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """RoPE + non-causal SDPA on a packed qkv (B, L, 3*H*Dh) -> (B, L, H*Dh), plain autograd."""
    B, L, width = qkv.shape
    head_dim = width // (3 * num_heads)
    qkv = qkv.view(B, L, 3 * num_heads, head_dim)
    q, k, v = qkv[:, :, :num_heads], qkv[:, :, num_heads:2 * num_heads], qkv[:, :, 2 * num_heads:]
    if cos_sin is not None:
        cos, sin = cos_sin
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh) for SDPA
    out = F.scaled_dot_product_attention(q, k, v, is_causal=False)
    return out.transpose(1, 2).reshape(B, L, num_heads * head_dim)


def _passthrough(t: torch.Tensor) -> torch.Tensor:
    return t


class _AttentionCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, num_heads: int, cos: torch.Tensor | None,
                sin: torch.Tensor | None) -> torch.Tensor:
        ctx.num_heads = num_heads
        # cos/sin are constant buffers, alive anyway: kept on ctx, never through the hooks.
        ctx.cos_sin = None if cos is None else (cos, sin)
        ctx.save_for_backward(qkv)
        return attention_reference(qkv, num_heads, ctx.cos_sin)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (qkv,) = ctx.saved_tensors
        # Identity hooks are innermost, so an enclosing laser.compress() never sees the
        # recomputed q, k, v or the softmax statistics.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_passthrough,
                                                                           _passthrough):
            leaf = qkv.detach().requires_grad_(True)
            out = attention_reference(leaf, ctx.num_heads, ctx.cos_sin)
            (grad_qkv,) = torch.autograd.grad(out, leaf, grad_out)
        return grad_qkv, None, None, None


def attention_core(qkv: torch.Tensor, num_heads: int,
                   cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """RoPE + attention on a packed qkv that saves only qkv and recomputes in backward."""
    if not (torch.is_grad_enabled() and qkv.requires_grad):
        return attention_reference(qkv, num_heads, cos_sin)
    cos, sin = (None, None) if cos_sin is None else cos_sin
    return _AttentionCore.apply(qkv, num_heads, cos, sin)
