"""compress_pass: C = X U, ||X||^2, ||C||^2, per-row error maxima and Y = X^T C (docs/design.md §6.1).

Two designs, picked per (D, r) by the config store (table `compress_path`):

- **fused** (one read of X): a persistent program keeps U (D x r, fp32) and its share of
  Y = X^T C (D x r, fp32) on chip, and streams row blocks of X: C_blk = X_blk U,
  Y += X_blk^T C_blk, plus the norms. Only while the D x r accumulator fits on chip.
- **split** (any D up to 8192, r up to 256): kernel 1 streams row blocks, loops over D in
  chunks for C = X U and the row norms, and writes C (plus an fp32 copy of C when need_y and
  C is stored narrower); kernel 2 reads X again, tiled over (row segment, D chunk), for
  Y = X^T C32.

Both write per-program partials (Y: one D x r slab per program or segment; scalars: 4 per
program) that a small kernel reduces in a fixed order, so results are bitwise repeatable.
`deterministic=False` uses fp32 atomics instead (faster, run-to-run different bits).
Products use an fp32 U at fp32-class accuracy (`_common.mma_fp32`; "ieee" by default).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..results import CompressOut
from ._common import (
    DTYPE_NAMES,
    INTERPRET,
    launch,
    mma_fp32,
    nan_max,
    new_buffer,
    num_sms,
    pow2,
    shrink_config,
)
from .configs import PATH_TABLE, get_store

__all__ = ["compress_pass", "FUSED_MAX_ELEMS", "choose_path"]

# The fused design holds U and the Y accumulator (each D_PAD x R_PAD fp32) per program.
FUSED_MAX_ELEMS = 16384
MAX_PARTIAL_ELEMS = 1 << 24  # cap on the Y partial slabs of the split design (64 MiB)
REDUCE_BLOCK = 1024


@triton.jit
def _row_stats(row_x, c, ex, ec, rel_max, c_amax):
    """Fold one row block into the running sums and maxima (NaN propagates into maxima):
    ex += ||x_i||^2, ec += ||c_i||^2, rel_max = max(rel_max, 1 - ||c_i||^2/||x_i||^2),
    c_amax = max(c_amax, max_k |c_ik|). row_x, ex, ec, rel_max, c_amax: (BLOCK_N,);
    c: (BLOCK_N, R_PAD)."""
    row_c = tl.sum(c * c, axis=1)
    # Relative projection error of a row: ||x - U U^T x||^2 / ||x||^2 = 1 - ||c||^2/||x||^2.
    has_x = row_x > 0
    rel = tl.where(has_x, tl.maximum(1.0 - row_c / tl.where(has_x, row_x, 1.0), 0.0), 0.0)
    ex += row_x
    ec += row_c
    rel_max = tl.maximum(rel_max, rel, propagate_nan=tl.PropagateNan.ALL)
    c_amax = tl.maximum(c_amax, nan_max(tl.abs(c), 1), propagate_nan=tl.PropagateNan.ALL)
    return ex, ec, rel_max, c_amax


@triton.jit
def _emit_stats(spart_ptr, pid, ex, ec, rel_max, c_amax, ATOMIC: tl.constexpr):
    """Scalars of one program: 4 partials (sum x^2, sum c^2, max rel, max |c|) or atomics."""
    s_ex = tl.sum(ex, axis=0)
    s_ec = tl.sum(ec, axis=0)
    m_rel = nan_max(rel_max, 0)
    m_c = nan_max(c_amax, 0)
    if ATOMIC:
        tl.atomic_add(spart_ptr + 0, s_ex)
        tl.atomic_add(spart_ptr + 1, s_ec)
        tl.atomic_max(spart_ptr + 2, m_rel)
        tl.atomic_max(spart_ptr + 3, m_c)
    else:
        tl.store(spart_ptr + pid * 4 + 0, s_ex)
        tl.store(spart_ptr + pid * 4 + 1, s_ec)
        tl.store(spart_ptr + pid * 4 + 2, m_rel)
        tl.store(spart_ptr + pid * 4 + 3, m_c)


@triton.jit
def _compress_fused_kernel(
    x_ptr, u_ptr, c_ptr, ypart_ptr, spart_ptr,
    N, D, R, stride_xn, stride_xd, stride_ud, stride_ur,
    NEED_Y: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr, X_IS_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """C = X U, Y_p = sum over its row blocks of X_blk^T C_blk, and row statistics, for the
    row blocks pid, pid + P, ... of one persistent program p (P = number of programs)."""
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_r = tl.arange(0, R_PAD)
    d_ok = offs_d < D
    r_ok = offs_r < R
    # U stays in registers for the whole program, in fp32 (a bf16 U would hide 1% errors).
    # u: (D_PAD, R_PAD) fp32; y_acc: (D_PAD, R_PAD) fp32; ex, ec, rel_max, c_amax: (BLOCK_N,)
    u = tl.load(u_ptr + offs_d[:, None] * stride_ud + offs_r[None, :] * stride_ur,
                mask=d_ok[:, None] & r_ok[None, :], other=0.0)
    y_acc = tl.zeros((D_PAD, R_PAD), tl.float32)
    ex = tl.zeros((BLOCK_N,), tl.float32)
    ec = tl.zeros((BLOCK_N,), tl.float32)
    rel_max = tl.zeros((BLOCK_N,), tl.float32)
    c_amax = tl.zeros((BLOCK_N,), tl.float32)
    # Persistent loop: program p takes row blocks p, p + P, p + 2P, ... (a fixed assignment).
    for blk in range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        rows = (blk * BLOCK_N + offs_n).to(tl.int64)
        n_ok = rows < N
        # x: (BLOCK_N, D_PAD) fp32, one row block; c = x u: (BLOCK_N, R_PAD) fp32
        x = tl.load(x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        c = mma_fp32(x, u, tl.zeros((BLOCK_N, R_PAD), tl.float32), PRECISION, X_IS_BF16,
                     INTERPRET)
        tl.store(c_ptr + rows[:, None] * R + offs_r[None, :], c.to(c_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & r_ok[None, :])
        ex, ec, rel_max, c_amax = _row_stats(tl.sum(x * x, axis=1), c, ex, ec, rel_max, c_amax)
        if NEED_Y:  # Y += X_blk^T C_blk with the fp32 C (before rounding to coeff_dtype)
            y_acc = mma_fp32(tl.trans(x), c, y_acc, PRECISION, X_IS_BF16, INTERPRET)
    if NEED_Y:
        y_offs = offs_d[:, None] * R + offs_r[None, :]
        y_mask = d_ok[:, None] & r_ok[None, :]
        if ATOMIC:
            tl.atomic_add(ypart_ptr + y_offs, y_acc, mask=y_mask)
        else:
            tl.store(ypart_ptr + pid.to(tl.int64) * D * R + y_offs, y_acc, mask=y_mask)
    _emit_stats(spart_ptr, pid, ex, ec, rel_max, c_amax, ATOMIC)


@triton.jit
def _compress_coeff_kernel(
    x_ptr, u_ptr, c_ptr, c32_ptr, spart_ptr,
    N, D, R, stride_xn, stride_xd, stride_ud, stride_ur,
    WRITE_C32: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    X_IS_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """C[blk] = X[blk] U (split path, kernel 1) and the row statistics of one row block,
    looping over D in BLOCK_D chunks."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, R_PAD)
    n_ok = rows < N
    r_ok = offs_r < R
    c = tl.zeros((BLOCK_N, R_PAD), tl.float32)  # c: (BLOCK_N, R_PAD) fp32 accumulator
    row_x = tl.zeros((BLOCK_N,), tl.float32)  # ||x_i||^2 of the block's rows
    for d0 in range(0, D, BLOCK_D):  # C = sum over D chunks of X[:, chunk] U[chunk, :]
        dd = d0 + offs_d
        d_ok = dd < D
        # x: (BLOCK_N, BLOCK_D) fp32; u: (BLOCK_D, R_PAD) fp32, the matching rows of U
        x = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        u = tl.load(u_ptr + dd[:, None] * stride_ud + offs_r[None, :] * stride_ur,
                    mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        c = mma_fp32(x, u, c, PRECISION, X_IS_BF16, INTERPRET)
        row_x += tl.sum(x * x, axis=1)
    c_offs = rows[:, None] * R + offs_r[None, :]
    c_mask = n_ok[:, None] & r_ok[None, :]
    tl.store(c_ptr + c_offs, c.to(c_ptr.dtype.element_ty), mask=c_mask)
    if WRITE_C32:
        tl.store(c32_ptr + c_offs, c, mask=c_mask)
    zero = tl.zeros((BLOCK_N,), tl.float32)
    ex, ec, rel_max, c_amax = _row_stats(row_x, c, zero, zero, zero, zero)
    _emit_stats(spart_ptr, pid, ex, ec, rel_max, c_amax, ATOMIC)


@triton.jit
def _compress_y_kernel(
    x_ptr, c32_ptr, ypart_ptr,
    N, D, R, stride_xn, stride_xd, rows_per_seg,
    ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr, X_IS_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Y_seg[chunk] = X[seg, chunk]^T C32[seg] (split path, kernel 2) for one (row segment,
    D chunk) tile, C32 being the fp32 coefficients of kernel 1."""
    seg = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    d_ok = dd < D
    r_ok = offs_r < R
    row_end = tl.minimum(seg * rows_per_seg + rows_per_seg, N)
    acc = tl.zeros((BLOCK_D, R_PAD), tl.float32)  # acc: (BLOCK_D, R_PAD), this tile of Y
    for n0 in range(seg * rows_per_seg, row_end, BLOCK_N):  # Y[chunk] = X[seg, chunk]^T C[seg]
        rows = (n0 + offs_n).to(tl.int64)
        n_ok = rows < row_end
        # x: (BLOCK_N, BLOCK_D) fp32; c: (BLOCK_N, R_PAD) fp32
        x = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        c = tl.load(c32_ptr + rows[:, None] * R + offs_r[None, :],
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = mma_fp32(tl.trans(x), c, acc, PRECISION, X_IS_BF16, INTERPRET)
    y_offs = dd[:, None] * R + offs_r[None, :]
    y_mask = d_ok[:, None] & r_ok[None, :]
    if ATOMIC:
        tl.atomic_add(ypart_ptr + y_offs, acc, mask=y_mask)
    else:
        tl.store(ypart_ptr + seg.to(tl.int64) * D * R + y_offs, acc, mask=y_mask)


@triton.jit
def _reduce_kernel(ypart_ptr, y_ptr, n_ypart, DR, spart_ptr, n_spart, out_ptr,
                   NEED_Y: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    """Y = sum_p Ypart[p] (element-wise over the slabs, BLOCK elements per program) and, in
    program 0, (sum e_X, sum e_C, sqrt(max rel), max |c|) over the scalar partials, in a fixed
    order (bitwise repeatable)."""
    pid = tl.program_id(0)
    if NEED_Y:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < DR
        acc = tl.zeros((BLOCK,), tl.float32)
        slab = ypart_ptr + offs  # pointer arithmetic is 64-bit: no int32 overflow of p * DR
        for _ in range(n_ypart):
            acc += tl.load(slab, mask=ok, other=0.0)
            slab += DR
        tl.store(y_ptr + offs, acc, mask=ok)
    if pid == 0:
        ex = tl.zeros((BLOCK_S,), tl.float32)
        ec = tl.zeros((BLOCK_S,), tl.float32)
        rel = tl.zeros((BLOCK_S,), tl.float32)
        cm = tl.zeros((BLOCK_S,), tl.float32)
        # `s_ok`, not `ok`: reusing the name of the Y part's (BLOCK,) mask would make it a
        # loop-carried variable that changes shape, which compiled Triton rejects (the
        # interpreter does not; tests/test_sm90_compile.py compiles this kernel).
        for p0 in range(0, n_spart, BLOCK_S):
            idx = p0 + tl.arange(0, BLOCK_S)
            s_ok = idx < n_spart
            ex += tl.load(spart_ptr + idx * 4 + 0, mask=s_ok, other=0.0)
            ec += tl.load(spart_ptr + idx * 4 + 1, mask=s_ok, other=0.0)
            rel = tl.maximum(rel, tl.load(spart_ptr + idx * 4 + 2, mask=s_ok, other=0.0),
                             propagate_nan=tl.PropagateNan.ALL)
            cm = tl.maximum(cm, tl.load(spart_ptr + idx * 4 + 3, mask=s_ok, other=0.0),
                            propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + 0, tl.sum(ex, axis=0))
        tl.store(out_ptr + 1, tl.sum(ec, axis=0))
        tl.store(out_ptr + 2, tl.sqrt(nan_max(rel, 0)))
        tl.store(out_ptr + 3, nan_max(cm, 0))


def choose_path(D: int, r: int, dtype: str, device: torch.device) -> str:
    """'fused' or 'split': the store's `compress_path` entry, else the size rule."""
    path = get_store(device).lookup(PATH_TABLE, D, r, dtype)
    if path is None:
        path = "fused" if pow2(D) * pow2(r) <= FUSED_MAX_ELEMS else "split"
    return path


def compress_pass(X: torch.Tensor, U: torch.Tensor, need_y: bool = True,
                  coeff_dtype: torch.dtype | None = None, *,
                  deterministic: bool = True) -> CompressOut:
    """C = X U (coeff_dtype), e_X, e_C, Y = X^T C (fp32, or None), row_err_max, c_amax.

    X: (N, D) fp32/bf16/fp16, any strides. U: (D, r) fp32, any strides (torch.linalg.qr's
    column-major Q is fine). Matches `laser_triton.reference.compress_pass`. All results stay
    on the device; nothing synchronizes with the host.
    """
    if X.dim() != 2 or U.dim() != 2 or U.shape[0] != X.shape[1] or U.dtype != torch.float32:
        raise ValueError(f"compress_pass: X (N x D) and fp32 U (D x r) expected, got "
                         f"X {tuple(X.shape)}, U {tuple(U.shape)} {U.dtype}")
    if X.dtype not in DTYPE_NAMES or U.device != X.device:
        raise ValueError(f"compress_pass: X dtype {X.dtype}, devices {X.device}/{U.device}")
    coeff_dtype = X.dtype if coeff_dtype is None else coeff_dtype
    N, D = X.shape
    R = U.shape[1]
    dev, dname = X.device, DTYPE_NAMES[X.dtype]
    store = get_store(dev)
    atomic = not deterministic
    C = new_buffer((N, R), coeff_dtype, dev)
    common = dict(X_IS_BF16=X.dtype == torch.bfloat16, INTERPRET=INTERPRET, ATOMIC=atomic,
                  R_PAD=pow2(R))
    strides = (X.stride(0), X.stride(1), U.stride(0), U.stride(1))

    def y_buffer(n_slabs: int) -> torch.Tensor:
        if not need_y:
            return new_buffer((1,), torch.float32, dev)
        if atomic:
            return torch.zeros((D, R), dtype=torch.float32, device=dev)
        return new_buffer((n_slabs, D, R), torch.float32, dev)

    def stats_buffer(n_programs: int) -> torch.Tensor:
        if atomic:
            return torch.zeros(4, dtype=torch.float32, device=dev)
        return new_buffer((n_programs, 4), torch.float32, dev)

    def run_fused(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
        grid = (min(triton.cdiv(N, cfg["BLOCK_N"]), num_sms(dev) * cfg["PROGRAMS_PER_SM"]),)
        ypart, spart = y_buffer(grid[0]), stats_buffer(grid[0])
        # PROGRAMS_PER_SM sizes the grid only: the kernel does not take it, and the compiled
        # launcher rejects keywords it does not know (the interpreter drops them silently).
        kernel_cfg = {k: v for k, v in cfg.items() if k != "PROGRAMS_PER_SM"}
        _compress_fused_kernel[grid](X, U, C, ypart, spart, N, D, R, *strides, NEED_Y=need_y,
                                     D_PAD=pow2(D), **kernel_cfg, **common)
        return ypart, spart

    def run_coeff(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
        grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
        spart = stats_buffer(grid[0])
        _compress_coeff_kernel[grid](X, U, C, C32, spart, N, D, R, *strides,
                                     WRITE_C32=C32 is not C, **cfg, **common)
        return spart

    def run_y(cfg: dict) -> torch.Tensor:
        n_dt = triton.cdiv(D, cfg["BLOCK_D"])
        # Row segments: enough programs to fill the GPU, within the partial-slab budget.
        n_seg = max(1, min(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(2 * num_sms(dev), n_dt),
                           MAX_PARTIAL_ELEMS // (D * R)))
        rows_per_seg = triton.cdiv(triton.cdiv(N, n_seg), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        ypart = y_buffer(triton.cdiv(N, rows_per_seg))
        _compress_y_kernel[(triton.cdiv(N, rows_per_seg), n_dt)](
            X, C32, ypart, N, D, R, X.stride(0), X.stride(1), rows_per_seg, **cfg, **common)
        return ypart

    ypart = None
    if choose_path(D, R, dname, dev) == "fused":
        cfg = store.lookup("compress_fused", D, R, dname, N)
        try:
            ran, (ypart, spart) = launch("compress_fused", run_fused, cfg,
                                         lambda c: shrink_config(c, ("BLOCK_N",)))
            store.remember("compress_fused", D, R, dname, N, ran)
        except OutOfResources:  # even the smallest row block does not fit: go split
            store.remember_path(D, R, dname, "split")
    if ypart is None:
        C32 = new_buffer((N, R), torch.float32, dev) if need_y and coeff_dtype != torch.float32 else C
        cfg = store.lookup("compress_coeff", D, R, dname, N)
        ran, spart = launch("compress_coeff", run_coeff, cfg,
                            lambda c: shrink_config(c, ("BLOCK_N", "BLOCK_D")))
        store.remember("compress_coeff", D, R, dname, N, ran)
        ypart = y_buffer(1)
        if need_y:
            cfg = store.lookup("compress_y", D, R, dname, N)
            ran, ypart = launch("compress_y", run_y, cfg,
                                lambda c: shrink_config(c, ("BLOCK_N", "BLOCK_D")))
            store.remember("compress_y", D, R, dname, N, ran)

    if atomic:  # ypart is Y, spart holds the final sums and maxima (max rel still squared)
        spart[2:3].sqrt_()
        scalars, Y = spart, (ypart if need_y else None)
    else:
        scalars = new_buffer((4,), torch.float32, dev)
        Y = new_buffer((D, R), torch.float32, dev) if need_y else scalars
        n_slabs = ypart.shape[0] if need_y else 0
        grid = (triton.cdiv(D * R, REDUCE_BLOCK),) if need_y else (1,)
        _reduce_kernel[grid](ypart, Y, n_slabs, D * R, spart, spart.shape[0], scalars,
                             NEED_Y=need_y, BLOCK=REDUCE_BLOCK, BLOCK_S=128, num_warps=4)
        Y = Y if need_y else None
    return CompressOut(C, scalars[0], scalars[1], Y, scalars[2], scalars[3], scalars)
