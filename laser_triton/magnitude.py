"""Activations of extreme magnitude (issue 14, class 1): when the fp32 pass is exact enough, and
the per-site power-of-two scale that brings other tensors into range.

The fused pass accumulates squares in fp32: ||X||^2 underflows for values around 1e-24 and
overflows for finite values around 1e18; fp16 coefficients of small activations fall into the
subnormal range, where rounding is absolute, not relative; and a rebuilt fp16 tensor near 65504
can round past the largest fp16 to inf. The hot path only checks, on the device, that a
tensor's statistics lie in the range where the error bound holds (`in_range`) and adds the
absolute rounding of subnormal coefficients and outputs to the bound (`subnormal_terms`).
A tensor outside that range fails its decision; the reset (which synchronizes anyway) reads
max|X| and, when the unscaled pass is unsafe, compresses s * X (s a power of two, exact) and
stores s with the coefficients. Later tensors at that site are scaled by the same s (no host
read), and rebuilt as clamp(C U^T / s) in fp32 before the cast (`rebuild`), which never
increases the error because X itself lies inside the clamp's range.
"""

from __future__ import annotations

import math

import torch

from . import ops

__all__ = ["rebuild", "scaled", "choose_scale", "in_range", "subnormal_terms", "half_subnormal"]

# ||X||^2 of what the pass reads must lie in [n * E_LO, E_HI]: squares below 2^-126 (normal
# fp32) lose relative precision (or flush to zero on some hardware), and their total, at most
# n * 2^-126, is then < 2^-26 of ||X||^2; above E_HI, Y = X^T X U could overflow fp32.
E_LO = 2.0 ** -100
E_HI = 2.0 ** 100
_STEP = 2.0 ** 60  # scale factors are applied in steps of at most this (fp32 holds 2^127)


def half_subnormal(dtype: torch.dtype) -> float:
    """Half the spacing of `dtype`'s subnormals: the absolute rounding error of a value there."""
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps / 2


def in_range(e_X: torch.Tensor, c_amax: torch.Tensor, n: int, coeff_dtype: torch.dtype,
             out_dtype: torch.dtype, rank: int, clamped: bool) -> torch.Tensor:
    """Device bool: the one-pass statistics are trustworthy (NaN-safe: NaN gives False).

    - n * E_LO <= ||X||^2 <= E_HI (no underflow or overflow in the fp32 sums);
    - max|C| fits coeff_dtype;
    - unless the rebuild clamps: |x_hat_ij| <= ||c_i|| <= sqrt(r) max|C| (1 + rounding) fits
      out_dtype, so the cast back cannot produce inf.
    """
    ok = (e_X >= n * E_LO) & (e_X <= E_HI) & (c_amax <= torch.finfo(coeff_dtype).max)
    if not clamped and out_dtype != torch.float32:
        ok &= c_amax * (math.sqrt(rank) * (1 + 2 * torch.finfo(coeff_dtype).eps)) \
            <= torch.finfo(out_dtype).max
    return ok


def subnormal_terms(e_X: torch.Tensor, N: int, D: int, rank: int, coeff_dtype: torch.dtype,
                    out_dtype: torch.dtype, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative error bounds from absolute (subnormal) rounding, both device scalars:

    - coefficients: each of the N*r entries rounds to coeff_dtype with error at most
      max(rho_c |c|, h_c), so sum of squares <= rho_c^2 ||C||^2 + N r h_c^2; returns the
      second part over ||X||^2 (it adds in quadrature with the projection residual);
    - outputs: casting the N*D rebuilt values to out_dtype adds at most h_x each where they
      are subnormal; over ||X|| (unscaled: ||X|| = ||sX|| / s) it adds linearly.
    """
    s = 1.0 if scale is None else scale
    safe = e_X.clamp_min(torch.finfo(torch.float32).tiny)
    coeff2 = (N * rank * half_subnormal(coeff_dtype) ** 2) / safe
    out = (math.sqrt(N * D) * half_subnormal(out_dtype) * s) / safe.sqrt()
    return coeff2, out


def scaled(X: torch.Tensor, scale: float | None) -> torch.Tensor:
    """X as the pass reads it: X itself, or fp32 s * X (power-of-two factors, exact)."""
    if scale is None:
        return X
    return _times(X.float(), scale)


def rebuild(C: torch.Tensor, U: torch.Tensor, dtype: torch.dtype,
            scale: float | None) -> torch.Tensor:
    """What unpack returns: C U^T in `dtype`; for a scaled site (C = round(s X U)), C U^T / s
    clamped to dtype's finite range before the cast (X lies in that range, so clamping moves
    no entry away from X)."""
    if scale is None:
        return ops.reconstruct(C, U, dtype)
    Xf = _times(ops.reconstruct(C, U, torch.float32), 1.0 / scale)
    big = torch.finfo(dtype).max  # also fp32's: near it, C U^T / s can round to inf
    return Xf.clamp_(-big, big).to(dtype)


def _times(X: torch.Tensor, s: float) -> torch.Tensor:
    """X * s for a power of two s that may exceed fp32's range, in exact steps."""
    out = X
    while s > _STEP or s < 1.0 / _STEP:
        step = _STEP if s > 1.0 else 1.0 / _STEP
        out = out * step
        s /= step
    return out * s if s != 1.0 else out


def choose_scale(amax: float, N: int, D: int, rank_cap: int, tau: float,
                 coeff_dtype: torch.dtype, out_dtype: torch.dtype) -> float | None:
    """None when the unscaled pass is safe for a tensor with max|X| = amax (with margins over
    `in_range` and `subnormal_terms`), else the power of two s with s * amax in [0.5, 1).
    Host values: called by resets, which synchronize anyway."""
    if amax == 0.0 or not math.isfinite(amax):
        return None
    n = N * D
    r = max(1, rank_cap)
    coeff = torch.finfo(coeff_dtype)
    safe = (amax * amax * n <= E_HI / 16  # ||X||^2 <= n amax^2
            and amax * amax >= 16 * n * E_LO  # ||X||^2 >= amax^2
            and amax * math.sqrt(D) <= coeff.max / 4  # |c| <= ||x_i|| <= sqrt(D) amax
            and 64 * math.sqrt(N * r) * half_subnormal(coeff_dtype) <= tau * amax
            and 64 * math.sqrt(n) * half_subnormal(out_dtype) <= tau * amax)
    if safe and out_dtype != torch.float32:  # the rebuild's cast cannot overflow
        safe = amax * math.sqrt(D * r) * (1 + 2 * coeff.eps) <= torch.finfo(out_dtype).max / 2
    if safe:
        return None
    return math.ldexp(1.0, -math.frexp(amax)[1])
