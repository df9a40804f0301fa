"""compress_pass's finishing kernel: the deterministic, parallel reduction of the partials.

The product kernels (`compress_kernels`) leave per-row sums (||x||^2, ||c_j||^2 per rank tile),
per-program Y slabs and per-program max |c|. One launch reduces them all in a fixed order
(bitwise repeatable): some programs sum Y slabs element-wise, the others reduce row blocks to
three partials each, and the last to finish (an atomic counter) combines those partials into
e_X, e_C, row_err_max and c_amax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import nan_max, ticket_counters
from ._spec import KernelSpec, Shape, declare
from .compress_kernels import SPEC_COEFF, SPEC_FUSED, SPEC_Y
from .compress_plan import H100_SMS, fused_by_size, fused_programs, y_segments

__all__ = ["FINISH_CONFIG", "SPEC_FINISH", "finish_counter", "finish_grid"]

# Y elements per program, slabs per step, rows per program.
FINISH_CONFIG = {"BLOCK": 256, "SLABS": 16, "ROWS": 1024, "num_warps": 4, "num_stages": 1}


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
            # v: (SLABS, BLOCK) of the Y partial slabs, BLOCK elements of D x r each
            v = tl.load(ypart_ptr + ss[:, None] * DR + offs[None, :],
                        mask=(ss[:, None] < n_slab) & y_ok[None, :], other=0.0)
            acc += tl.sum(v, axis=0)
        tl.store(y_ptr + offs, acc, mask=y_ok)
    else:
        b = pid - n_yblk
        n_rb = tl.num_programs(0) - n_yblk
        rows = (b * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        row_ok = rows < N
        rx = tl.load(rows_ptr + rows, mask=row_ok, other=0.0)  # (ROWS,) ||x_i||^2
        rc = tl.zeros((ROWS,), tl.float32)  # (ROWS,) ||c_i||^2, summed over rank tiles
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


def finish_grid(N: int, D: int, R: int, need_y: bool, atomic: bool) -> tuple[int, int]:
    """(Y-reduction programs, row programs) of the finishing kernel."""
    n_yblk = triton.cdiv(D * R, FINISH_CONFIG["BLOCK"]) if need_y and not atomic else 0
    return n_yblk, triton.cdiv(N, FINISH_CONFIG["ROWS"])


def finish_counter(device: torch.device) -> torch.Tensor:
    """The finishing kernel's zeroed int32 counter for this device and current stream (the
    last of its row-block programs leaves it at 0 again); see `ticket_counters`."""
    return ticket_counters(device, 1, "compress_finish")


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


SPEC_FINISH = declare(KernelSpec(
    name="compress_finish", fn=_compress_finish_kernel, signature=_finish_signature,
    defaults=FINISH_CONFIG,
    grid=lambda s, cfg, sms: (sum(finish_grid(s.N, s.D, s.r, True, False)),), stored=False))
