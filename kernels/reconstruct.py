"""reconstruct: X_hat = C U^T with fp32 accumulation, written in the requested dtype (docs/design.md §6.3).

A persistent grid: the (D tile, row block) tiles of the (N, D) output, ordered D tile first,
are dealt out in equal contiguous runs, one run per program (`programs`). A program loads the
basis tile of its D tile once (`R_PAD x BLOCK_D`, all ranks) and keeps it in shared memory
while it streams its row blocks of C through it: out[rows, cols] = C[rows, :] U[cols, :]^T,
fp32 accumulation, one cast and store per tile. A run crosses into the next D tile at most a
few times, so the basis is read from L2 about once per program instead of once per row block
(the binding bound of the old one-tile-per-program grid at r >= 64: 4 bytes of basis halves
per output element at r = 128), and C once per D tile. C (N x r, any float dtype) and U (D x r,
fp32) may have any strides; the output is a new contiguous (N, D) tensor. Every output
element is written by one program with the same arithmetic whatever the grid, so results are
bitwise repeatable.

Products run on tensor cores by default ("bf16x3": U split once per call into bf16 halves,
a bf16 C exact, other C dtypes split too; about 2^-17 relative per product); "ieee" keeps
exact fp32 FMA products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..validation import check_reconstruct
from ._basis import basis_operands
from ._common import (
    DTYPE_NAMES,
    INTERPRET,
    launch,
    load_basis,
    mma_basis,
    new_buffer,
    num_sms,
    pow2,
    shrink_config,
)
from ._spec import SIGNATURE_SMS, KernelSpec, Shape, declare
from .configs import get_store

__all__ = ["reconstruct", "programs", "MAX_WIDTH"]

# The kernel addresses a row block of the output with 32-bit offsets (BLOCK_N * D < 2^31 for
# every BLOCK_N a config may hold, <= 8192); wider outputs go to the torch twin.
MAX_WIDTH = (2**31 - 1) // 8192  # 262,143 columns


@triton.jit
def _reconstruct_kernel(
    c_ptr, u_ptr, ulo_ptr, out_ptr,
    N, D, R, stride_cn, stride_cr, stride_ud, stride_ur, tiles_per_prog,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Output tiles [pid * tiles_per_prog, (pid + 1) * tiles_per_prog) of the D-tile-major
    order (tile t: D tile t // n_rb, row block t % n_rb): per D tile touched, the basis tile
    is loaded once, then each row block's (BLOCK_N, BLOCK_D) tile is C[rows, :] U[cols, :]^T
    summed over all R_PAD ranks in fp32 and cast once to out's dtype."""
    n_rb = tl.cdiv(N, BLOCK_N)
    first = tl.program_id(0) * tiles_per_prog
    last = tl.minimum(first + tiles_per_prog, tl.cdiv(D, BLOCK_D) * n_rb)  # exclusive
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, R_PAD)
    k_ok = offs_k < R
    for dt in range(first // n_rb, (last - 1) // n_rb + 1):
        cols = dt * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        d_ok = cols < D
        # U^T tile (R_PAD, BLOCK_D): fp32, or its bf16 halves (split once per call); kept for
        # every row block of this D tile
        ut_hi, ut_lo = load_basis(u_ptr, ulo_ptr,
                                  offs_k[:, None] * stride_ur + cols[None, :] * stride_ud,
                                  k_ok[:, None] & d_ok[None, :], PRECISION)
        for rb in range(tl.maximum(first, dt * n_rb) - dt * n_rb,
                        tl.minimum(last, dt * n_rb + n_rb) - dt * n_rb):
            n0 = rb * BLOCK_N
            n_ok = offs_n < N - n0
            # C rows (BLOCK_N, R_PAD) as stored (any float dtype; 64-bit row offsets: any
            # strides); masked lanes are 0
            c = tl.load(c_ptr + (n0 + offs_n).to(tl.int64)[:, None] * stride_cn
                        + offs_k[None, :] * stride_cr,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = mma_basis(c, ut_hi, ut_lo, tl.zeros((BLOCK_N, BLOCK_D), tl.float32),
                            PRECISION, INTERPRET)
            # one 64-bit base per row block, 32-bit offsets within it (BLOCK_N * D < 2^31):
            # 64-bit offsets per element cost registers and integer issue slots
            tl.store(out_ptr + n0.to(tl.int64) * D + (offs_n[:, None] * D + cols[None, :]),
                     acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


def programs(N: int, D: int, cfg: dict, n_sms: int) -> tuple[int, int]:
    """(programs, output tiles per program): PROGRAMS_PER_SM per SM, each an equal run of the
    (D tile, row block) tiles, so no program waits on a short last wave."""
    tiles = triton.cdiv(D, cfg["BLOCK_D"]) * triton.cdiv(N, cfg["BLOCK_N"])
    per_prog = triton.cdiv(tiles, min(tiles, n_sms * cfg["PROGRAMS_PER_SM"]))
    return triton.cdiv(tiles, per_prog), per_prog


def reconstruct(C: torch.Tensor, U: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """X_hat = C U^T as a new contiguous (N, D) tensor of `dtype` (default C.dtype).

    Matches `laser_triton.reference.reconstruct`: fp32 products and accumulation, one rounding.
    """
    dtype = check_reconstruct(C, U, dtype)
    N, R = C.shape
    D = U.shape[0]
    if D > MAX_WIDTH:
        raise ValueError(f"reconstruct: U has {D} rows, wider than the kernel's {MAX_WIDTH} "
                         "(32-bit offsets within a row block); use the torch backend")
    out = new_buffer((N, D), dtype, C.device)
    store = get_store(C.device)
    dname, cname = DTYPE_NAMES[dtype], DTYPE_NAMES[C.dtype]  # C's dtype picks the binary
    cfg = store.lookup("reconstruct", D, R, dname, N, cname)
    sms = num_sms(C.device)

    def run(c: dict) -> None:
        grid, per_prog = programs(N, D, c, sms)
        u, ulo, sud, sur = basis_operands(U, c["PRECISION"])
        # PROGRAMS_PER_SM sizes the grid only: the compiled launcher rejects unknown keywords.
        _reconstruct_kernel[(grid,)](C, u, ulo, out, N, D, R, C.stride(0), C.stride(1), sud,
                                     sur, per_prog, R_PAD=pow2(R), INTERPRET=INTERPRET,
                                     **SPEC.kernel_config(c))

    ran, _ = launch("reconstruct", run, cfg,
                    lambda c: shrink_config(c, SPEC.block_keys))
    store.remember("reconstruct", D, R, dname, N, ran, cname)
    return out


def _signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    """A launch from a row-major C (LaserConfig.coeff_dtype: `shape.coeff`) and the basis
    operands, writing the activation dtype."""
    u = "*bf16" if cfg["PRECISION"] != "ieee" else "*fp32"  # split halves, or U (row-major)
    _, per_prog = programs(shape.N, shape.D, cfg, SIGNATURE_SMS)
    runtime = dict(c_ptr=f"*{shape.coeff}", u_ptr=u, ulo_ptr=u, out_ptr=f"*{shape.dtype}",
                   N=shape.N, D=shape.D, R=shape.r, stride_cn=shape.r, stride_cr=1,
                   stride_ud=shape.r, stride_ur=1, tiles_per_prog=per_prog)
    return runtime, dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], R_PAD=pow2(shape.r),
                         PRECISION=cfg["PRECISION"], INTERPRET=False)


SPEC = declare(KernelSpec(
    name="reconstruct", fn=_reconstruct_kernel, signature=_signature,
    # One warpgroup per program, 64 x 128 output tiles, 2 programs per SM: spill-free at
    # every TRM shape (128-row tiles spill at D = 97, where no store vectorizes), and at
    # r = 128 with a bf16 output two programs fit one SM's shared memory (basis tile
    # 64 KiB + 2 stages of C), so one's MMAs can overlap the other's stores.
    defaults={"BLOCK_N": 64, "BLOCK_D": 128, "PROGRAMS_PER_SM": 2, "PRECISION": "bf16x3",
              "num_warps": 4, "num_stages": 2},
    interpreter={"BLOCK_N": 256, "BLOCK_D": 256},
    tuning={"BLOCK_N": (64, 128, 256), "BLOCK_D": (64, 128, 256), "PROGRAMS_PER_SM": (1, 2),
            "num_warps": (4, 8), "num_stages": (2, 3, 4)},
    grid=lambda s, cfg, sms: (programs(s.N, s.D, cfg, sms)[0],),
    block_keys=("BLOCK_N", "BLOCK_D"), launch_fields=("PROGRAMS_PER_SM",), tensor_cores=True))
