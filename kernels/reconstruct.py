"""reconstruct: X_hat = C U^T in fp32 math, written in the requested dtype (docs/design.md §6.3).

One program per (row block, D block) tile of the (N, D) output: acc = sum over rank chunks of
C[rows, k] U[cols, k]^T, then one cast and store. C (N x r, any float dtype) and U (D x r,
fp32) may have any strides; the output is a new contiguous (N, D) tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPE_NAMES, INTERPRET, launch, mma_fp32, new_buffer, pow2, shrink_config
from .configs import get_store

__all__ = ["reconstruct"]


@triton.jit
def _reconstruct_kernel(
    c_ptr, u_ptr, out_ptr,
    N, D, R, stride_cn, stride_cr, stride_ud, stride_ur,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, C_IS_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out[rows, cols] = C[rows, :] U[cols, :]^T for one (BLOCK_N, BLOCK_D) output tile,
    accumulated in fp32 over BLOCK_R rank chunks and rounded once to the output dtype."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_R)
    n_ok = rows < N
    d_ok = cols < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # acc: (BLOCK_N, BLOCK_D), the output tile
    for k0 in range(0, R, BLOCK_R):
        kk = k0 + offs_k
        k_ok = kk < R
        # c: (BLOCK_N, BLOCK_R) fp32, one rank chunk of C
        c = tl.load(c_ptr + rows[:, None] * stride_cn + kk[None, :] * stride_cr,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        u_t = tl.load(u_ptr + kk[:, None] * stride_ur + cols[None, :] * stride_ud,
                      mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # U^T chunk, (BLOCK_R, BLOCK_D)
        acc = mma_fp32(c, u_t, acc, PRECISION, C_IS_BF16, INTERPRET)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])


def reconstruct(C: torch.Tensor, U: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """X_hat = C U^T as a new contiguous (N, D) tensor of `dtype` (default C.dtype).

    Matches `laser_triton.reference.reconstruct`: fp32 products and accumulation, one rounding.
    """
    if C.dim() != 2 or U.dim() != 2 or C.shape[1] != U.shape[1] or U.dtype != torch.float32:
        raise ValueError(f"reconstruct: C (N x r) and fp32 U (D x r) expected, got "
                         f"{tuple(C.shape)} and {tuple(U.shape)} {U.dtype}")
    if C.dtype not in DTYPE_NAMES or C.device != U.device:
        raise ValueError(f"reconstruct: C dtype {C.dtype} / devices {C.device}, {U.device}")
    dtype = C.dtype if dtype is None else dtype
    N, R = C.shape
    D = U.shape[0]
    out = new_buffer((N, D), dtype, C.device)
    store = get_store(C.device)
    dname = DTYPE_NAMES[dtype]
    cfg = store.lookup("reconstruct", D, R, dname, N)
    cfg = {**cfg, "BLOCK_R": min(cfg["BLOCK_R"], pow2(R))}
    args = (C, U, out, N, D, R, C.stride(0), C.stride(1), U.stride(0), U.stride(1))
    consts = dict(C_IS_BF16=C.dtype == torch.bfloat16, INTERPRET=INTERPRET)

    def run(c: dict) -> None:
        grid = (triton.cdiv(N, c["BLOCK_N"]), triton.cdiv(D, c["BLOCK_D"]))
        _reconstruct_kernel[grid](*args, **c, **consts)

    ran, _ = launch("reconstruct", run, cfg,
                    lambda c: shrink_config(c, ("BLOCK_N", "BLOCK_D", "BLOCK_R")))
    store.remember("reconstruct", D, R, dname, N, ran)
    return out
