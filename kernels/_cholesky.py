"""The r x r fp64 step of CholeskyQR2, blocked: one program per site, no r x r register tile.

Each factor mode writes L^{-1} = R^{-T} (fp64, lower triangular) for the apply kernel, never
R itself (R's rows live in a scratch buffer while the factor runs).

`_orth_factor_kernel` reads the site's summed Gram (the Gram and apply kernels sum their
per-chunk partials in chunk order) and factors it (MODE "plain": in place, reading each
block at or right of the diagonal once) or the Gram of the column-scaled, completed basis
(MODE "repair": mixed from A^T A, Z^T A and Z^T Z into a per-site scratch, those blocks only):
- "repair": column scaling, completion of dead and degenerate columns, and the first
  Cholesky factor R1 (docs/design.md §2.6, matching laser_triton.reference.orthonormalize);
- "plain": the second factor R2 of CholeskyQR2 from the Gram of Q1.
`ok` is decided where the final Q's Gram is summed (_orth_kernels.py, CHECK).

The factor is left-looking and blocked by PB = 16 rows (`_factor_blocked`): per row panel k,
the updates from the panels above are tl.dot products (fp64, tensor cores on sm_90), then a
PB x PB diagonal block is factored and inverted by four 4-column pivot blocks whose rows go
through the block's own place in the scratch (`_small_factor`: loads instead of the shuffle
trees that extracting a row from a register tile costs), then R's row panel and L^{-1}'s row
panel are products with that inverse. A block barrier ends each panel (the next panel reads
this one's rows back from the scratch, which stays in L1/L2), instead of r serial full-tile
steps with 5-8 barriers each and an R_PAD x R_PAD fp64 tile in registers (128 KB at
r = 128: the old kernel spilled).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..numerics import DEGENERATE_REL as _DEGENERATE_REL

EPS64 = tl.constexpr(2.220446049250313e-16)  # float64 machine epsilon (shift of the Gram)
TINY32 = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32: zero-column cutoff
DEGENERATE_REL = tl.constexpr(_DEGENERATE_REL)  # shared with the reference (numerics)
PANEL = 16  # PB: rows per panel (tl.dot needs >= 16)


@triton.jit
def _rsqrt_or_zero(x):
    """(1/sqrt(x), 0) for x > 0, else (0, 1): a failed pivot."""
    good = x > 0  # NaN-safe
    return tl.where(good, tl.math.rsqrt(tl.where(good, x, 1.0)), 0.0), tl.where(good, 0, 1)


@triton.jit
def _small_factor(W, ws, ts, dg, R_PAD: tl.constexpr, PB: tl.constexpr):
    """T = Rkk^{-T} (lower) and the failed pivots of a symmetric PB x PB block W = Rkk^T Rkk;
    Rkk's rows go to `ws`, diag(Rkk) to `dg` (ws, ts: the block's place in R's and L^{-1}'s
    scratch, row stride R_PAD; ts holds T's rows while they are made).

    Right-looking by 4 columns: the rows of W and T below the finished ones go to the
    scratch, the pivot block's 4 rows come back as vectors (W's twice: along the columns,
    and along the rows for the multipliers) with its 10 entries as scalars; the 4 x 4
    Cholesky in scalars (rsqrt), R's and T's 4 rows as vectors (stored), then a rank-4
    update of W and T whose multipliers L[i, a] = R[a, i] follow R's recurrence on the rows
    loaded as columns. One store -> load round trip per 4 columns; loads from the block's
    own scratch (L1) replace the shuffle trees that extracting a row from a register tile
    costs (Triton has no register indexing), and no tile is assembled from rows. A non-positive pivot (a numerically
    dependent column; NaN too) counts as failed and gets a zero row, so later columns are
    factored as if that column were absent.
    """
    i = tl.arange(0, PB)
    ri = i[:, None]  # (PB, 1)
    ci = i[None, :]  # (1, PB)
    T = tl.where(ri == ci, 1.0, 0.0).to(tl.float64)
    failed = 0
    for jb in tl.static_range(0, PB, 4):
        tl.store(ws + ri * R_PAD + ci, W, mask=ri >= jb)  # rows above: R's, final
        tl.store(ts + ri * R_PAD + ci, T, mask=ri >= jb)
        tl.debug_barrier()
        # w*, t*: (1, PB) rows jb..jb+3 of W and T; u*: (PB, 1) W's rows as columns
        w0 = tl.load(ws + jb * R_PAD + ci)
        w1 = tl.load(ws + (jb + 1) * R_PAD + ci)
        w2 = tl.load(ws + (jb + 2) * R_PAD + ci)
        w3 = tl.load(ws + (jb + 3) * R_PAD + ci)
        t0 = tl.load(ts + jb * R_PAD + ci)
        t1 = tl.load(ts + (jb + 1) * R_PAD + ci)
        t2 = tl.load(ts + (jb + 2) * R_PAD + ci)
        t3 = tl.load(ts + (jb + 3) * R_PAD + ci)
        a00 = tl.load(ws + jb * R_PAD + jb)
        a01 = tl.load(ws + jb * R_PAD + jb + 1)
        a02 = tl.load(ws + jb * R_PAD + jb + 2)
        a03 = tl.load(ws + jb * R_PAD + jb + 3)
        a11 = tl.load(ws + (jb + 1) * R_PAD + jb + 1)
        a12 = tl.load(ws + (jb + 1) * R_PAD + jb + 2)
        a13 = tl.load(ws + (jb + 1) * R_PAD + jb + 3)
        a22 = tl.load(ws + (jb + 2) * R_PAD + jb + 2)
        a23 = tl.load(ws + (jb + 2) * R_PAD + jb + 3)
        a33 = tl.load(ws + (jb + 3) * R_PAD + jb + 3)
        if jb + 4 < PB:  # the same rows as columns: the multipliers' recurrence
            u0 = tl.load(ws + jb * R_PAD + ri, mask=ri >= jb + 4, other=0.0)
            u1 = tl.load(ws + (jb + 1) * R_PAD + ri, mask=ri >= jb + 4, other=0.0)
            u2 = tl.load(ws + (jb + 2) * R_PAD + ri, mask=ri >= jb + 4, other=0.0)
            u3 = tl.load(ws + (jb + 3) * R_PAD + ri, mask=ri >= jb + 4, other=0.0)
        tl.debug_barrier()  # every thread has its rows before they are overwritten
        # the 4 x 4 pivot block's Cholesky, in scalars
        s0, f0 = _rsqrt_or_zero(a00)
        r01 = a01 * s0
        r02 = a02 * s0
        r03 = a03 * s0
        b11 = a11 - r01 * r01
        s1, f1 = _rsqrt_or_zero(b11)
        r12 = (a12 - r01 * r02) * s1
        r13 = (a13 - r01 * r03) * s1
        b22 = a22 - r02 * r02 - r12 * r12
        s2, f2 = _rsqrt_or_zero(b22)
        r23 = (a23 - r02 * r03 - r12 * r13) * s2
        b33 = a33 - r03 * r03 - r13 * r13 - r23 * r23
        s3, f3 = _rsqrt_or_zero(b33)
        failed += f0 + f1 + f2 + f3
        tl.store(dg + jb, a00 * s0)
        tl.store(dg + jb + 1, b11 * s1)
        tl.store(dg + jb + 2, b22 * s2)
        tl.store(dg + jb + 3, b33 * s3)
        # R's rows jb..jb+3 and L^{-1}'s, as vectors over columns
        R0 = w0 * s0
        R1 = (w1 - r01 * R0) * s1
        R2 = (w2 - r02 * R0 - r12 * R1) * s2
        R3 = (w3 - r03 * R0 - r13 * R1 - r23 * R2) * s3
        T0 = t0 * s0
        T1 = (t1 - r01 * T0) * s1
        T2 = (t2 - r02 * T0 - r12 * T1) * s2
        T3 = (t3 - r03 * T0 - r13 * T1 - r23 * T2) * s3
        tl.store(ws + jb * R_PAD + ci, tl.where(ci >= jb, R0, 0.0))
        tl.store(ws + (jb + 1) * R_PAD + ci, tl.where(ci >= jb + 1, R1, 0.0))
        tl.store(ws + (jb + 2) * R_PAD + ci, tl.where(ci >= jb + 2, R2, 0.0))
        tl.store(ws + (jb + 3) * R_PAD + ci, tl.where(ci >= jb + 3, R3, 0.0))
        tl.store(ts + jb * R_PAD + ci, T0)
        tl.store(ts + (jb + 1) * R_PAD + ci, T1)
        tl.store(ts + (jb + 2) * R_PAD + ci, T2)
        tl.store(ts + (jb + 3) * R_PAD + ci, T3)
        if jb + 4 < PB:
            # rank-4 update of the rows below the block: the multipliers L[i, a] = R[a, i]
            # (m*: (PB, 1), zero above row jb + 4) by R's recurrence on the rows as columns
            m0 = u0 * s0
            W -= m0 * R0
            T -= m0 * T0
            m1 = (u1 - r01 * m0) * s1
            W -= m1 * R1
            T -= m1 * T1
            m2 = (u2 - r02 * m0 - r12 * m1) * s2
            W -= m2 * R2
            T -= m2 * T2
            m3 = (u3 - r03 * m0 - r13 * m1 - r23 * m2) * s3
            W -= m3 * R3
            T -= m3 * T3
    tl.debug_barrier()
    T = tl.load(ts + ri * R_PAD + ci)
    tl.debug_barrier()  # read before the panel's L^{-1} rows overwrite the scratch
    return T, failed


@triton.jit
def _factor_blocked(gram, shift, rs_ptr, li_ptr, dg_ptr, r, R_PAD: tl.constexpr,
                    PB: tl.constexpr, KC: tl.constexpr, CB: tl.constexpr):
    """R^T R = G (upper R) and L^{-1} = R^{-T} for one site, left-looking by PB-row panels.

    gram: the site's R_PAD x R_PAD Gram, read block by block where the factor needs it (the
    diagonal block and the blocks right of it, each once) and shifted there (`_gram_block`);
    rs: scratch for R's rows; li: L^{-1} (every entry written: lower triangular, identity on
    the padded rows up to the panel boundary, zero beyond); dg: diag(R). Returns the failed
    pivots.
    Panel k (rows k0..k0+PB): W = G[k, :] - R[:k0, k]^T R[:k0, :], V = E_k - R[:k0, k]^T
    L^{-1}[:k0, :], then R[k, :] = T W and L^{-1}[k, :] = T V with T = Rkk^{-T}.
    """
    pb = tl.arange(0, PB)
    kc = tl.arange(0, KC)
    cb = tl.arange(0, CB)
    n_act = tl.cdiv(r, PB) * PB  # rows and columns factored (identity beyond r)
    failed = 0
    for k0 in range(0, n_act, PB):
        rows = k0 + pb
        W = _gram_block(gram, rows, rows, shift, r, R_PAD)  # (PB, PB) fp64: G[k, k]
        for i0 in range(0, k0, KC):
            ii = i0 + kc
            rc = tl.load(rs_ptr + ii[:, None] * R_PAD + rows[None, :], mask=ii[:, None] < k0,
                         other=0.0)  # (KC, PB): R[ii, panel columns]
            W = tl.dot(-tl.trans(rc), rc, W, out_dtype=tl.float64)
        # T: (PB, PB) R[k, k]^{-T}; R[k, k] and its diagonal are stored
        T, f = _small_factor(W, rs_ptr + k0 * R_PAD + k0, li_ptr + k0 * R_PAD + k0, dg_ptr + k0,
                             R_PAD, PB)
        failed += f
        for c0 in range(k0 + PB, n_act, CB):  # R's row panel right of the diagonal block
            cc = c0 + cb
            # Wc: (PB, CB) fp64, G[k, cc] minus the panels above; rr: (KC, CB) R[ii, cc]
            # (cc < n_act <= R_PAD: CB divides PB's multiples)
            Wc = _gram_block(gram, rows, cc, shift, r, R_PAD)
            for i0 in range(0, k0, KC):
                ii = i0 + kc
                i_ok = ii[:, None] < k0
                rc = tl.load(rs_ptr + ii[:, None] * R_PAD + rows[None, :], mask=i_ok, other=0.0)
                rr = tl.load(rs_ptr + ii[:, None] * R_PAD + cc[None, :], mask=i_ok, other=0.0)
                Wc = tl.dot(-tl.trans(rc), rr, Wc, out_dtype=tl.float64)
            tl.store(rs_ptr + rows[:, None] * R_PAD + cc[None, :], tl.dot(T, Wc, out_dtype=tl.float64))
        for c0 in range(0, k0 + PB, CB):  # L^{-1}'s row panel up to its diagonal block
            cc = c0 + cb
            # V: (PB, CB) fp64, E_k[:, cc] minus the panels above; lr: (KC, CB) L^{-1}[ii, cc]
            V = tl.where(cc[None, :] == rows[:, None], 1.0, 0.0).to(tl.float64)
            # L^{-1}[ii, cc] = 0 unless cc <= ii: rows from c0 on contribute.
            for i0 in range(c0 // KC * KC, k0, KC):
                ii = i0 + kc
                i_ok = ii[:, None] < k0
                rc = tl.load(rs_ptr + ii[:, None] * R_PAD + rows[None, :], mask=i_ok, other=0.0)
                lr = tl.load(li_ptr + ii[:, None] * R_PAD + cc[None, :], mask=i_ok, other=0.0)
                V = tl.dot(-tl.trans(rc), lr, V, out_dtype=tl.float64)
            tl.store(li_ptr + rows[:, None] * R_PAD + cc[None, :], tl.dot(T, V, out_dtype=tl.float64))
        zero = tl.zeros((PB, CB), tl.float64)
        for c0 in range(k0 + PB, R_PAD, CB):  # right of the diagonal block L^{-1} is 0
            tl.store(li_ptr + rows[:, None] * R_PAD + (c0 + cb)[None, :], zero)
        tl.debug_barrier()  # this panel's rows are visible to the next panel's loads
    zero = tl.zeros((PB, CB), tl.float64)
    for k0 in range(n_act, R_PAD, PB):  # rows beyond the factored block: L^{-1} = 0 there
        for c0 in range(0, R_PAD, CB):
            tl.store(li_ptr + (k0 + pb)[:, None] * R_PAD + (c0 + cb)[None, :], zero)
    tl.debug_barrier()
    return failed


@triton.jit
def _sum_tile(ptr, s, n_chunk, offs, R_PAD: tl.constexpr):
    """Entries `offs` (offsets in one R_PAD x R_PAD tile) of site s's summed Gram: the Gram
    and apply kernels leave the chunk-order sum of the n_chunk partials in chunk 0's slot."""
    return tl.load(ptr + s.to(tl.int64) * n_chunk * R_PAD * R_PAD + offs)


