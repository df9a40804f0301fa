"""The r x r fp64 step of CholeskyQR2: one program per site, the factor held in registers.

Each factor mode writes R^{-1} (fp64) for the apply kernel, never R itself.

`_orth_factor_kernel` sums the per-chunk Gram partials in a fixed order and then, by MODE:
- "repair": column scaling, completion of dead and degenerate columns, and the first
  Cholesky factor R1 (docs/design.md §2.6, matching laser_triton.reference.orthonormalize);
- "plain": the second factor R2 of CholeskyQR2 from the Gram of Q1;
- "check": `ok` from the Gram of the final Q (max |Q^T Q - I| <= 1e-4, finite, factors fine).
A right-looking Cholesky (and the inverse) of an R_PAD x R_PAD register tile cost r steps of O(R_PAD^2) work;
it is meant for r <= 64 (128 at most) on a GPU, where the tile stays in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..numerics import DEGENERATE_REL as _DEGENERATE_REL
from ..numerics import ORTH_TOL as _ORTH_TOL
from ._common import nan_max

EPS64 = tl.constexpr(2.220446049250313e-16)  # float64 machine epsilon (shift of the Gram)
TINY32 = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32: zero-column cutoff
DEGENERATE_REL = tl.constexpr(_DEGENERATE_REL)  # shared with the reference (numerics)
ORTH_TOL = tl.constexpr(_ORTH_TOL)  # `ok` threshold on max |Q^T Q - I|, likewise


@triton.jit
def _diag(G, R_PAD: tl.constexpr):
    idx = tl.arange(0, R_PAD)
    return tl.sum(tl.where(idx[:, None] == idx[None, :], G, 0.0), axis=0)


@triton.jit
def _cholesky_upper(G, r, R_PAD: tl.constexpr):
    """Upper R with R^T R = G + shift I on the leading r x r block; (R, failed steps).

    The shift eps64 * r * trace(G) is the reference's. A non-positive pivot (a numerically
    dependent column) counts as a failure and gets a zero row, so later columns are factored
    as if that column were absent; its zero diagonal marks it degenerate in "repair" mode.
    """
    idx = tl.arange(0, R_PAD)
    rows = idx[:, None]
    cols = idx[None, :]
    trace = tl.sum(tl.where(idx < r, _diag(G, R_PAD), 0.0), axis=0)
    G = G + tl.where((rows == cols) & (rows < r), EPS64 * r * trace, 0.0)
    R = tl.zeros((R_PAD, R_PAD), tl.float64)
    failed = 0
    for j in range(r):
        g_row = tl.sum(tl.where(rows == j, G, 0.0), axis=0)  # row j of the trailing matrix
        pivot = tl.sum(tl.where(idx == j, g_row, 0.0), axis=0)
        good = pivot > 0  # NaN-safe
        failed += tl.where(good, 0, 1)
        inv_sqrt = tl.where(good, 1.0 / tl.sqrt(tl.where(good, pivot, 1.0)), 0.0)
        r_row = tl.where(idx >= j, g_row * inv_sqrt, 0.0)
        R = tl.where(rows == j, r_row[None, :], R)
        G = G - r_row[:, None] * r_row[None, :]  # trailing update (row/col j become zero)
    return R, failed


@triton.jit
def _upper_inverse(R, r, R_PAD: tl.constexpr):
    """R^{-1} of an upper-triangular R (leading r x r block), by rows from the bottom:
    Rinv[i, :] = (e_i - sum_{k>i} R[i, k] Rinv[k, :]) / R[i, i]. Zero pivots give zero rows
    (only after a failed factor, when `ok` is False anyway)."""
    idx = tl.arange(0, R_PAD)
    rows = idx[:, None]
    Rinv = tl.zeros((R_PAD, R_PAD), tl.float64)
    for t in range(r):
        i = r - 1 - t
        r_row = tl.sum(tl.where(rows == i, R, 0.0), axis=0)  # R[i, :]
        pivot = tl.sum(tl.where(idx == i, r_row, 0.0), axis=0)
        inv_pivot = tl.where(pivot > 0, 1.0 / tl.where(pivot > 0, pivot, 1.0), 0.0)
        coupled = tl.sum(tl.where(idx[:, None] > i, r_row[:, None] * Rinv, 0.0), axis=0)
        row = (tl.where(idx == i, 1.0, 0.0) - coupled) * inv_pivot
        Rinv = tl.where(rows == i, row[None, :], Rinv)
    return Rinv


@triton.jit
def _gram_of_mix(G, ZA, ZZ, use_a, inv_n, r, R_PAD: tl.constexpr):
    """Gram of M with M_i = A_i * inv_n_i where use_a_i, else Z_i, from A^T A, Z^T A, Z^T Z."""
    idx = tl.arange(0, R_PAD)
    ua_i = use_a[:, None]
    ua_j = use_a[None, :]
    s_i = inv_n[:, None]
    s_j = inv_n[None, :]
    GM = tl.where(ua_i & ua_j, G * s_i * s_j,
                  tl.where(ua_j, ZA * s_j,  # Z_i . A_j / n_j
                           tl.where(ua_i, tl.trans(ZA) * s_i, ZZ)))  # A_i . Z_j / n_i | Z.Z
    inside = (idx[:, None] < r) & (idx[None, :] < r)
    return tl.where(inside, GM, 0.0)


@triton.jit
def _sum_partials(ptr, s, n_chunk, R_PAD: tl.constexpr):
    """Sum of the n_chunk R_PAD x R_PAD fp64 partials of site s, in chunk order."""
    idx = tl.arange(0, R_PAD)
    tile = ptr + s.to(tl.int64) * n_chunk * R_PAD * R_PAD + idx[:, None] * R_PAD + idx[None, :]
    acc = tl.zeros((R_PAD, R_PAD), tl.float64)
    for _ in range(n_chunk):
        acc += tl.load(tile)
        tile += R_PAD * R_PAD
    return acc


@triton.jit
def _orth_factor_kernel(
    g_ptr, za_ptr, zz_ptr, nf_ptr, meta_ptr, rinv_ptr, scale_ptr, info_ptr, ok_ptr, n_chunk,
    MODE: tl.constexpr, R_PAD: tl.constexpr,
):
    """For site s: G = sum of its Gram partials (R_PAD, R_PAD) fp64, then by MODE
    R^{-1} of chol(G) ("repair": of the scaled, completed Gram; "plain") or ok ("check")."""
    s = tl.program_id(0)
    idx = tl.arange(0, R_PAD)
    r = tl.load(meta_ptr + s * 3 + 2).to(tl.int32)
    G = _sum_partials(g_ptr, s, n_chunk, R_PAD)
    tile = s.to(tl.int64) * R_PAD * R_PAD + idx[:, None] * R_PAD + idx[None, :]
    if MODE == "repair":
        ZA = _sum_partials(za_ptr, s, n_chunk, R_PAD)
        ZZ = tl.load(zz_ptr + tile)
        nonfinite = tl.zeros((R_PAD,), tl.float32)
        nf = nf_ptr + s.to(tl.int64) * n_chunk * R_PAD + idx
        for _ in range(n_chunk):
            nonfinite += tl.load(nf)
            nf += R_PAD
        # 1. Column scaling: unit columns remove the sigma_j^2 spread of power-iteration
        #    columns. Zero or non-finite columns are dead and take completion directions.
        norms = tl.sqrt(_diag(G, R_PAD))
        live = (nonfinite == 0) & (norms > TINY32) & (idx < r)
        inv_n = tl.where(live, 1.0 / tl.where(live, norms, 1.0), 0.0)
        R0, _ = _cholesky_upper(_gram_of_mix(G, ZA, ZZ, live, inv_n, r, R_PAD), r, R_PAD)
        # 2. A column whose new direction is below DEGENERATE_REL of its norm is replaced too.
        use_a = live & (tl.abs(_diag(R0, R_PAD)) > DEGENERATE_REL)
        # 3. First CholeskyQR factor of the repaired, scaled matrix M.
        R, failed = _cholesky_upper(_gram_of_mix(G, ZA, ZZ, use_a, inv_n, r, R_PAD), r, R_PAD)
        tl.store(rinv_ptr + tile, _upper_inverse(R, r, R_PAD))
        # scale > 0: M_j = A_j * scale_j; scale = -1: M_j = Z_j (read by the apply kernel).
        tl.store(scale_ptr + s * R_PAD + idx, tl.where(use_a, inv_n, -1.0))
        tl.store(info_ptr + s * 2 + 0, failed)
    elif MODE == "plain":
        R, failed = _cholesky_upper(G, r, R_PAD)
        tl.store(rinv_ptr + tile, _upper_inverse(R, r, R_PAD))
        tl.store(info_ptr + s * 2 + 1, failed)
    else:  # "check": G is the Gram of the final Q
        inside = (idx[:, None] < r) & (idx[None, :] < r)
        dev = tl.where(inside, tl.abs(G - tl.where(idx[:, None] == idx[None, :], 1.0, 0.0)), 0.0)
        err = nan_max(nan_max(dev, 1), 0)
        fine = (tl.load(info_ptr + s * 2 + 0) == 0) & (tl.load(info_ptr + s * 2 + 1) == 0)
        tl.store(ok_ptr + s, fine & (err <= ORTH_TOL))  # NaN-safe: a NaN err is not ok

