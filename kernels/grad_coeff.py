"""grad_coeff: T = G^T C in fp32, the weight gradient of a linear layer in LASER's coefficient
space (dW = G^T X_hat = (G^T C) U^T; laser_triton/lowrank.py).

G (B, N, O) is the output gradient (any float dtype), C (B, N, R) the coefficients of the saved
input (any float dtype; a batch stride of 0 shares one C across the batch). The output is a new
fp32 (B, O, R) tensor. Reading bf16 G and C straight into tensor-core products with fp32
accumulation avoids what torch needs for an fp32 result from bf16 operands: an fp32 copy of G
(N x O, as large as an activation).

One program per (O block, R block, row split, batch): acc = sum over its rows of
G[rows, o]^T C[rows, k]. N is long (every token of the batch) while O x R is small, so rows are
split across programs to fill the GPU; the splits' partial sums go to a (splits, B, O, R) fp32
buffer summed in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..validation import check_grad_coeff
from ._common import (
    DTYPE_NAMES,
    INTERPRET,
    _bf16_dot,
    launch,
    mma_fp32,
    new_buffer,
    num_sms,
    pow2,
    shrink_config,
)
from ._spec import SIGNATURE_SMS, KernelSpec, Shape, declare
from .configs import get_store

__all__ = ["grad_coeff", "row_splits"]

PROGRAMS_PER_SM = 4  # row splits are sized for about this many programs per SM


@triton.jit
def _grad_coeff_kernel(
    g_ptr, c_ptr, part_ptr,
    N, O, R, B, rows_per_split,
    stride_gb, stride_gn, stride_go, stride_cb, stride_cn, stride_cr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, BOTH_BF16: tl.constexpr, G_IS_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """part[split, b, o_blk, r_blk] = G[b, rows, o_blk]^T C[b, rows, r_blk] over the rows of one
    split, accumulated in fp32 for one (BLOCK_O, BLOCK_R) tile of T = G^T C."""
    n_ob = tl.cdiv(O, BLOCK_O)
    pid_o = tl.program_id(0) % n_ob
    pid_r = tl.program_id(0) // n_ob
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_ok = offs_o < O
    r_ok = offs_r < R
    n_lo = split * rows_per_split
    n_hi = tl.minimum(n_lo + rows_per_split, N)
    g_base = g_ptr + b * stride_gb
    c_base = c_ptr + b * stride_cb
    acc = tl.zeros((BLOCK_O, BLOCK_R), tl.float32)  # acc: (BLOCK_O, BLOCK_R), this tile of T
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = rows < n_hi
        # G^T tile (BLOCK_O, BLOCK_N) and C tile (BLOCK_N, BLOCK_R); masked lanes are 0.
        g_t = tl.load(g_base + offs_o[:, None] * stride_go + rows[None, :] * stride_gn,
                      mask=o_ok[:, None] & n_ok[None, :], other=0.0)
        c = tl.load(c_base + rows[:, None] * stride_cn + offs_r[None, :] * stride_cr,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if BOTH_BF16:  # bf16 x bf16 products are exact in fp32: tensor cores, fp32 accumulator
            acc = _bf16_dot(g_t, c, acc, INTERPRET)
        else:
            acc = mma_fp32(g_t.to(tl.float32), c.to(tl.float32), acc, PRECISION, G_IS_BF16,
                           INTERPRET)
    out = part_ptr + ((split.to(tl.int64) * B + b) * O + offs_o[:, None]) * R + offs_r[None, :]
    tl.store(out, acc, mask=o_ok[:, None] & r_ok[None, :])


def _split_rows(N: int, B: int, tiles: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(rows per split, splits): enough programs for about PROGRAMS_PER_SM per SM."""
    want = max(1, PROGRAMS_PER_SM * num_sms(device) // max(tiles * B, 1))
    rows = triton.cdiv(triton.cdiv(N, min(want, triton.cdiv(N, block_n))), block_n) * block_n
    return rows, triton.cdiv(N, rows)


def _config(G: torch.Tensor, C: torch.Tensor) -> dict:
    B, N, O = G.shape
    R = C.shape[2]
    cfg = get_store(G.device).lookup("grad_coeff", O, R, DTYPE_NAMES[G.dtype], N)
    return {**cfg, "BLOCK_R": min(cfg["BLOCK_R"], pow2(R)), "BLOCK_O": min(cfg["BLOCK_O"], pow2(O))}


def row_splits(G: torch.Tensor, C: torch.Tensor) -> int:
    """How many row splits `grad_coeff` launches with (1: no partial sums to add)."""
    c = _config(G, C)
    B, N, O = G.shape
    tiles = triton.cdiv(O, c["BLOCK_O"]) * triton.cdiv(C.shape[2], c["BLOCK_R"])
    return _split_rows(N, B, tiles, c["BLOCK_N"], G.device)[1]


def grad_coeff(G: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """T[b] = G[b]^T C[b] as a new fp32 (B, O, R) tensor, for 3-D G (B, N, O), C (B, N, R).

    Matches `laser_triton.reference.grad_coeff`: fp32 products and accumulation.
    """
    check_grad_coeff(G, C, ndims=(3,))
    B, N, O = G.shape
    R = C.shape[2]
    store = get_store(G.device)
    dname = DTYPE_NAMES[G.dtype]
    cfg = _config(G, C)
    consts = dict(BOTH_BF16=G.dtype == torch.bfloat16 and C.dtype == torch.bfloat16,
                  G_IS_BF16=G.dtype == torch.bfloat16, INTERPRET=INTERPRET)

    def run(c: dict) -> torch.Tensor:
        tiles = triton.cdiv(O, c["BLOCK_O"]) * triton.cdiv(R, c["BLOCK_R"])
        rows, splits = _split_rows(N, B, tiles, c["BLOCK_N"], G.device)
        part = new_buffer((splits, B, O, R), torch.float32, G.device)
        _grad_coeff_kernel[(tiles, splits, B)](
            G, C, part, N, O, R, B, rows, G.stride(0), G.stride(1), G.stride(2),
            C.stride(0), C.stride(1), C.stride(2), **c, **consts)
        return part[0] if splits == 1 else part.sum(0)

    ran, T = launch("grad_coeff", run, cfg, lambda c: shrink_config(c, SPEC.block_keys))
    store.remember("grad_coeff", O, R, dname, N, ran)
    return T


# ----------------------------------------------------------------------------- declaration


def _signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    """One batch of row-major G (N, O) and C (N, R) in the activation dtype; D stands for O."""
    N, O, R, x = shape.N, shape.D, shape.r, f"*{shape.dtype}"
    block_o, block_r = min(cfg["BLOCK_O"], pow2(O)), min(cfg["BLOCK_R"], pow2(R))
    tiles = triton.cdiv(O, block_o) * triton.cdiv(R, block_r)
    want = max(1, PROGRAMS_PER_SM * SIGNATURE_SMS // tiles)
    rows = triton.cdiv(triton.cdiv(N, min(want, triton.cdiv(N, cfg["BLOCK_N"]))),
                       cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    runtime = dict(g_ptr=x, c_ptr=x, part_ptr="*fp32", N=N, O=O, R=R, B=1, rows_per_split=rows,
                   stride_gb=N * O, stride_gn=O, stride_go=1, stride_cb=N * R, stride_cn=R,
                   stride_cr=1)
    bf16 = shape.dtype == "bf16"
    return runtime, dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_O=block_o, BLOCK_R=block_r,
                         PRECISION=cfg["PRECISION"], BOTH_BF16=bf16, G_IS_BF16=bf16,
                         INTERPRET=False)


SPEC = declare(KernelSpec(
    name="grad_coeff", fn=_grad_coeff_kernel, signature=_signature,
    defaults={"BLOCK_N": 64, "BLOCK_O": 64, "BLOCK_R": 32, "PRECISION": "ieee",
              "num_warps": 4, "num_stages": 2},
    interpreter={"BLOCK_N": 256, "BLOCK_O": 128, "BLOCK_R": 64},
    grid=lambda s, cfg, sms: (triton.cdiv(s.D, min(cfg["BLOCK_O"], pow2(s.D)))
                              * triton.cdiv(s.r, min(cfg["BLOCK_R"], pow2(s.r))), 1, 1),
    block_keys=("BLOCK_N", "BLOCK_O", "BLOCK_R")))
