"""The fp32 basis U split into bf16 halves, hi + lo, once per basis (docs/design.md §6.4).

The tensor-core products of reconstruct (`_common.mma_pre`, "bf16x3") take U as two bf16
halves. Splitting a U tile inside its loop costs ~10 integer instructions per element for
every row block that reuses it; split once here (one small launch the first time a basis is
used, cached while it lives), the loop loads two bf16 tiles instead of one fp32 tile (same
bytes) straight into the MMAs. (compress_pass splits in registers instead: a basis is usually
compressed with once per step, and its launch count is budgeted.)"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from ._common import _split_bf16, capturing, new_buffer, pow2
from ._spec import KernelSpec, Shape, declare

__all__ = ["split_basis", "basis_operands", "is_split", "split_launches"]


@triton.jit
def _split_basis_kernel(u_ptr, hi_ptr, lo_ptr, D, R, stride_ud, stride_ur,
                        BLOCK_D: tl.constexpr, R_PAD: tl.constexpr):
    """U = hi + lo + e (|e| <= 2^-18 |U|) with hi, lo in bf16, for one block of BLOCK_D rows of
    the (D, R) fp32 basis; hi and lo are written as contiguous (D, R) bf16 tensors."""
    rows = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.arange(0, R_PAD)
    mask = (rows < D)[:, None] & (cols < R)[None, :]
    # tile (BLOCK_D, R_PAD) of U, any strides; padded columns are 0
    u = tl.load(u_ptr + rows[:, None] * stride_ud + cols[None, :] * stride_ur, mask=mask,
                other=0.0)
    hi, lo = _split_bf16(u)
    tl.store(hi_ptr + rows[:, None] * R + cols[None, :], hi, mask=mask)
    tl.store(lo_ptr + rows[:, None] * R + cols[None, :], lo, mask=mask)


CONFIG = {"BLOCK_D": 64, "num_warps": 4, "num_stages": 1}


# U -> (hi, lo), kept while U lives. LASER's bases are immutable (a new tensor per update,
# never written in place), and each is used by many compress and reconstruct calls: splitting
# once per basis instead of once per call keeps the per-call launch count of the tensor-core
# path at the "ieee" path's (issue 13's budget). The halves take the bytes of U again.
_SPLITS: dict[int, tuple[weakref.ref, tuple, torch.Tensor, torch.Tensor]] = {}


def _identity(U: torch.Tensor) -> tuple:
    return (U.data_ptr(), U._version, tuple(U.shape), U.stride(), U.device)


def is_split(U: torch.Tensor) -> bool:
    """Whether `split_basis(U)` would reuse its halves (no launch)."""
    hit = _SPLITS.get(id(U))
    return hit is not None and hit[0]() is U and hit[1] == _identity(U)


_BOOKED: dict[int, weakref.ref] = {}


def split_launches(U: torch.Tensor, book: bool = False) -> int:
    """Launches the basis split adds to a call with `U`: 1 unless `split_basis` already holds
    U's halves. book=True (launch booking without running the kernels: the torch backend
    books what a GPU would launch) also remembers U, so only its first booked call counts
    the split, as on a GPU."""
    if is_split(U):
        return 0
    if not book:
        return 1
    key = id(U)
    ref = _BOOKED.get(key)
    if ref is not None and ref() is U:
        return 0
    _BOOKED[key] = weakref.ref(U, lambda _, k=key: _BOOKED.pop(k, None))
    return 1


def clear_cache() -> None:
    """Forget every basis's halves (the next call with it splits again)."""
    _SPLITS.clear()
    _BOOKED.clear()


def _capturing(U: torch.Tensor) -> bool:
    """Whether U's kernels are being captured into a CUDA graph right now."""
    return capturing(U.device)


def split_basis(U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo): contiguous bf16 (D, r) tensors with hi + lo = U to about 2^-17 relative;
    computed once per basis (and again if U is modified in place)."""
    if is_split(U):
        return _SPLITS[id(U)][2:]
    hi, lo = _split(U)
    if _capturing(U):
        # Under CUDA-graph capture the split only runs when the graph is replayed: cached,
        # its halves would be read uninitialized by any call before the first replay (or
        # after the graph and its memory pool are gone). The graph keeps its own split.
        return hi, lo
    key = id(U)
    _SPLITS[key] = (weakref.ref(U, lambda _, k=key: _SPLITS.pop(k, None)), _identity(U), hi, lo)
    return hi, lo


def _split(U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    D, R = U.shape
    hi = new_buffer((D, R), torch.bfloat16, U.device)
    lo = new_buffer((D, R), torch.bfloat16, U.device)
    block = max(1, min(CONFIG["BLOCK_D"], 8192 // pow2(R)))  # <= 8192 elements per program
    block = 1 << (block.bit_length() - 1)
    _split_basis_kernel[(triton.cdiv(D, block),)](
        U, hi, lo, D, R, U.stride(0), U.stride(1), BLOCK_D=block, R_PAD=pow2(R),
        num_warps=CONFIG["num_warps"], num_stages=CONFIG["num_stages"])
    return hi, lo


def basis_operands(U: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """What a kernel's (u_ptr, ulo_ptr, stride_ud, stride_ur) get for `precision`."""
    if precision == "ieee":
        return U, U, U.stride(0), U.stride(1)
    hi, lo = split_basis(U)
    return hi, lo, hi.stride(0), hi.stride(1)


def _signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    runtime = dict(u_ptr="*fp32", hi_ptr="*bf16", lo_ptr="*bf16", D=shape.D, R=shape.r,
                   stride_ud=shape.r, stride_ur=1)  # row-major, as LASER's bases are
    block = 1 << (max(1, min(cfg["BLOCK_D"], 8192 // pow2(shape.r))).bit_length() - 1)
    return runtime, dict(BLOCK_D=block, R_PAD=pow2(shape.r))


SPEC = declare(KernelSpec(
    name="split_basis", fn=_split_basis_kernel, signature=_signature, defaults=CONFIG,
    grid=lambda s, cfg, sms: (triton.cdiv(s.D, cfg["BLOCK_D"]),), stored=False))
