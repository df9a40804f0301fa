"""compress_pass's TMA design: one pass over X at D <= 512 with the row block in shared memory.

The fused kernel (`compress_kernels._compress_fused_kernel`) reads each row block twice from
L2 (in D chunks for C, whole for Y) with per-element addresses, and re-reads the fp32 basis
tile for every row block: at D = 512 that is 3x X's bytes through L2 and, at 128-row blocks,
spills (docs/design.md §6.1, perf/results/audit/README.md). Here each program of a persistent
grid (one per SM) splits the basis into bf16 halves once and keeps them in shared memory for
its whole run, and streams its row blocks with TMA (a tensor descriptor: no address
registers, rows past N read as zeros, software-pipelined by Triton). Both products read the
row block where TMA put it:

    [P_hi | P_lo] = X_blk [U_hi | U_lo]    one MMA of width 2r (the halves side by side),
    C = P_lo + P_hi                        fp32-class (X is exact in an MMA of its type),
    Y += X_blk^T (C_hi + C_lo)             C split into halves, as in the fused kernel,

with the halves in X's 16-bit type: bf16 for a bf16 X; fp16 for an fp16 X (U's fp16 halves
carry 22 bits; C's are scaled per row block by a power of two, so |C| beyond fp16's range
and tiny rows keep their accuracy: Y is summed in units of the largest scale so far),

plus ||x||^2 from the tile and ||c||^2, max |c| as before. Y's D x r accumulator is held in
HALVES register tiles of BLOCK_K rows (the row block is loaded as HALVES tiles of BLOCK_K
columns, TMA boxes are at most 256 wide). Row blocks are 32 rows (16 at r = 64): below
wgmma's 64 rows the C product runs as mma.sync; 64-row blocks give the resident basis one
64-bit wgmma descriptor per K step (32 at D = 512), which the compiler hoists out of the loop,
and with the row sums in registers they spill (the audit's README has the numbers).

Requirements (checked by `tma_fits` and `x_ok`): X bf16 or fp16 with unit column stride,
rows and base 16-byte aligned (D a multiple of 8), D <= 512, r <= 64. Outputs and partials are those
of the fused kernel with one rank tile, so `compress_finish` reduces them unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _bf16_dot, _split_bf16, nan_max, pow2
from ._spec import KernelSpec, Shape, declare
from .compress_kernels import _emit_rows
from .compress_plan import MAX_PARTIAL_ELEMS

__all__ = ["SPEC_TMA", "tma_fits", "x_ok", "tma_programs", "tma_block_k", "x_descriptor"]

TMA_MAX_D = 512  # two 256-wide tiles: TMA's box limit, and Y's accumulator on chip
TMA_MAX_R = 64  # Y (D x r fp32) in registers: 128 per thread at D = 512, r = 64, 8 warps


def tma_fits(D: int, r: int, dtype: str) -> bool:
    """Whether the TMA kernel covers this shape and X dtype (X's layout: `x_ok`): a 16-bit X,
    exact in an MMA of its own type. An fp32 X would be split into halves in registers for
    both products (at D = 512 that spilled 347-1,080 LDL/STL even for fp16 X split into
    bf16 halves: the audit's README)."""
    return dtype in ("bf16", "fp16") and D % 8 == 0 and D <= TMA_MAX_D and r <= TMA_MAX_R


def x_ok(X: torch.Tensor) -> bool:
    """Whether X can be read through a TMA descriptor: unit column stride, 16-byte aligned
    rows and base (a strided view or an odd width goes to the fused kernel instead), and rows
    that do not overlap: an expanded X (row stride 0) passes the alignment rules, but no
    tensor map is documented for it, and cuTensorMapEncodeTiled failing would be an error at
    launch, not a fallback."""
    size = X.element_size()
    return (X.stride(1) == 1 and (X.stride(0) * size) % 16 == 0 and X.data_ptr() % 16 == 0
            and X.stride(0) >= X.shape[1]
            and X.dtype in (torch.bfloat16, torch.float16) and tma_fits(X.shape[1], 1, "bf16"))


def tma_block_k(D: int) -> int:
    """Width of one column tile: all of D up to 256, else half of the padded D."""
    return min(pow2(D), 256)


def tma_programs(N: int, D: int, R: int, cfg: dict, n_sms: int) -> int:
    """Persistent programs: PROGRAMS_PER_SM per SM, at most one per row block, within the
    slab budget of the Y partials."""
    return max(1, min(triton.cdiv(N, cfg["BLOCK_N"]), n_sms * cfg["PROGRAMS_PER_SM"],
                      MAX_PARTIAL_ELEMS // (D * R)))


def x_descriptor(X: torch.Tensor, cfg: dict):
    """X's TMA descriptor, one box = BLOCK_N rows x BLOCK_K columns."""
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415

    return TensorDescriptor(X, list(X.shape), [X.stride(0), 1],
                            [cfg["BLOCK_N"], tma_block_k(X.shape[1])])


@triton.jit
def _split16(v, X_FP16: tl.constexpr):
    """v (fp32) = hi + lo in X's 16-bit type: bf16 halves (`_split_bf16`, about 2^-17
    relative), or fp16 halves rounded to nearest (about 2^-22 relative while the lo half is
    normal; an absolute 2^-25 below, as |v| < 2^-3 makes lo subnormal)."""
    if X_FP16:
        hi = v.to(tl.float16)
        lo = (v - hi.to(tl.float32)).to(tl.float16)
    else:
        hi, lo = _split_bf16(v)
    return hi, lo


@triton.jit
def _basis_pair(u_ptr, k0, D, R, stride_ud, stride_ur, BLOCK_K: tl.constexpr,
                R_PAD: tl.constexpr, X_FP16: tl.constexpr):
    """[U_hi | U_lo] for rows k0 .. k0 + BLOCK_K of the fp32 basis: (BLOCK_K, 2 R_PAD) in X's
    16-bit type (an fp16 X is exact in an fp16 MMA, a bf16 X in a bf16 one)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    u = tl.load(u_ptr + kk[:, None] * stride_ud + offs_r[None, :] * stride_ur,
                mask=(kk < D)[:, None] & (offs_r < R)[None, :], other=0.0)
    hi, lo = _split16(u, X_FP16)
    return tl.reshape(tl.permute(tl.join(hi, lo), (0, 2, 1)), (BLOCK_K, 2 * R_PAD))


@triton.jit
def _pow2(e):
    """2^e as fp32 for an integer scalar e in [-126, 127] (exact: built from the bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _tile(x_desc, row0, k0, u_pair, p, row_x, INTERPRET: tl.constexpr):
    """One column tile of the row block: its TMA load, [P_hi | P_lo] += x [U_hi | U_lo] (x
    exact in the MMA of its own type) and the rows' sums of squares."""
    x = x_desc.load([row0, k0])
    p = _bf16_dot(x, u_pair, p, INTERPRET)
    xf = x.to(tl.float32)
    return x, p, row_x + tl.sum(xf * xf, axis=1)


@triton.jit
def _store_y(ypart_ptr, y, k0, D, R, ATOMIC: tl.constexpr, BLOCK_K: tl.constexpr,
             R_PAD: tl.constexpr):
    kk = k0 + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    offs = kk[:, None] * R + offs_r[None, :]
    mask = (kk < D)[:, None] & (offs_r < R)[None, :]
    if ATOMIC:
        tl.atomic_add(ypart_ptr + offs, y, mask=mask)
    else:
        tl.store(ypart_ptr + offs, y, mask=mask)


@triton.jit
def _compress_tma_kernel(
    x_desc, u_ptr, c_ptr, ypart_ptr, rows_ptr, amax_ptr,
    N, D, R, stride_ud, stride_ur,
    NEED_Y: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HALVES: tl.constexpr, R_PAD: tl.constexpr, X_FP16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """C = X U, the row sums and this program's Y = X^T C partial for row blocks pid, pid + P,
    ... of X (N, D) read through `x_desc` (boxes of BLOCK_N x BLOCK_K); HALVES column tiles
    (1 or 2) cover D. Writes what the fused kernel writes with one rank tile."""
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    # The basis halves, split once per program: loop-invariant, so they stay in shared
    # memory as the MMAs' operand for the whole run (no per-block L2 reads of U).
    u0 = _basis_pair(u_ptr, 0, D, R, stride_ud, stride_ur, BLOCK_K, R_PAD, X_FP16)
    u1 = u0
    if HALVES == 2:
        u1 = _basis_pair(u_ptr, BLOCK_K, D, R, stride_ud, stride_ur, BLOCK_K, R_PAD, X_FP16)
    y0 = tl.zeros((BLOCK_K, R_PAD), tl.float32)  # Y[0:BLOCK_K, :] over this program's rows
    y1 = tl.zeros((BLOCK_K, R_PAD), tl.float32)  # Y[BLOCK_K:2 BLOCK_K, :] (HALVES == 2)
    amax = tl.zeros((BLOCK_N,), tl.float32)  # running max |c| per row lane
    # fp16 X: Y is accumulated in units of 2^scale (C's fp16 halves would overflow at
    # |c| >= 65504; each block's C is scaled by 2^-scale, a power of two: exact)
    scale = -126
    for blk in range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        row0 = blk * BLOCK_N
        rows = (row0 + offs_n).to(tl.int64)
        n_ok = rows < N
        p = tl.zeros((BLOCK_N, 2 * R_PAD), tl.float32)  # [X U_hi | X U_lo]
        row_x = tl.zeros((BLOCK_N,), tl.float32)
        x0, p, row_x = _tile(x_desc, row0, 0, u0, p, row_x, INTERPRET)
        x1 = x0
        if HALVES == 2:
            x1, p, row_x = _tile(x_desc, row0, BLOCK_K, u1, p, row_x, INTERPRET)
        p_hi, p_lo = tl.split(tl.permute(tl.reshape(p, (BLOCK_N, 2, R_PAD)), (0, 2, 1)))
        c = p_lo + p_hi  # C[rows, :], fp32
        c_offs = rows[:, None] * R + offs_r[None, :]
        c_mask = n_ok[:, None] & r_ok[None, :]
        if X_FP16:
            # the scale keeps this block's largest |c| * 2^-scale below 2^14 (its exponent
            # from the bits; NaN or inf make it huge, and Y is NaN then anyway)
            m = tl.max(tl.max(tl.abs(c), axis=1), axis=0)
            e = ((m.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
            grown = tl.minimum(tl.maximum(scale, e - 13), 115)
            if grown > scale:  # earlier blocks' sums, rescaled (exact unless they underflow;
                # below 2^-126 of the new unit they are flushed to zero)
                shrink = scale - grown
                f = tl.where(shrink < -126, 0.0, _pow2(tl.maximum(shrink, -126)))
                y0 = y0 * f
                y1 = y1 * f
                scale = grown
            c_hi, c_lo = _split16(c * _pow2(-scale), X_FP16)
        else:
            c_hi, c_lo = _split_bf16(c)
        if c_ptr.dtype.element_ty == tl.bfloat16:  # C rounded to bf16 (ties to even)
            if X_FP16:
                tl.store(c_ptr + c_offs, _split_bf16(c)[0], mask=c_mask)
            else:  # is the split's hi half
                tl.store(c_ptr + c_offs, c_hi, mask=c_mask)
        else:
            tl.store(c_ptr + c_offs, c.to(c_ptr.dtype.element_ty), mask=c_mask)
        amax = _emit_rows(rows_ptr, amax, rows, n_ok, N, row_x, c, 0)
        if NEED_Y:  # Y += X_blk^T C_blk with the fp32 C as halves; rows past N are zeros
            y0 = _bf16_dot(tl.trans(x0), c_lo, y0, INTERPRET)  # small terms first
            y0 = _bf16_dot(tl.trans(x0), c_hi, y0, INTERPRET)
            if HALVES == 2:
                y1 = _bf16_dot(tl.trans(x1), c_lo, y1, INTERPRET)
                y1 = _bf16_dot(tl.trans(x1), c_hi, y1, INTERPRET)
    if X_FP16:
        y0 = y0 * _pow2(scale)
        y1 = y1 * _pow2(scale)
    if NEED_Y:
        base = ypart_ptr if ATOMIC else ypart_ptr + pid.to(tl.int64) * D * R
        _store_y(base, y0, 0, D, R, ATOMIC, BLOCK_K, R_PAD)
        if HALVES == 2:
            _store_y(base, y1, BLOCK_K, D, R, ATOMIC, BLOCK_K, R_PAD)
    tl.store(amax_ptr + pid, nan_max(amax, 0))


def _signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    bk = tma_block_k(shape.D)
    runtime = dict(x_desc=f"tensordesc<{shape.dtype}[{cfg['BLOCK_N']}, {bk}]>", u_ptr="*fp32",
                   c_ptr=f"*{shape.coeff}", ypart_ptr="*fp32", rows_ptr="*fp32",
                   amax_ptr="*fp32", N=shape.N, D=shape.D, R=shape.r, stride_ud=shape.r,
                   stride_ur=1)
    return runtime, dict(NEED_Y=True, ATOMIC=False, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
                         HALVES=triton.cdiv(shape.D, bk), R_PAD=pow2(shape.r),
                         X_FP16=shape.dtype == "fp16", INTERPRET=False)


SPEC_TMA = declare(KernelSpec(
    name="compress_tma", fn=_compress_tma_kernel, signature=_signature,
    # 32-row blocks, 4 warps, 3 stages (two row blocks in flight): spill-free at D = 512,
    # r <= 32 (248 registers at r = 32); r = 64 needs 16-row blocks with 8 warps (its
    # default.json entry). perf/results/audit/README.md, "TMA".
    defaults={"BLOCK_N": 32, "PROGRAMS_PER_SM": 1, "num_warps": 4, "num_stages": 3},
    interpreter={"BLOCK_N": 128},
    tuning={"BLOCK_N": (16, 32, 64), "PROGRAMS_PER_SM": (1,), "num_warps": (4, 8),
            "num_stages": (2, 3)},
    grid=lambda s, cfg, sms: (tma_programs(s.N, s.D, s.r, cfg, sms),),
    block_keys=("BLOCK_N",), launch_fields=("PROGRAMS_PER_SM",), tensor_cores=True,
    flags=("NEED_Y", "ATOMIC")))
