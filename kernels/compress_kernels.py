"""compress_pass's product kernels: C = X U, ||X||^2, ||C||^2, max |C| and Y = X^T C.

Two designs (docs/design.md §6.1), picked per (D, r) by the launcher (`compress_pass`):

- **fused** (X read once from HBM; D up to 1024): a persistent grid (P row programs x J rank
  tiles). Program (p, j) streams its row blocks: C_j = X_blk U[:, j] over D in chunks (U
  chunks from L2), then Y[:, j] += X_blk^T C_j with the row block re-read from L1/L2; only its
  D x BLOCK_R share of Y stays on chip, so nothing spills at r = 128.
- **split** (any D up to 8192, r up to 256): `_compress_coeff_kernel` streams row blocks, loops
  over D in chunks for C = X U and the row norms, and writes C (plus an fp32 copy of C when
  need_y and C is stored narrower); `_compress_y_kernel` reads X again, tiled over (row
  segment, D chunk), for Y = X^T C (two reads of X: the price of D x r accumulators that do
  not fit on chip).

Products run on tensor cores at fp32-class accuracy by default (`_common.mma_pre`,
"bf16x3": a bf16 X is exact in bf16, the fp32 U and C are split into hi + lo bf16 halves,
fp32 accumulation; an fp32 or fp16 X is split too). "ieee" (fp32 FMA) stays selectable.

Both designs write per-row sums (||x||^2, ||c_j||^2 per rank tile) and per-program partials
(Y: one D x r slab per row program or segment; max |c|), which `compress_finish` reduces in
parallel and in a fixed order, so results are bitwise repeatable. ATOMIC adds Y with fp32
atomics instead (run-to-run different bits).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import _split_bf16, load_basis, mma_basis, mma_split, nan_max, pow2
from ._spec import KernelSpec, Shape, declare
from .compress_plan import H100_SMS, fused_block_r, fused_programs, y_segments

__all__ = ["SPEC_FUSED", "SPEC_COEFF", "SPEC_Y"]


@triton.jit
def _emit_rows(rows_ptr, amax, rows, n_ok, N, row_x, c, j):
    """Per-row ||c_j||^2 (row j + 1 of the row scratch) and, for the first rank tile,
    ||x||^2 (row 0); returns the running max |c| (NaN propagates)."""
    row_c = tl.sum(c * c, axis=1)
    tl.store(rows_ptr + (j + 1) * N + rows, row_c, mask=n_ok)  # < 2^31
    if j == 0:
        tl.store(rows_ptr + rows, row_x, mask=n_ok)
    # A row holds a NaN iff its sum of squares is NaN (squares are >= 0 or NaN): one test
    # per row instead of one per element (tl.max alone drops NaN on GPUs)
    row_max = tl.where(row_c != row_c, float("nan"), tl.max(tl.abs(c), axis=1))
    return tl.maximum(amax, row_max, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _compress_fused_kernel(
    x_ptr, u_ptr, c_ptr, ypart_ptr, rows_ptr, amax_ptr,
    N, D, R, stride_xn, stride_xd, stride_ud, stride_ur,
    NEED_Y: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """C[:, j] = X U[:, j] and Y[:, j] = X^T C[:, j] (partial over this program's rows), for
    rank tile j (columns j*BLOCK_R + ...) and row blocks p, p + P, ... of X (N, D).

    Per row block: C_j = X_blk U[:, j] over D in BLOCK_K chunks (U chunks come from L2, not
    registers), then Y[:, j] += X_blk^T C_j with the row block re-read from L1/L2 (HBM reads
    X once). Only the D_PAD x BLOCK_R accumulator of Y stays on chip for the whole program.
    """
    pid = tl.program_id(0)
    j = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D_PAD)
    cols = j * BLOCK_R + tl.arange(0, BLOCK_R)  # this program's rank tile
    r_ok = cols < R
    y_acc = tl.zeros((D_PAD, BLOCK_R), tl.float32)  # Y[:, cols], all of D: stays on chip
    amax = tl.zeros((BLOCK_N,), tl.float32)  # running max |c| per row lane
    for blk in range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        rows = (blk * BLOCK_N + offs_n).to(tl.int64)
        n_ok = rows < N
        c = tl.zeros((BLOCK_N, BLOCK_R), tl.float32)  # C[rows, cols], fp32
        row_x = tl.zeros((BLOCK_N,), tl.float32)  # ||x_i||^2 of the block's rows
        for d0 in range(0, D, BLOCK_K):
            dd = d0 + offs_k
            k_ok = dd < D
            # x: (BLOCK_N, BLOCK_K) of X as stored; u: (BLOCK_K, BLOCK_R) fp32 of U; masked 0
            x = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            u = tl.load(u_ptr + dd[:, None] * stride_ud + cols[None, :] * stride_ur,
                        mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            xf = x.to(tl.float32)
            row_x += tl.sum(xf * xf, axis=1)
            c = mma_split(x, u, c, PRECISION, INTERPRET)  # U split here: no extra launch
        tl.store(c_ptr + rows[:, None] * R + cols[None, :], c.to(c_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & r_ok[None, :])
        amax = _emit_rows(rows_ptr, amax, rows, n_ok, N, row_x, c, j)
        if NEED_Y:  # Y += X_blk^T C_blk with the fp32 C (before rounding to coeff_dtype)
            # xa: (BLOCK_N, D_PAD), the whole row block again (from L1/L2)
            xa = tl.load(x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                         mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0)
            y_acc = mma_split(tl.trans(xa), c, y_acc, PRECISION, INTERPRET)
    if NEED_Y:
        y_offs = offs_d[:, None] * R + cols[None, :]
        y_mask = (offs_d < D)[:, None] & r_ok[None, :]
        if ATOMIC:
            tl.atomic_add(ypart_ptr + y_offs, y_acc, mask=y_mask)
        else:
            tl.store(ypart_ptr + pid.to(tl.int64) * D * R + y_offs, y_acc, mask=y_mask)
    tl.store(amax_ptr + pid * tl.num_programs(1) + j, nan_max(amax, 0))


@triton.jit
def _compress_coeff_kernel(
    x_ptr, u_ptr, c_ptr, cs_ptr, cslo_ptr, rows_ptr, amax_ptr,
    N, D, R, stride_xn, stride_xd, stride_ud, stride_ur,
    WRITE_CS: tl.constexpr, CS_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """C[rows] = X[rows] U for one row block and all r, with ||x_i||^2, ||c_i||^2, max |C| and
    the fp32 C for step 2: as bf16 halves hi + lo (CS_SPLIT, what its MMAs take) or fp32
    (split design, step 1)."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, R_PAD)
    n_ok = rows < N
    r_ok = offs_r < R
    c = tl.zeros((BLOCK_N, R_PAD), tl.float32)  # C[rows, :], fp32
    row_x = tl.zeros((BLOCK_N,), tl.float32)  # ||x_i||^2
    for d0 in range(0, D, BLOCK_D):  # C = sum over D chunks of X[:, chunk] U[chunk, :]
        dd = d0 + offs_d
        d_ok = dd < D
        # x: (BLOCK_N, BLOCK_D) of X as stored; u: (BLOCK_D, R_PAD) fp32 of U; masked 0
        x = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        u = tl.load(u_ptr + dd[:, None] * stride_ud + offs_r[None, :] * stride_ur,
                    mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        c = mma_split(x, u, c, PRECISION, INTERPRET)
        xf = x.to(tl.float32)
        row_x += tl.sum(xf * xf, axis=1)
    # The epilogue addresses the block's rows from one 64-bit base with 32-bit offsets
    # (BLOCK_N * R < 2^31): per-element 64-bit addresses of a 256 x 128 tile cost 64
    # registers per thread at 16 warps and spilled.
    blk = pid.to(tl.int64) * BLOCK_N * R
    c_offs = tl.arange(0, BLOCK_N)[:, None] * R + offs_r[None, :]
    c_mask = n_ok[:, None] & r_ok[None, :]
    amax = _emit_rows(rows_ptr, tl.zeros((BLOCK_N,), tl.float32), rows, n_ok, N, row_x, c, 0)
    if WRITE_CS and CS_SPLIT:
        c_hi, c_lo = _split_bf16(c)
        tl.store(cslo_ptr + blk + c_offs, c_lo, mask=c_mask)
        tl.store(cs_ptr + blk + c_offs, c_hi, mask=c_mask)
        if c_ptr.dtype.element_ty == tl.bfloat16:  # C rounded to bf16 (ties to even) is c_hi
            tl.store(c_ptr + blk + c_offs, c_hi, mask=c_mask)
        else:
            tl.store(c_ptr + blk + c_offs, c.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptr + blk + c_offs, c.to(c_ptr.dtype.element_ty), mask=c_mask)
        if WRITE_CS:
            tl.store(cs_ptr + blk + c_offs, c, mask=c_mask)
    tl.store(amax_ptr + pid, nan_max(amax, 0))


@triton.jit
def _compress_y_kernel(
    x_ptr, cs_ptr, cslo_ptr, ypart_ptr,
    N, D, R, stride_xn, stride_xd, rows_per_seg,
    ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Y[chunk, :] = X[segment, chunk]^T C[segment, :] (partial over the segment's rows) for
    one (row segment, D chunk); C comes from step 1 as bf16 halves (or fp32 for "ieee")
    (split design, step 2)."""
    seg = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    d_ok = dd < D
    r_ok = offs_r < R
    row_end = tl.minimum(seg * rows_per_seg + rows_per_seg, N)
    acc = tl.zeros((BLOCK_D, R_PAD), tl.float32)  # Y[dd, :] over this segment, fp32
    for n0 in range(seg * rows_per_seg, row_end, BLOCK_N):
        rows = (n0 + offs_n).to(tl.int64)
        n_ok = rows < row_end
        # x: (BLOCK_N, BLOCK_D) of X as stored; c_hi, c_lo: (BLOCK_N, R_PAD) halves of C
        x = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        c_hi, c_lo = load_basis(cs_ptr, cslo_ptr, rows[:, None] * R + offs_r[None, :],
                                n_ok[:, None] & r_ok[None, :], PRECISION)
        acc = mma_basis(tl.trans(x), c_hi, c_lo, acc, PRECISION, INTERPRET)
    y_offs = dd[:, None] * R + offs_r[None, :]
    y_mask = d_ok[:, None] & r_ok[None, :]
    if ATOMIC:
        tl.atomic_add(ypart_ptr + y_offs, acc, mask=y_mask)
    else:
        tl.store(ypart_ptr + seg.to(tl.int64) * D * R + y_offs, acc, mask=y_mask)


# ----------------------------------------------------------------------------- declarations


def _dt(shape: Shape) -> str:
    return f"*{shape.dtype}"


def _x_args(shape: Shape, cfg: dict) -> dict:
    """X and U as a launch passes them: row-major X, the fp32 basis row-major as LASER's
    bases are (split into bf16 halves inside the kernels)."""
    return dict(x_ptr=_dt(shape), u_ptr="*fp32", N=shape.N, D=shape.D, R=shape.r,
                stride_xn=shape.D, stride_xd=1, stride_ud=shape.r, stride_ur=1)


def _fused_signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    runtime = dict(_x_args(shape, cfg), c_ptr=f"*{shape.coeff}", ypart_ptr="*fp32", rows_ptr="*fp32",
                   amax_ptr="*fp32")
    return runtime, dict(NEED_Y=True, ATOMIC=False, BLOCK_N=cfg["BLOCK_N"],
                         BLOCK_K=cfg["BLOCK_K"], D_PAD=pow2(shape.D),
                         BLOCK_R=fused_block_r(shape.D, shape.r, cfg), PRECISION=cfg["PRECISION"],
                         INTERPRET=False)


def _coeff_signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    split = cfg["PRECISION"] != "ieee"
    runtime = dict(_x_args(shape, cfg), c_ptr=f"*{shape.coeff}", cs_ptr="*bf16" if split else "*fp32",
                   cslo_ptr="*bf16" if split else "*fp32", rows_ptr="*fp32", amax_ptr="*fp32")
    return runtime, dict(WRITE_CS=True, CS_SPLIT=split, BLOCK_N=cfg["BLOCK_N"],
                         BLOCK_D=cfg["BLOCK_D"], R_PAD=pow2(shape.r), PRECISION=cfg["PRECISION"],
                         INTERPRET=False)


def _y_signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    _, rows_per_seg = y_segments(shape.N, shape.D, shape.r, cfg, H100_SMS)
    c = "*bf16" if cfg["PRECISION"] != "ieee" else "*fp32"
    runtime = dict(x_ptr=_dt(shape), cs_ptr=c, cslo_ptr=c, ypart_ptr="*fp32", N=shape.N,
                   D=shape.D, R=shape.r, stride_xn=shape.D, stride_xd=1,
                   rows_per_seg=rows_per_seg)
    return runtime, dict(ATOMIC=False, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                         R_PAD=pow2(shape.r), PRECISION=cfg["PRECISION"], INTERPRET=False)


_TC = "bf16x3"  # fp32-class products on bf16 tensor cores: the default on a GPU
SPEC_FUSED = declare(KernelSpec(
    name="compress_fused", fn=_compress_fused_kernel, signature=_fused_signature,
    # 3 stages: one CTA per SM must keep ~2 x 16 KiB of X and U chunks in flight to cover
    # HBM latency (the audit's latency bound; with 2 stages it was the binding limit at r = 8)
    defaults={"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 128, "PROGRAMS_PER_SM": 1,
              "PRECISION": _TC, "num_warps": 8, "num_stages": 3},
    interpreter={"BLOCK_N": 256, "BLOCK_K": 256},
    tuning={"BLOCK_N": (32, 64, 128), "BLOCK_K": (32, 64, 128), "BLOCK_R": (16, 32, 64, 128),
            "PROGRAMS_PER_SM": (1, 2), "num_warps": (4, 8), "num_stages": (2, 3)},
    grid=lambda s, cfg, sms: fused_programs(s.N, s.D, s.r, cfg, sms),
    block_keys=("BLOCK_N", "BLOCK_K", "BLOCK_R"), launch_fields=("PROGRAMS_PER_SM",),
    tensor_cores=True, flags=("NEED_Y", "ATOMIC")))
SPEC_COEFF = declare(KernelSpec(
    name="compress_coeff", fn=_compress_coeff_kernel, signature=_coeff_signature,
    # 128-row blocks: each U tile split in registers serves twice the rows (issue slots)
    defaults={"BLOCK_N": 128, "BLOCK_D": 64, "PRECISION": _TC, "num_warps": 8,
              "num_stages": 3},
    # 256-row blocks, 16 warps: the fp32 basis tile is read from L2 once per 256 rows, not
    # 128 (the binding bound at r >= 64: 2x X's bytes at r = 128). Shipped per shape where
    # they pass the audit; an fp32 or fp16 X split into halves in registers spills at
    # r = 128 with 64-wide D chunks and 3 stages, not with 32-wide chunks and 2.
    preferred=({"BLOCK_N": 256, "num_warps": 16},
               {"BLOCK_N": 256, "BLOCK_D": 32, "num_warps": 16, "num_stages": 2}),
    interpreter={"BLOCK_N": 256, "BLOCK_D": 256},
    tuning={"BLOCK_N": (32, 64, 128, 256), "BLOCK_D": (32, 64, 128), "num_warps": (4, 8, 16),
            "num_stages": (2, 3, 4)},
    grid=lambda s, cfg, sms: (triton.cdiv(s.N, cfg["BLOCK_N"]),),
    block_keys=("BLOCK_N", "BLOCK_D"), tensor_cores=True, flags=("WRITE_CS", "CS_SPLIT")))
SPEC_Y = declare(KernelSpec(
    name="compress_y", fn=_compress_y_kernel, signature=_y_signature,
    # 256-wide D tiles: every D tile re-reads its segment's C halves from L2 (4 B per
    # element), so at r = 128 64-wide tiles moved 4x X's bytes through L2 (the audit's model)
    defaults={"BLOCK_N": 64, "BLOCK_D": 256, "PRECISION": _TC, "num_warps": 8,
              "num_stages": 3},
    interpreter={"BLOCK_N": 256, "BLOCK_D": 256},
    tuning={"BLOCK_N": (32, 64, 128), "BLOCK_D": (64, 128, 256), "num_warps": (4, 8),
            "num_stages": (2, 3, 4)},
    grid=lambda s, cfg, sms: (y_segments(s.N, s.D, s.r, cfg, sms)[0],
                              triton.cdiv(s.D, cfg["BLOCK_D"])),
    block_keys=("BLOCK_N", "BLOCK_D"), tensor_cores=True, flags=("ATOMIC",)))
