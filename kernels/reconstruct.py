"""reconstruct: X_hat = C U^T with fp32 accumulation, written in the requested dtype (docs/design.md §6.3).

One program per (row block, D block) tile of the (N, D) output: acc = sum over rank chunks of
C[rows, k] U[cols, k]^T, then one cast and store. C (N x r, any float dtype) and U (D x r,
fp32) may have any strides; the output is a new contiguous (N, D) tensor.

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
    pow2,
    shrink_config,
)
from ._spec import KernelSpec, Shape, declare
from .configs import get_store

__all__ = ["reconstruct"]


@triton.jit
def _reconstruct_kernel(
    c_ptr, u_ptr, ulo_ptr, out_ptr,
    N, D, R, stride_cn, stride_cr, stride_ud, stride_ur,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out[rows, cols] = C[rows, :] U[cols, :]^T for one (BLOCK_N, BLOCK_D) tile of the (N, D)
    output, summed over rank chunks of BLOCK_R in fp32 and cast once to out's dtype."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    offs_k = tl.arange(0, BLOCK_R)
    n_ok = rows < N
    d_ok = cols < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # this tile of X_hat, fp32
    for k0 in range(0, R, BLOCK_R):
        kk = k0 + offs_k
        k_ok = kk < R
        # C chunk (BLOCK_N, BLOCK_R) as stored (any float dtype); masked lanes are 0
        c = tl.load(c_ptr + rows[:, None] * stride_cn + kk[None, :] * stride_cr,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        # U^T chunk (BLOCK_R, BLOCK_D): fp32, or its bf16 halves (split once per call)
        ut_hi, ut_lo = load_basis(u_ptr, ulo_ptr, kk[:, None] * stride_ur + cols[None, :] * stride_ud,
                                  k_ok[:, None] & d_ok[None, :], PRECISION)
        acc = mma_basis(c, ut_hi, ut_lo, acc, PRECISION, INTERPRET)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])


def reconstruct(C: torch.Tensor, U: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """X_hat = C U^T as a new contiguous (N, D) tensor of `dtype` (default C.dtype).

    Matches `laser_triton.reference.reconstruct`: fp32 products and accumulation, one rounding.
    """
    dtype = check_reconstruct(C, U, dtype)
    N, R = C.shape
    D = U.shape[0]
    out = new_buffer((N, D), dtype, C.device)
    store = get_store(C.device)
    dname = DTYPE_NAMES[dtype]
    cfg = store.lookup("reconstruct", D, R, dname, N)
    cfg = {**cfg, "BLOCK_R": _block_r(R, cfg)}

    def run(c: dict) -> None:
        grid = (triton.cdiv(N, c["BLOCK_N"]), triton.cdiv(D, c["BLOCK_D"]))
        u, ulo, sud, sur = basis_operands(U, c["PRECISION"])
        _reconstruct_kernel[grid](C, u, ulo, out, N, D, R, C.stride(0), C.stride(1), sud, sur,
                                  INTERPRET=INTERPRET, **c)

    ran, _ = launch("reconstruct", run, cfg,
                    lambda c: shrink_config(c, SPEC.block_keys))
    store.remember("reconstruct", D, R, dname, N, ran)
    return out


def _block_r(R: int, cfg: dict) -> int:
    return min(cfg["BLOCK_R"], pow2(R))


def _signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    """A launch from a row-major C (LaserConfig.coeff_dtype: `shape.coeff`) and the basis
    operands, writing the activation dtype."""
    u = "*bf16" if cfg["PRECISION"] != "ieee" else "*fp32"  # split halves, or U (row-major)
    runtime = dict(c_ptr=f"*{shape.coeff}", u_ptr=u, ulo_ptr=u, out_ptr=f"*{shape.dtype}",
                   N=shape.N, D=shape.D, R=shape.r, stride_cn=shape.r, stride_cr=1,
                   stride_ud=shape.r, stride_ur=1)
    return runtime, dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                         BLOCK_R=_block_r(shape.r, cfg), PRECISION=cfg["PRECISION"],
                         INTERPRET=False)


SPEC = declare(KernelSpec(
    name="reconstruct", fn=_reconstruct_kernel, signature=_signature,
    defaults={"BLOCK_N": 128, "BLOCK_D": 128, "BLOCK_R": 32, "PRECISION": "bf16x3",
              "num_warps": 8, "num_stages": 3},
    interpreter={"BLOCK_N": 256, "BLOCK_D": 256, "BLOCK_R": 64},
    tuning={"BLOCK_N": (64, 128), "BLOCK_D": (64, 128, 256), "BLOCK_R": (16, 32, 64),
            "num_warps": (4, 8), "num_stages": (2, 3, 4)},
    grid=lambda s, cfg, sms: (triton.cdiv(s.N, cfg["BLOCK_N"]), triton.cdiv(s.D, cfg["BLOCK_D"])),
    block_keys=("BLOCK_N", "BLOCK_D", "BLOCK_R"), tensor_cores=True))
