"""compress_pass: C = X U, ||X||^2, ||C||^2, per-row error maxima and Y = X^T C (docs/design.md §6.1).

Two designs, picked per (D, r) by the config store (table `compress_path`), else by size:

- **fused** (X read once from HBM; D up to 1024): a persistent grid (P row programs x J rank
  tiles). Program (p, j) streams its row blocks: C_j = X_blk U[:, j] over D in chunks (U
  chunks from L2), then Y[:, j] += X_blk^T C_j with the row block re-read from L1/L2; only its
  D x BLOCK_R share of Y stays on chip, so nothing spills at r = 128.
- **split** (any D up to 8192, r up to 256): kernel 1 streams row blocks, loops over D in
  chunks for C = X U and the row norms, and writes C (plus an fp32 copy of C when need_y and
  C is stored narrower); kernel 2 reads X again, tiled over (row segment, D chunk), for
  Y = X^T C (two reads of X: the price of D x r accumulators that do not fit on chip).

Products run on tensor cores at fp32-class accuracy by default (`_common.mma_pre`,
"bf16x3": a bf16 X is exact in bf16, the fp32 U and C are split into hi + lo bf16 halves,
fp32 accumulation; an fp32 or fp16 X is split too). "ieee" (fp32 FMA) stays selectable.

Both designs write per-row sums (||x||^2, ||c_j||^2 per rank tile) and per-program partials
(Y: one D x r slab per row program or segment; max |c|), which `_compress_finish_kernel`
reduces in parallel and in a fixed order, so results are bitwise repeatable.
`deterministic=False` adds Y with fp32 atomics instead (run-to-run different bits).
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
    _split_bf16,
    launch,
    load_basis,
    mma_basis,
    mma_split,
    nan_max,
    new_buffer,
    num_sms,
    pow2,
    shrink_config,
)
from ._spec import KernelSpec, Shape, declare
from .configs import PATH_TABLE, get_store

__all__ = ["compress_pass", "FUSED_MAX_ELEMS", "choose_path", "fused_block_r", "launch_plan"]

FUSED_MAX_ELEMS = 16384  # bound on the fused Y accumulator, D_PAD x BLOCK_R fp32
MIN_BLOCK_R = 16  # the smallest rank tile (tl.dot's minimum)
MAX_PARTIAL_ELEMS = 1 << 24  # cap on the Y partial slabs (64 MiB)
# The finishing kernel: Y elements per program, slabs per step, rows per program.
FINISH_CONFIG = {"BLOCK": 256, "SLABS": 16, "ROWS": 1024, "num_warps": 4, "num_stages": 1}


@triton.jit
def _emit_rows(rows_ptr, amax, rows, n_ok, N, row_x, c, j):
    """Per-row ||c_j||^2 (row j + 1 of the row scratch) and, for the first rank tile,
    ||x||^2 (row 0); returns the running max |c| (NaN propagates)."""
    tl.store(rows_ptr + (j + 1) * N + rows, tl.sum(c * c, axis=1), mask=n_ok)  # < 2^31
    if j == 0:
        tl.store(rows_ptr + rows, row_x, mask=n_ok)
    return tl.maximum(amax, nan_max(tl.abs(c), 1), propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _compress_fused_kernel(
    x_ptr, u_ptr, c_ptr, ypart_ptr, rows_ptr, amax_ptr,
    N, D, R, stride_xn, stride_xd, stride_ud, stride_ur,
    NEED_Y: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (p, j): row blocks p, p + P, ... and rank tile j (columns j*BLOCK_R + ...).

    Per row block: C_j = X_blk U[:, j] over D in BLOCK_K chunks (U chunks come from L2, not
    registers), then Y[:, j] += X_blk^T C_j with the row block re-read from L1/L2 (HBM reads
    X once). Only the D_PAD x BLOCK_R accumulator of Y stays on chip for the whole program.
    """
    pid = tl.program_id(0)
    j = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D_PAD)
    cols = j * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = cols < R
    y_acc = tl.zeros((D_PAD, BLOCK_R), tl.float32)
    amax = tl.zeros((BLOCK_N,), tl.float32)
    for blk in range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        rows = (blk * BLOCK_N + offs_n).to(tl.int64)
        n_ok = rows < N
        c = tl.zeros((BLOCK_N, BLOCK_R), tl.float32)
        row_x = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_K):
            dd = d0 + offs_k
            k_ok = dd < D
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
    """Split design, step 1: C = X U for one row block (all r), its row sums, max |C|, and
    the fp32 C for step 2: as bf16 halves hi + lo (CS_SPLIT, what its MMAs take) or fp32."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, R_PAD)
    n_ok = rows < N
    r_ok = offs_r < R
    c = tl.zeros((BLOCK_N, R_PAD), tl.float32)
    row_x = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):  # C = sum over D chunks of X[:, chunk] U[chunk, :]
        dd = d0 + offs_d
        d_ok = dd < D
        x = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        u = tl.load(u_ptr + dd[:, None] * stride_ud + offs_r[None, :] * stride_ur,
                    mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        c = mma_split(x, u, c, PRECISION, INTERPRET)
        xf = x.to(tl.float32)
        row_x += tl.sum(xf * xf, axis=1)
    c_offs = rows[:, None] * R + offs_r[None, :]
    c_mask = n_ok[:, None] & r_ok[None, :]
    tl.store(c_ptr + c_offs, c.to(c_ptr.dtype.element_ty), mask=c_mask)
    if WRITE_CS:
        if CS_SPLIT:
            c_hi, c_lo = _split_bf16(c)
            tl.store(cs_ptr + c_offs, c_hi, mask=c_mask)
            tl.store(cslo_ptr + c_offs, c_lo, mask=c_mask)
        else:
            tl.store(cs_ptr + c_offs, c, mask=c_mask)
    amax = _emit_rows(rows_ptr, tl.zeros((BLOCK_N,), tl.float32), rows, n_ok, N, row_x, c, 0)
    tl.store(amax_ptr + pid, nan_max(amax, 0))


@triton.jit
def _compress_y_kernel(
    x_ptr, cs_ptr, cslo_ptr, ypart_ptr,
    N, D, R, stride_xn, stride_xd, rows_per_seg,
    ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Split design, step 2: Y[chunk] = X[segment, chunk]^T C[segment] for one (segment,
    D chunk); C comes from step 1 as bf16 halves (or fp32 for "ieee")."""
    seg = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    d_ok = dd < D
    r_ok = offs_r < R
    row_end = tl.minimum(seg * rows_per_seg + rows_per_seg, N)
    acc = tl.zeros((BLOCK_D, R_PAD), tl.float32)
    for n0 in range(seg * rows_per_seg, row_end, BLOCK_N):
        rows = (n0 + offs_n).to(tl.int64)
        n_ok = rows < row_end
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