@triton.jit
def _gram_block(gram, rows, cols, shift, r, R_PAD: tl.constexpr):
    """Block (rows, cols) of the Gram to factor: the site's Gram plus `shift` on the
    diagonal, identity outside the leading r x r block."""
    G = tl.load(gram + rows[:, None] * R_PAD + cols[None, :])
    inside = (rows[:, None] < r) & (cols[None, :] < r)
    eye = rows[:, None] == cols[None, :]
    return tl.where(inside, G + tl.where(eye, shift, 0.0), tl.where(eye, 1.0, 0.0))


@triton.jit(noinline=True)
def _mix_gram(g_ptr, za_ptr, zz_ptr, scale_ptr, gs_ptr, s, n_chunk, r, R_PAD: tl.constexpr,
              PB: tl.constexpr, CB: tl.constexpr):
    """The Gram of M (M_j = A_j * scale_j, or Z_j where scale_j < 0) from the summed A^T A,
    Z^T A and Z^T Z, into the site's scratch `gs` in (PB, CB) tiles: only the tiles the
    factor reads (at or right of the diagonal, inside the factored rows). Returns its trace
    (inside r x r; the factor's shift is proportional to it)."""
    idx = tl.arange(0, R_PAD)
    sc = tl.load(scale_ptr + s * R_PAD + idx)
    use = sc > 0
    inv_n = tl.where(use, sc, 0.0)
    diag_g = _diag_of_sum(g_ptr, s, n_chunk, R_PAD)
    diag_zz = tl.load(zz_ptr + s.to(tl.int64) * R_PAD * R_PAD + idx * (R_PAD + 1))
    trace = tl.sum(tl.where(idx < r, tl.where(use, diag_g * inv_n * inv_n, diag_zz), 0.0), axis=0)
    n_act = tl.cdiv(r, PB) * PB
    for k0 in range(0, n_act, PB):
        rows = k0 + tl.arange(0, PB)
        sc_i = tl.load(scale_ptr + s * R_PAD + rows)[:, None]
        ua_i = sc_i > 0
        for c0 in range(k0 // CB * CB, n_act, CB):
            cols = c0 + tl.arange(0, CB)
            offs = rows[:, None] * R_PAD + cols[None, :]
            sc_j = tl.load(scale_ptr + s * R_PAD + cols)[None, :]
            ua_j = sc_j > 0
            G = tl.where(ua_i & ua_j, _sum_tile(g_ptr, s, n_chunk, offs, R_PAD) * sc_i * sc_j,
                         0.0)
            G += tl.where(ua_j & ~ua_i, _sum_tile(za_ptr, s, n_chunk, offs, R_PAD) * sc_j, 0.0)
            G += tl.where(ua_i & ~ua_j, _sum_tile(  # A_i . Z_j = (Z^T A)[j, i]
                za_ptr, s, n_chunk, cols[None, :] * R_PAD + rows[:, None], R_PAD) * sc_i, 0.0)
            zz = tl.load(zz_ptr + s.to(tl.int64) * R_PAD * R_PAD + offs)
            G += tl.where(~ua_i & ~ua_j, zz, 0.0)
            tl.store(gs_ptr + s.to(tl.int64) * R_PAD * R_PAD + offs, G)
    tl.debug_barrier()  # the factor reads these rows back
    return trace


@triton.jit
def _orth_factor_kernel(
    g_ptr, za_ptr, zz_ptr, nf_ptr, meta_ptr, linv_ptr, scale_ptr, info_ptr,
    gs_ptr, rs_ptr, dg_ptr, n_chunk,
    MODE: tl.constexpr, R_PAD: tl.constexpr, PB: tl.constexpr, KC: tl.constexpr,
    CB: tl.constexpr,
):
    """For site s: its summed Gram (chunk 0's slot), then by MODE L^{-1} = R^{-T} of chol(G)
    ("repair": of the scaled, completed Gram; "plain").
    gs, rs: (R_PAD, R_PAD) fp64 scratch per site ("repair": the Gram of the scaled, completed
    M; R's rows); dg: (R_PAD,) diag(R). "plain" factors the summed Gram in place."""
    s = tl.program_id(0)
    idx = tl.arange(0, R_PAD)
    r = tl.load(meta_ptr + s * 3 + 2).to(tl.int32)
    site = s.to(tl.int64) * R_PAD * R_PAD
    gs, rs, li = gs_ptr + site, rs_ptr + site, linv_ptr + site
    dg = dg_ptr + s.to(tl.int64) * R_PAD
    diag_g = _diag_of_sum(g_ptr, s, n_chunk, R_PAD)
    if MODE == "repair":
        nonfinite = tl.load(nf_ptr + s.to(tl.int64) * n_chunk * R_PAD + idx)  # summed
        # 1. Column scaling: unit columns remove the sigma_j^2 spread of power-iteration
        #    columns. Zero or non-finite columns are dead and take completion directions.
        norms = tl.sqrt(diag_g)
        live = (nonfinite == 0) & (norms > TINY32) & (idx < r)
        # scale > 0: M_j = A_j * scale_j; scale = -1: M_j = Z_j (read by the apply kernel).
        tl.store(scale_ptr + s * R_PAD + idx, tl.where(live, 1.0 / tl.where(live, norms, 1.0),
                                                       -1.0))
        tl.debug_barrier()
        redo = r > 0
        failed = 0
        for attempt in range(2):  # a loop, so the factor is compiled once
            if redo:
                # What the factor needs is reloaded, not held in registers across it.
                trace = _mix_gram(g_ptr, za_ptr, zz_ptr, scale_ptr, gs_ptr, s, n_chunk, r, R_PAD,
                                  PB, 32 if R_PAD >= 32 else R_PAD)  # 16 x 32 tiles
                failed = _factor_blocked(gs, EPS64 * r * trace, rs, li, dg, r, R_PAD, PB, KC, CB)
                sc = tl.load(scale_ptr + s * R_PAD + idx)  # reloaded: not live across the factor
                use = sc > 0
                inv_n = tl.where(use, sc, 0.0)
                # 2. After the first factor, a column whose new direction is below
                #    DEGENERATE_REL of its norm is replaced too; 3. then the first CholeskyQR
                #    factor of the repaired M (without replacements it is the one just made).
                dg_abs = tl.abs(tl.load(dg + idx, mask=idx < r, other=0.0))
                use_a = use & ((dg_abs > DEGENERATE_REL) | (attempt > 0))
                redo = tl.sum((use_a != use).to(tl.int32), axis=0) > 0
                tl.store(scale_ptr + s * R_PAD + idx, tl.where(use_a, inv_n, -1.0))
                tl.debug_barrier()
        tl.store(info_ptr + s * 2 + 0, failed)
    elif MODE == "plain":
        trace = tl.sum(tl.where(idx < r, diag_g, 0.0), axis=0)
        failed = _factor_blocked(g_ptr + s.to(tl.int64) * n_chunk * R_PAD * R_PAD,
                                 EPS64 * r * trace, rs, li, dg, r, R_PAD, PB, KC, CB)
        tl.store(info_ptr + s * 2 + 1, failed)


@triton.jit
def _diag_of_sum(ptr, s, n_chunk, R_PAD: tl.constexpr):
    """Diagonal (R_PAD,) of site s's summed Gram."""
    idx = tl.arange(0, R_PAD)
    return _sum_tile(ptr, s, n_chunk, idx * (R_PAD + 1), R_PAD)
