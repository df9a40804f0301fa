"""compress_pass geometry: which design fits a (D, r) and how each kernel's grid is sized.

Shared by the kernels' declarations (`compress_kernels`, `compress_finish`), the launcher
(`compress_pass`), the static audit's model (perf/audit.py) and the autotune sweep, so one
shape gives one grid everywhere. Tests patch `FUSED_MAX_ELEMS` here to force a design.
"""

from __future__ import annotations

import triton

from ._common import pow2
from ._spec import SIGNATURE_SMS

__all__ = ["FUSED_MAX_ELEMS", "MIN_BLOCK_R", "MAX_PARTIAL_ELEMS", "H100_SMS", "fused_by_size",
           "fused_block_r", "fused_programs", "y_segments", "rows_fit"]

FUSED_MAX_ELEMS = 16384  # bound on the fused Y accumulator, D_PAD x BLOCK_R fp32
MIN_BLOCK_R = 16  # the smallest rank tile (tl.dot's minimum)
MAX_PARTIAL_ELEMS = 1 << 24  # cap on the Y partial slabs (64 MiB)
H100_SMS = SIGNATURE_SMS  # the grid sizes the compile signatures assume (H100/H200)


def rows_fit(N: int, R: int) -> bool:
    """Whether N rows at rank R stay within the kernels' int32 indexing of the row scratch,
    which holds up to R / 16 + 1 rows of N values (bounded by (R + 1) N < 2^31). The launcher
    raises beyond it and `kernels.supports` sends such inputs to the torch reference."""
    return (R + 1) * N < 2**31


def fused_by_size(D: int, r: int) -> bool:
    """The size rule: fused while Y fits on chip in one rank tile. With more tiles each
    re-reads X from L2 and repeats the per-row-block work; the static model
    (`laser-triton bench audit`) predicts the split design no slower there."""
    return pow2(D) * pow2(r) <= FUSED_MAX_ELEMS


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
    """(row segments, rows per segment) of compress_y: one program per SM within the slab
    budget. Every segment writes a D x R fp32 slab that the finishing kernel reads back, so
    more programs than SMs (these hold one CTA per SM at 256-wide D tiles) only add slab
    traffic: at D = 512, r = 128 two per SM wrote 35 MB of slabs against X's 89 MB."""
    n_dt = triton.cdiv(D, cfg["BLOCK_D"])
    n_seg = max(1, min(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(n_sms, n_dt),
                       MAX_PARTIAL_ELEMS // (D * R)))
    rows_per_seg = triton.cdiv(triton.cdiv(N, n_seg), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return triton.cdiv(N, rows_per_seg), rows_per_seg