@triton.jit
def _compress_finish_kernel(
    ypart_ptr, y_ptr, n_slab, DR, rows_ptr, N, n_tiles, amax_ptr, n_amax, part_ptr, count_ptr,
    out_ptr, n_yblk,
    BLOCK: tl.constexpr, SLABS: tl.constexpr, ROWS: tl.constexpr,
):
    """Deterministic reductions, in parallel: programs [0, n_yblk) sum the Y slabs
    element-wise (SLABS slabs at a time, a fixed tree); the others take ROWS rows each:
    ||x||^2, ||c||^2 (the sum of the n_tiles rank-tile partials, in order) and the row error
    1 - ||c||^2/||x||^2, reduced to 3 partials. The last of them to finish (an atomic
    counter) sums all partials in a fixed order and writes e_X, e_C, row_err_max, c_amax,
    then resets the counter to 0: it is one zeroed buffer per device and stream, reused by
    every launch (launches on a stream run in order), so no memset launch is needed.
    """
    pid = tl.program_id(0)
    if pid < n_yblk:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        y_ok = offs < DR
        acc = tl.zeros((BLOCK,), tl.float32)
        for s0 in range(0, n_slab, SLABS):
            ss = (s0 + tl.arange(0, SLABS)).to(tl.int64)
            v = tl.load(ypart_ptr + ss[:, None] * DR + offs[None, :],
                        mask=(ss[:, None] < n_slab) & y_ok[None, :], other=0.0)
            acc += tl.sum(v, axis=0)
        tl.store(y_ptr + offs, acc, mask=y_ok)
    else:
        b = pid - n_yblk
        n_rb = tl.num_programs(0) - n_yblk
        rows = (b * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        row_ok = rows < N
        rx = tl.load(rows_ptr + rows, mask=row_ok, other=0.0)
        rc = tl.zeros((ROWS,), tl.float32)
        for t in range(0, n_tiles):
            rc += tl.load(rows_ptr + (t + 1) * N + rows, mask=row_ok, other=0.0)
        has_x = rx > 0  # zero or NaN rows have no row error (as in the reference)
        rel = tl.where(has_x, tl.maximum(1.0 - rc / tl.where(has_x, rx, 1.0), 0.0), 0.0)
        tl.store(part_ptr + b * 3 + 0, tl.sum(rx, axis=0))
        tl.store(part_ptr + b * 3 + 1, tl.sum(rc, axis=0))
        tl.store(part_ptr + b * 3 + 2, nan_max(rel, 0))
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        if tl.atomic_add(count_ptr, 1, sem="acq_rel") == n_rb - 1:
            ex = tl.zeros((ROWS,), tl.float32)
            ec = tl.zeros((ROWS,), tl.float32)
            rm = tl.zeros((ROWS,), tl.float32)
            cm = tl.zeros((ROWS,), tl.float32)
            for p0 in range(0, n_rb, ROWS):
                idx = p0 + tl.arange(0, ROWS)
                p_ok = idx < n_rb
                ex += tl.load(part_ptr + idx * 3 + 0, mask=p_ok, other=0.0, volatile=True)
                ec += tl.load(part_ptr + idx * 3 + 1, mask=p_ok, other=0.0, volatile=True)
                rm = tl.maximum(rm, tl.load(part_ptr + idx * 3 + 2, mask=p_ok, other=0.0,
                                            volatile=True), propagate_nan=tl.PropagateNan.ALL)
            for p0 in range(0, n_amax, ROWS):
                idx = p0 + tl.arange(0, ROWS)
                cm = tl.maximum(cm, tl.load(amax_ptr + idx, mask=idx < n_amax, other=0.0),
                                propagate_nan=tl.PropagateNan.ALL)
            tl.store(out_ptr + 0, tl.sum(ex, axis=0))
            tl.store(out_ptr + 1, tl.sum(ec, axis=0))
            tl.store(out_ptr + 2, tl.sqrt(nan_max(rm, 0)))
            tl.store(out_ptr + 3, nan_max(cm, 0))
            tl.store(count_ptr, 0)  # ready for the next launch on this stream (no memset)


def choose_path(D: int, r: int, dtype: str, device: torch.device, store=None) -> str:
    """'fused' or 'split': the store's `compress_path` entry, else the size rule."""
    path = (store or get_store(device)).lookup(PATH_TABLE, D, r, dtype)
    if path is None:
        path = "fused" if fused_by_size(D, r) else "split"
    return path


def fused_by_size(D: int, r: int) -> bool:
    """The size rule: fused while Y fits on chip in one rank tile. With more tiles each
    re-reads X from L2 and repeats the per-row-block work; the static model
    (`laser-triton bench audit`) predicts the split design no slower there."""
    return pow2(D) * pow2(r) <= FUSED_MAX_ELEMS


def launch_plan(store, N: int, D: int, r: int, dtype: str,
                need_y: bool = True) -> list[tuple[str, dict, dict]]:
    """[(kernel, config, mode flags)] that `compress_pass` launches for this shape with
    `store`'s configs (before any out-of-resource fallback): what the static audit checks."""
    if choose_path(D, r, dtype, None, store) == "fused":
        steps = [("compress_fused", store.lookup("compress_fused", D, r, dtype, N),
                  {"NEED_Y": need_y})]
    else:
        y_cfg = store.lookup("compress_y", D, r, dtype, N)
        steps = [("compress_coeff", store.lookup("compress_coeff", D, r, dtype, N),
                  {"WRITE_CS": need_y, "CS_SPLIT": y_cfg["PRECISION"] != "ieee"})]
        if need_y:
            steps.append(("compress_y", y_cfg, {}))
    return steps + [("compress_finish", dict(FINISH_CONFIG), {})]


def fused_block_r(D: int, R: int, cfg: dict) -> int:
    """Rank tile of the fused design: as wide as the config asks, within the accumulator bound."""
    return max(MIN_BLOCK_R, min(cfg["BLOCK_R"], pow2(R), FUSED_MAX_ELEMS // pow2(D)))


def fused_programs(N: int, D: int, R: int, cfg: dict, n_sms: int) -> tuple[int, int]:
    """(row programs P, rank tiles J) of the fused grid: P * J ~ PROGRAMS_PER_SM per SM."""
    J = triton.cdiv(R, fused_block_r(D, R, cfg))
    P = max(1, min(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(n_sms * cfg["PROGRAMS_PER_SM"], J),
                   MAX_PARTIAL_ELEMS // (D * R)))
    return P, J


def y_segments(N: int, D: int, R: int, cfg: dict, n_sms: int) -> tuple[int, int]:
    """(row segments, rows per segment) of compress_y: fill the GPU within the slab budget."""
    n_dt = triton.cdiv(D, cfg["BLOCK_D"])
    n_seg = max(1, min(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(2 * n_sms, n_dt),
                       MAX_PARTIAL_ELEMS // (D * R)))
    rows_per_seg = triton.cdiv(triton.cdiv(N, n_seg), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return triton.cdiv(N, rows_per_seg), rows_per_seg


def finish_grid(N: int, D: int, R: int, need_y: bool, atomic: bool) -> tuple[int, int]:
    """(Y-reduction programs, row programs) of the finishing kernel."""
    n_yblk = triton.cdiv(D * R, FINISH_CONFIG["BLOCK"]) if need_y and not atomic else 0
    return n_yblk, triton.cdiv(N, FINISH_CONFIG["ROWS"])


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _finish_counter(device: torch.device) -> torch.Tensor:
    """The finishing kernel's zeroed int32 counter for this device and current stream (it
    leaves it at 0 again). Per stream: launches on one stream never overlap."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


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
    sms = num_sms(dev)
    C = new_buffer((N, R), coeff_dtype, dev)
    xs, us = (X.stride(0), X.stride(1)), (U.stride(0), U.stride(1))

    def y_buffer(n_slabs: int) -> torch.Tensor:
        if not need_y:
            return new_buffer((1,), torch.float32, dev)
        if atomic:
            return torch.zeros((D, R), dtype=torch.float32, device=dev)
        return new_buffer((n_slabs, D, R), torch.float32, dev)

    def run_fused(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        P, J = fused_programs(N, D, R, cfg, sms)
        ypart, amax = y_buffer(P), new_buffer((P * J,), torch.float32, dev)
        rows = new_buffer((J + 1, N), torch.float32, dev)
        # PROGRAMS_PER_SM sizes the grid only: the compiled launcher rejects unknown keywords.
        _compress_fused_kernel[(P, J)](
            X, U, C, ypart, rows, amax, N, D, R, *xs, *us, NEED_Y=need_y,
            ATOMIC=atomic, D_PAD=pow2(D), INTERPRET=INTERPRET,
            **{**SPEC_FUSED.kernel_config(cfg), "BLOCK_R": fused_block_r(D, R, cfg)})
        return ypart, rows, amax, J

    def run_coeff(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
        grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
        rows, amax = new_buffer((2, N), torch.float32, dev), new_buffer(grid, torch.float32, dev)
        _compress_coeff_kernel[grid](X, U, C, cs, cslo, rows, amax, N, D, R, *xs, *us,
                                     WRITE_CS=cs is not C, CS_SPLIT=cs_split, R_PAD=pow2(R),
                                     INTERPRET=INTERPRET, **cfg)
        return rows, amax

    def run_y(cfg: dict) -> torch.Tensor:
        n_seg, rows_per_seg = y_segments(N, D, R, cfg, sms)
        ypart = y_buffer(n_seg)
        _compress_y_kernel[(n_seg, triton.cdiv(D, cfg["BLOCK_D"]))](
            X, cs, cslo, ypart, N, D, R, *xs, rows_per_seg, ATOMIC=atomic, R_PAD=pow2(R),
            INTERPRET=INTERPRET, **{**cfg, "PRECISION": "bf16x3" if cs_split else "ieee"})
        return ypart

    if (R + 1) * N >= 2**31:  # the row scratch holds up to R / 16 + 1 rows of N values
        raise ValueError(f"compress_pass: N = {N} rows is too many for rank {R}")
    ypart = None
    if choose_path(D, R, dname, dev) == "fused":
        cfg = store.lookup("compress_fused", D, R, dname, N)
        try:
            ran, (ypart, rows, amax, n_tiles) = launch(
                "compress_fused", run_fused, cfg, lambda c: shrink_config(c, SPEC_FUSED.block_keys))
            store.remember("compress_fused", D, R, dname, N, ran)
        except OutOfResources:  # even the smallest blocks do not fit: go split
            store.remember_path(D, R, dname, "split")
    if ypart is None:
        y_cfg = store.lookup("compress_y", D, R, dname, N) if need_y else None
        # Step 2 takes the fp32 C in the form its products need: bf16 halves, or fp32.
        cs_split = need_y and y_cfg["PRECISION"] != "ieee"
        if cs_split:
            cs, cslo = (new_buffer((N, R), torch.bfloat16, dev) for _ in range(2))
        elif need_y and coeff_dtype != torch.float32:
            cs = cslo = new_buffer((N, R), torch.float32, dev)
        else:
            cs = cslo = C
        cfg = store.lookup("compress_coeff", D, R, dname, N)
        ran, (rows, amax) = launch("compress_coeff", run_coeff, cfg,
                                   lambda c: shrink_config(c, SPEC_COEFF.block_keys))
        store.remember("compress_coeff", D, R, dname, N, ran)
        n_tiles = 1
        ypart = y_buffer(1)
        if need_y:
            ran, ypart = launch("compress_y", run_y, y_cfg,
                                lambda c: shrink_config(c, SPEC_Y.block_keys))
            store.remember("compress_y", D, R, dname, N, ran)

    scalars = new_buffer((4,), torch.float32, dev)
    Y = (ypart if atomic else new_buffer((D, R), torch.float32, dev)) if need_y else None
    n_yblk, n_rb = finish_grid(N, D, R, need_y, atomic)
    parts = new_buffer((n_rb, 3), torch.float32, dev)
    count = _finish_counter(dev)
    _compress_finish_kernel[(n_yblk + n_rb,)](
        ypart, Y if n_yblk else scalars, ypart.shape[0] if n_yblk else 0, D * R, rows, N,
        n_tiles, amax, amax.numel(), parts, count, scalars, n_yblk, **FINISH_CONFIG)
    return CompressOut(C, scalars[0], scalars[1], Y, scalars[2], scalars[3], scalars)


# ----------------------------------------------------------------------------- declarations


def _dt(shape: Shape) -> str:
    return f"*{shape.dtype}"


def _x_args(shape: Shape, cfg: dict) -> dict:
    """X and U as a launch passes them: row-major X, the fp32 basis row-major as LASER's
    bases are (split into bf16 halves inside the kernels)."""
    return dict(x_ptr=_dt(shape), u_ptr="*fp32", N=shape.N, D=shape.D, R=shape.r,
                stride_xn=shape.D, stride_xd=1, stride_ud=shape.r, stride_ur=1)


def _fused_signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    runtime = dict(_x_args(shape, cfg), c_ptr="*bf16", ypart_ptr="*fp32", rows_ptr="*fp32",
                   amax_ptr="*fp32")
    return runtime, dict(NEED_Y=True, ATOMIC=False, BLOCK_N=cfg["BLOCK_N"],
                         BLOCK_K=cfg["BLOCK_K"], D_PAD=pow2(shape.D),
                         BLOCK_R=fused_block_r(shape.D, shape.r, cfg), PRECISION=cfg["PRECISION"],
                         INTERPRET=False)


def _coeff_signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    split = cfg["PRECISION"] != "ieee"
    runtime = dict(_x_args(shape, cfg), c_ptr="*bf16", cs_ptr="*bf16" if split else "*fp32",
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


def _finish_signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    n_yblk, _ = finish_grid(shape.N, shape.D, shape.r, True, False)
    fused = fused_by_size(shape.D, shape.r)
    fcfg = {**SPEC_FUSED.defaults}
    P, J = fused_programs(shape.N, shape.D, shape.r, fcfg, H100_SMS) if fused else (0, 1)
    if not fused:
        P = y_segments(shape.N, shape.D, shape.r, SPEC_Y.defaults, H100_SMS)[0]
    n_amax = P * J if fused else triton.cdiv(shape.N, SPEC_COEFF.defaults["BLOCK_N"])
    runtime = dict(ypart_ptr="*fp32", y_ptr="*fp32", n_slab=P, DR=shape.D * shape.r,
                   rows_ptr="*fp32", N=shape.N, n_tiles=J, amax_ptr="*fp32", n_amax=n_amax,
                   part_ptr="*fp32", count_ptr="*i32", out_ptr="*fp32", n_yblk=n_yblk)
    return runtime, dict(BLOCK=cfg["BLOCK"], SLABS=cfg["SLABS"], ROWS=cfg["ROWS"])


H100_SMS = 132  # the grid sizes the compile signatures assume (H100/H200)
_TC = "bf16x3"  # fp32-class products on bf16 tensor cores: the default on a GPU
SPEC_FUSED = declare(KernelSpec(
    name="compress_fused", fn=_compress_fused_kernel, signature=_fused_signature,
    defaults={"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 128, "PROGRAMS_PER_SM": 1,
              "PRECISION": _TC, "num_warps": 8, "num_stages": 2},
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
    interpreter={"BLOCK_N": 256, "BLOCK_D": 256},
    tuning={"BLOCK_N": (32, 64, 128), "BLOCK_D": (32, 64, 128), "num_warps": (4, 8),
            "num_stages": (2, 3, 4)},
    grid=lambda s, cfg, sms: (triton.cdiv(s.N, cfg["BLOCK_N"]),),
    block_keys=("BLOCK_N", "BLOCK_D"), tensor_cores=True, flags=("WRITE_CS", "CS_SPLIT")))
SPEC_Y = declare(KernelSpec(
    name="compress_y", fn=_compress_y_kernel, signature=_y_signature,
    defaults={"BLOCK_N": 64, "BLOCK_D": 64, "PRECISION": _TC, "num_warps": 4,
              "num_stages": 3},
    interpreter={"BLOCK_N": 256, "BLOCK_D": 256},
    tuning={"BLOCK_N": (32, 64, 128), "BLOCK_D": (64, 128), "num_warps": (4, 8),
            "num_stages": (2, 3, 4)},
    grid=lambda s, cfg, sms: (y_segments(s.N, s.D, s.r, cfg, sms)[0],
                              triton.cdiv(s.D, cfg["BLOCK_D"])),
    block_keys=("BLOCK_N", "BLOCK_D"), tensor_cores=True, flags=("ATOMIC",)))
SPEC_FINISH = declare(KernelSpec(
    name="compress_finish", fn=_compress_finish_kernel, signature=_finish_signature,
    defaults=FINISH_CONFIG,
    grid=lambda s, cfg, sms: (sum(finish_grid(s.N, s.D, s.r, True, False)),), stored=False))
