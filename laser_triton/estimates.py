"""Fidelity estimates and shrink plans for whole decision batches (issue 13).

`relative_error` is the one-pass estimate of what unpack will return; `host_error` computes
the same from a pass's four scalars on the host, which is how the Laser decides a batch from
one copy per network call (`batch_error` is its device twin, for decisions that stay on the
device). `plan_shrinks` picks the columns a batch's shrink checks keep, on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import magnitude
from .config import LaserConfig, rounding_error
from .distributed import LocalSync
from .results import CompressOut
from .util import to_device_async

__all__ = ["relative_error", "error_consts", "NO_BASIS", "host_error", "batch_error",
           "plan_shrinks", "output_rounding"]


def relative_error(out: CompressOut, cfg: LaserConfig, X: torch.Tensor, U: torch.Tensor,
                   out_dtype: torch.dtype | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """Relative error of what unpack will return, ||X - rebuild(round(C), U)|| / ||X||.

    X is what the pass read (scale * X for a scaled site, see magnitude.py), out_dtype the
    dtype unpack returns (default X's). Estimated from one pass: the projection residual
    (1 - e_C/e_X) is orthogonal to span(U), where the coefficient rounding error (at most
    rho_c relative, plus the absolute rounding of subnormal coefficients) lives, so they add
    in quadrature; casting the rebuilt tensor back adds at most rho_x ||X_hat|| plus the
    absolute rounding of subnormal outputs (triangle inequality). Below `exact_below` the
    residual is measured directly instead, because 1 - e_C/e_X cannot resolve such errors in
    fp32. Statistics outside the range where the fp32 pass is exact enough (underflowing or
    overflowing ||X||^2, which includes X == 0 and non-finite X; coefficients overflowing
    coeff_dtype; a rebuild that could round past out_dtype's largest value) give inf, so
    NaN-safe predicates reject them and a reset decides (it can scale).
    """
    out_dtype = X.dtype if out_dtype is None else out_dtype
    e_X = out.e_X
    N, D = X.shape
    r = U.shape[1]
    coeff2, out_sub = magnitude.subnormal_terms(e_X, N, D, r, cfg.coeff_dtype, out_dtype, scale)
    if cfg.tau < cfg.exact_below:
        X_hat = magnitude.scaled(magnitude.rebuild(out.C, U, out_dtype, scale), scale)
        err = torch.linalg.vector_norm(X.float() - X_hat.float()) / e_X.sqrt()
    else:
        rho_c, rho_x = rounding_error(cfg.coeff_dtype), output_rounding(out_dtype)
        frac = out.e_C / e_X
        err = (((1.0 - frac).clamp_min(0.0) + rho_c * rho_c * frac + coeff2).sqrt()
               + rho_x * frac.sqrt() + out_sub)
    ok = magnitude.in_range(e_X, out.c_amax, N * D, cfg.coeff_dtype, out_dtype, r,
                            clamped=scale is not None)
    return torch.where(ok, err, torch.full_like(err, math.inf))


def output_rounding(dtype: torch.dtype) -> float:
    return rounding_error(dtype) if dtype in (torch.bfloat16, torch.float16) else 0.0


def error_consts(cfg: LaserConfig, N: int, D: int, r: int, out_dtype: torch.dtype,
                 scale: float | None) -> tuple[float, ...]:
    """The constants that turn a pass's (e_X, e_C, max|C|) into `relative_error`:
    (rho_c, rho_x, N r h_c^2, sqrt(N D) h_x s, lowest and highest trusted ||X||^2, largest
    trusted max|C|), h the half subnormal spacings (magnitude.subnormal_terms, in_range)."""
    s = 1.0 if scale is None else scale
    cmax = torch.finfo(cfg.coeff_dtype).max
    if scale is None and out_dtype != torch.float32:  # the rebuild must not round to inf
        cmax = min(cmax, torch.finfo(out_dtype).max
                   / (math.sqrt(r) * (1 + 2 * torch.finfo(cfg.coeff_dtype).eps)))
    return (rounding_error(cfg.coeff_dtype), output_rounding(out_dtype),
            N * r * magnitude.half_subnormal(cfg.coeff_dtype) ** 2,
            math.sqrt(N * D) * magnitude.half_subnormal(out_dtype) * s,
            N * D * magnitude.E_LO, magnitude.E_HI, float(cmax))


NO_BASIS = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # consts of a draft that only a reset decides
_TINY = torch.finfo(torch.float32).tiny


def host_error(stats: Sequence[float], consts: Sequence[float], measured: bool) -> float:
    """`relative_error` on the host from a pass's scalars (fp64 arithmetic on the same fp32
    inputs), for the batched decisions: the same terms and the same trusted range (outside
    it, or without a basis: inf)."""
    e_X, e_C, _, c_amax = stats
    rho_c, rho_x, coeff2, out_sub, e_lo, e_hi, cmax = consts
    if not (e_lo <= e_X <= e_hi and c_amax <= cmax):  # NaN-safe
        return math.inf
    if measured:
        return e_C if e_C == e_C else math.inf
    safe = max(e_X, _TINY)
    frac = e_C / e_X
    err = (math.sqrt(max(1.0 - frac, 0.0) + rho_c * rho_c * frac + coeff2 / safe)
           + rho_x * math.sqrt(max(frac, 0.0)) + out_sub / math.sqrt(safe))
    return err if err == err else math.inf


def batch_error(stats: torch.Tensor, consts: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """`host_error` of B drafts on the device from their (B, 4) stats and (B, 7) consts, in a
    handful of element-wise ops per batch (for decisions that must stay on the device)."""
    e_X, e_C, c_amax = stats[:, 0], stats[:, 1], stats[:, 3]
    rho_c, rho_x, coeff2, out_sub, e_lo, e_hi, cmax = consts.unbind(1)
    safe = e_X.clamp_min(_TINY)
    frac = e_C / e_X
    err = torch.addcmul((1.0 - frac).clamp_min(0.0) + coeff2 / safe, rho_c * rho_c, frac).sqrt()
    err = err + rho_x * frac.clamp_min(0.0).sqrt() + out_sub / safe.sqrt()
    err = torch.where(measured, e_C, err)
    ok = (e_X >= e_lo) & (e_X <= e_hi) & (c_amax <= cmax) & ~torch.isnan(err)
    return torch.where(ok, err, torch.full_like(err, math.inf))


def plan_shrinks(checks: list, sync: LocalSync
                 ) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
    """Shrink checks of one batch on the device: per check, the Ritz rotation W (r x r fp32,
    columns by descending Ritz value) and the rank r'' whose Ritz energy meets
    shrink_target * tau (r when none does, or when the check cannot decide).

    One batched eigensolve for the whole batch, whatever the mix of ranks, no host round
    trip (on CUDA `eigh` reads its status back: one synchronization per batch with checks).
    Each Ritz matrix is padded to the batch's largest rank with a diagonal block far below its
    spectrum (-(1 + sum |G|)): the blocks stay decoupled, the padded directions sort last and
    count no energy. `r''` (an int64 vector, check i at position slot[i]) rides to the host
    with the batch's decisions. Same rule as `reference.select_rank` on the host: the
    smallest j with sum(theta[:j]) >= (1 - target^2) e_X, at least min_rank.
    """
    grams = sync.sum_many([d.shrink_gram for _, d in checks])
    e_Xs = sync.sum_many([d.e_X for _, d in checks])
    device = grams[0].device
    groups: dict[int, list[int]] = {}
    for i, G in enumerate(grams):
        groups.setdefault(G.shape[0], []).append(i)
    r_max = max(groups)
    order = [i for idx in groups.values() for i in idx]
    slot = [0] * len(checks)
    host = []
    for k, i in enumerate(order):
        slot[i] = k
        tr, d = checks[i]
        t = tr._projection_target(tr.cfg.shrink_target, d.X.dtype)
        r = grams[i].shape[0]
        host.append([1.0 - t * t if t > 0 else math.inf, float(tr.cfg.min_rank), float(r)]
                    + [0.0] * r + [1.0] * (r_max - r))  # then: which diagonal entries pad
    host_t = to_device_async(torch.tensor(host, dtype=torch.float64), device)
    stacks = []
    for r, idx in groups.items():  # two launches per distinct rank, one cat
        G = grams[idx[0]].unsqueeze(0) if len(idx) == 1 else torch.stack([grams[i] for i in idx])
        stacks.append(G if r == r_max else F.pad(G, (0, r_max - r, 0, r_max - r)))
    G = (stacks[0] if len(stacks) == 1 else torch.cat(stacks)).double()
    e_X = torch.stack([e_Xs[i] for i in order]).double()
    finite = torch.isfinite(G).all(dim=(1, 2)) & torch.isfinite(e_X) & (e_X > 0)
    G = torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0)
    G = 0.5 * (G + G.transpose(1, 2))
    big = 1.0 + G.abs().sum(dim=(1, 2))
    G = G - torch.diag_embed(host_t[:, 3:] * big[:, None])  # the padded block: -big I
    theta, W = torch.linalg.eigh(G)
    theta, W = theta.flip(1).clamp_min(0.0), W.flip(2).float()
    hits = theta.cumsum(1) >= (host_t[:, 0] * e_X)[:, None]  # monotone: a suffix
    r_own = host_t[:, 2].long()
    r_sel = torch.maximum((r_max + 1) - hits.sum(1), host_t[:, 1].long())
    r_new = torch.where(finite & hits[:, -1], torch.minimum(r_sel, r_own), r_own)
    Ws = [W[slot[i], : g.shape[0], : g.shape[0]] for i, g in enumerate(grams)]
    return Ws, r_new, slot
