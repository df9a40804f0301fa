"""The Triton kernels of orthonormalize (the launcher, plan and specs are in orthonormalize.py).

orth_gram: per site s and row chunk, the partial Grams A^T A (and Z^T A, column norms) of the
column-scaled basis in fp64; the last chunk program to finish sums the chunk partials in a
fixed order (deterministic) into the first. orth_apply: dst = src R^{-1} in fp64 per row chunk
(with the completion columns Z where the factor repaired), and, up to APPLY_GRAM_MAX, the
Gram of dst the same way. The factor between them is _cholesky.py. The program that sums the
final Q's Gram also decides `ok` (CHECK), so no launch of its own checks it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..numerics import ORTH_TOL as _ORTH_TOL
from ._common import nan_max

ORTH_TOL = tl.constexpr(_ORTH_TOL)  # `ok` threshold on max |Q^T Q - I| (shared with reference)


@triton.jit
def _orth_gram_kernel(
    a_ptr, z_ptr, meta_ptr, g_ptr, za_ptr, nf_ptr, count_ptr, info_ptr, ok_ptr, err_ptr,
    rows_per_chunk,
    WITH_Z: tl.constexpr, R_PAD: tl.constexpr, GT: tl.constexpr, BLOCK_D: tl.constexpr,
    CHECK: tl.constexpr,
):
    """G_part[s, chunk][ci, cj] = A[chunk, ci]^T A[chunk, cj] (and Z^T A with WITH_Z) in fp64,
    for one row chunk of site s and one (GT, GT) tile (ci, cj) of its (R_PAD, R_PAD) Gram;
    non-finite entries count per column (nf) and enter the Gram as zeros. The last of the
    site's chunk programs for a tile (an atomic counter) sums the partials in chunk order into
    chunk 0's slot, the one the factor reads (deterministic: the order never changes).
    CHECK (the Gram of the final Q): that program also writes its tile's max |G - I| to
    err[s, tile], and the last of the site's tile programs (a second counter) writes ok[s]."""
    s = tl.program_id(0)
    chunk = tl.program_id(1)
    NT: tl.constexpr = R_PAD // GT
    ci = (tl.program_id(2) // NT) * GT + tl.arange(0, GT)
    cj = (tl.program_id(2) % NT) * GT + tl.arange(0, GT)
    off = tl.load(meta_ptr + s * 3)
    D = tl.load(meta_ptr + s * 3 + 1).to(tl.int32)
    r = tl.load(meta_ptr + s * 3 + 2).to(tl.int32)
    row_end = tl.minimum(chunk * rows_per_chunk + rows_per_chunk, D)
    aa = tl.zeros((GT, GT), tl.float64)  # aa, za: (GT, GT) fp64 Gram tiles
    za = tl.zeros((GT, GT), tl.float64)
    nonfinite = tl.zeros((GT,), tl.float32)
    for d0 in range(chunk * rows_per_chunk, row_end, BLOCK_D):
        rows = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        base = off + rows[:, None] * r
        mi = (rows[:, None] < row_end) & (ci[None, :] < r)
        mj = (rows[:, None] < row_end) & (cj[None, :] < r)
        # ai, aj: (BLOCK_D, GT) fp32, columns ci and cj of the site's rows d0 .. d0 + BLOCK_D
        ai = tl.load(a_ptr + base + ci[None, :], mask=mi, other=0.0)
        aj = tl.load(a_ptr + base + cj[None, :], mask=mj, other=0.0)
        fin_i = tl.abs(ai) <= 3.4028234663852886e38  # False for NaN and +-inf
        nonfinite += tl.sum(tl.where(fin_i, 0.0, 1.0), axis=0)
        ai = tl.where(fin_i, ai, 0.0).to(tl.float64)  # non-finite columns are dead anyway
        aj = tl.where(tl.abs(aj) <= 3.4028234663852886e38, aj, 0.0).to(tl.float64)
        aa = tl.dot(tl.trans(ai), aj, aa, out_dtype=tl.float64)  # fp32 x fp32 products are exact in fp64
        if WITH_Z:
            zi = tl.load(z_ptr + base + ci[None, :], mask=mi, other=0.0)
            za = tl.dot(tl.trans(zi), aj, za, out_dtype=tl.float64)
    part = (s * tl.num_programs(1) + chunk).to(tl.int64) * R_PAD * R_PAD
    tile = part + ci[:, None] * R_PAD + cj[None, :]
    tl.store(g_ptr + tile, aa)
    if WITH_Z:
        tl.store(za_ptr + tile, za)
        if tl.program_id(2) % NT == 0:
            tl.store(nf_ptr + (s * tl.num_programs(1) + chunk).to(tl.int64) * R_PAD + ci, nonfinite)
    n_chunk = tl.num_programs(1)
    tl.debug_barrier()  # every thread's partial is written before the counter moves
    counter = count_ptr + s * tl.num_programs(2) + tl.program_id(2)
    if tl.atomic_add(counter, 1, sem="acq_rel") == n_chunk - 1:
        first = s.to(tl.int64) * n_chunk * R_PAD * R_PAD + ci[:, None] * R_PAD + cj[None, :]
        g = _sum_into_first(g_ptr, first, n_chunk, R_PAD * R_PAD)
        if CHECK:
            n_tiles: tl.constexpr = NT * NT
            tl.store(err_ptr + s * n_tiles + tl.program_id(2), _orth_err(g, ci, cj, r))
            tl.debug_barrier()  # the tile's err is written before the site counter moves
            site_counter = count_ptr + tl.num_programs(0) * n_tiles + s
            if tl.atomic_add(site_counter, 1, sem="acq_rel") == n_tiles - 1:
                errs = tl.load(err_ptr + s * n_tiles + tl.arange(0, n_tiles), volatile=True)
                _store_ok(info_ptr, ok_ptr, s, nan_max(errs, 0))
                tl.store(site_counter, 0)
        if WITH_Z:
            _sum_into_first(za_ptr, first, n_chunk, R_PAD * R_PAD)
            if tl.program_id(2) % NT == 0:
                _sum_into_first(nf_ptr, s.to(tl.int64) * n_chunk * R_PAD + ci, n_chunk, R_PAD)
        tl.store(counter, 0)  # ready for the next launch on this stream (no memset)


@triton.jit
def _sum_into_first(ptr, first, n_chunk, stride):
    """ptr[first] = sum over c of ptr[first + c * stride], added in chunk order; returned."""
    acc = tl.load(ptr + first, volatile=True)
    for c in range(1, n_chunk):
        acc += tl.load(ptr + first + c * stride, volatile=True)
    tl.store(ptr + first, acc)
    return acc


@triton.jit
def _orth_err(g, ci, cj, r):
    """max |G - I| over the entries (ci, cj) of a tile of Q^T Q inside r x r (NaN if any is)."""
    inside = (ci[:, None] < r) & (cj[None, :] < r)
    dev = tl.where(inside, tl.abs(g - tl.where(ci[:, None] == cj[None, :], 1.0, 0.0)), 0.0)
    return nan_max(nan_max(dev, 1), 0)


@triton.jit
def _store_ok(info_ptr, ok_ptr, s, err):
    """ok[s]: both factors succeeded and max |Q^T Q - I| <= ORTH_TOL (a NaN err is not ok)."""
    fine = (tl.load(info_ptr + s * 2 + 0) == 0) & (tl.load(info_ptr + s * 2 + 1) == 0)
    tl.store(ok_ptr + s, fine & (err <= ORTH_TOL))


@triton.jit
def _orth_apply_kernel(
    src_ptr, z_ptr, meta_ptr, linv_ptr, scale_ptr, dst_ptr, g_ptr, count_ptr, info_ptr, ok_ptr,
    rows_per_chunk,
    REPAIR: tl.constexpr, R_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    WITH_GRAM: tl.constexpr, CHECK: tl.constexpr,
):
    """dst = M R^{-1} (fp64 math, fp32 store) for one row chunk, plus (WITH_GRAM) the fp64
    Gram of dst (an R_PAD x R_PAD register tile: up to R_PAD = 64; beyond, the launcher runs
    the Gram kernel on dst instead).

    M, dst: (D, r) per site in the flat buffers; L^{-1} = R^{-T}: (R_PAD, R_PAD) fp64 per
    site (the factor's output; read transposed).

    With REPAIR, M is the scaled and completed input: m_j = a_j * scale_j, or z_j where
    scale_j < 0. The rank dimension is walked in BLOCK_K chunks; the output row tile holds
    all R_PAD columns so its Gram (for the next factor step) is formed on the spot.
    CHECK (WITH_GRAM, the final Q): the program that sums the Gram also writes ok[s].
    """
    s = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    off = tl.load(meta_ptr + s * 3)
    D = tl.load(meta_ptr + s * 3 + 1).to(tl.int32)
    r = tl.load(meta_ptr + s * 3 + 2).to(tl.int32)
    linv_site = linv_ptr + s.to(tl.int64) * R_PAD * R_PAD
    row_end = tl.minimum(chunk * rows_per_chunk + rows_per_chunk, D)
    gram = tl.zeros((R_PAD if WITH_GRAM else 16, R_PAD if WITH_GRAM else 16), tl.float64)
    for d0 in range(chunk * rows_per_chunk, row_end, BLOCK_D):
        rows = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        row_ok = rows < row_end
        q = tl.zeros((BLOCK_D, R_PAD), tl.float64)  # q: (BLOCK_D, R_PAD), rows of dst
        for k0 in range(0, r, BLOCK_K):
            kk = k0 + offs_k
            mask = row_ok[:, None] & (kk[None, :] < r)
            # m: (BLOCK_D, BLOCK_K) fp64, rank chunk kk of M; rinv: (BLOCK_K, R_PAD) rows of R^{-1}
            m = tl.load(src_ptr + off + rows[:, None] * r + kk[None, :], mask=mask,
                        other=0.0).to(tl.float64)
            if REPAIR:
                scale = tl.load(scale_ptr + s * R_PAD + kk, mask=kk < r, other=1.0)
                z = tl.load(z_ptr + off + rows[:, None] * r + kk[None, :], mask=mask, other=0.0)
                m = tl.where(scale[None, :] < 0, z, m * scale[None, :])
            rinv = tl.load(linv_site + cols[None, :] * R_PAD + kk[:, None])  # R^{-1}[kk, :]
            q = tl.dot(m, rinv, q, out_dtype=tl.float64)
        q = q.to(tl.float32)  # the stored basis; its Gram below is of exactly these values
        tl.store(dst_ptr + off + rows[:, None] * r + cols[None, :], q,
                 mask=row_ok[:, None] & (cols[None, :] < r))
        if WITH_GRAM:
            q64 = q.to(tl.float64)
            gram = tl.dot(tl.trans(q64), q64, gram, out_dtype=tl.float64)
    if WITH_GRAM:
        part = (s * tl.num_programs(1) + chunk).to(tl.int64) * R_PAD * R_PAD
        tl.store(g_ptr + part + cols[:, None] * R_PAD + cols[None, :], gram)
        n_chunk = tl.num_programs(1)
        tl.debug_barrier()  # as in the Gram kernel: the last chunk sums the partials in order
        if tl.atomic_add(count_ptr + s, 1, sem="acq_rel") == n_chunk - 1:
            first = s.to(tl.int64) * n_chunk * R_PAD * R_PAD + cols[:, None] * R_PAD + \
                cols[None, :]
            g = _sum_into_first(g_ptr, first, n_chunk, R_PAD * R_PAD)
            if CHECK:
                _store_ok(info_ptr, ok_ptr, s, _orth_err(g, cols, cols, r))
            tl.store(count_ptr + s, 0)
