"""Helpers shared by the kernel launchers: device facts, output allocation, launch fallback.

Nothing here knows about LASER's algorithm. The `@triton.jit` helpers at the bottom implement
the fp32-accurate tensor-core products every kernel uses (docs/design.md §6.4, §8).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl

from ..validation import DTYPE_NAMES  # noqa: F401  (re-exported for the launchers)

log = logging.getLogger("laser_triton")
T = TypeVar("T")

# TRITON_INTERPRET is read by Triton at import time, so it is read here once, too. Kernels get it
# as a constexpr: the interpreter computes garbage for bf16 arithmetic (docs/design.md §8), so under it
# the bf16 halves of a split product are widened to fp32 before tl.dot (same values, exactly).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Test mode: fill every output and scratch buffer with NaN (or -1) before launch, so a test
# proves each element is written. Toggled by tests (monkeypatch) or LASER_TRITON_POISON=1.
POISON: bool = os.environ.get("LASER_TRITON_POISON", "0") not in ("", "0")

# fp32 product modes. "bf16x3" (the default of every kernel that multiplies): each fp32
# operand is split into hi + lo bf16 halves and the significant products are summed on bf16
# tensor cores with fp32 accumulation, about 2^-17 relative error per product (the lo x lo
# term is dropped); a bf16 X is exact in bf16, so products with it need two MMAs, not three.
# "ieee": exact fp32 FMA math (no tensor cores), kept as an option and as a reference.
PRECISIONS = ("ieee", "bf16x3")

TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.int8: "i8"}


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo) (tl.arange and tl.dot need powers of two >= 16)."""
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a small fixed number under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output or scratch buffer: uninitialised, or poisoned (NaN / -1) in test mode."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


_TICKETS: dict[tuple, torch.Tensor] = {}


def capturing(device: torch.device) -> bool:
    """Whether launches on `device` are being captured into a CUDA graph right now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def ticket_counters(device: torch.device, n: int, owner: str) -> torch.Tensor:
    """At least n zeroed int32 ticket counters of `owner` (a kernel family) for this device
    and current stream. The last program to take a ticket resets it to 0, so one buffer
    serves every launch on the stream without a memset (launches on a stream never overlap);
    it is allocated (one zero fill) only when a call needs more than any before.

    Under CUDA-graph capture a fresh buffer is returned and not cached: its zero fill is a
    node of the graph (it runs at each replay, so replays start from 0), and a cached one
    would live in the graph's private memory pool, read before the first replay or after
    the graph is gone."""
    if capturing(device):
        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (owner, str(device), stream)
    counters = _TICKETS.get(key)
    if counters is None or counters.numel() < n:
        counters = _TICKETS[key] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    return counters


def launch(name: str, run: Callable[[dict], T], config: dict,
           shrink: Callable[[dict], dict | None] | None = None) -> tuple[dict, T]:
    """`run(config)` (which allocates and launches); on out-of-resource errors, smaller configs.

    A config read from a file may not fit this GPU (another GPU's file, another Triton). Each
    failure is logged and `shrink(config)` proposes a smaller one. Returns the config that ran
    (for the caller to remember) and what `run` returned. `run` sizes grids and buffers from
    the config it is given.
    """
    from triton.runtime.errors import OutOfResources  # noqa: PLC0415

    cfg = dict(config)
    while True:
        try:
            return cfg, run(cfg)
        except OutOfResources as exc:
            smaller = shrink(cfg) if shrink is not None else None
            if smaller is None or smaller == cfg:
                raise
            log.warning("laser_triton: %s config %s does not fit (%s); retrying with %s",
                        name, cfg, exc, smaller)
            cfg = smaller


def shrink_config(cfg: dict, block_keys: tuple[str, ...], min_block: int = 16) -> dict | None:
    """Halve num_stages first, then the largest block; None when nothing can shrink."""
    cfg = dict(cfg)
    if cfg.get("num_stages", 1) > 1:
        cfg["num_stages"] -= 1
        return cfg
    blocks = [k for k in block_keys if cfg.get(k, 0) > min_block]
    if not blocks:
        return None
    big = max(blocks, key=lambda k: cfg[k])
    cfg[big] //= 2
    return cfg


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _round_bf16(v):
    """v (fp32) rounded to the nearest bf16 value, ties to even, still in fp32.

    Done on the bits so that the split is the same on every backend (the interpreter's
    fp32 -> bf16 cast truncates, which biases the split's error).
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split_bf16(v):
    """v (fp32) = hi + lo + e with hi, lo in bf16 and |e| <= 2^-18 |v| (finite v)."""
    hi = _round_bf16(v)
    lo = _round_bf16(v - hi)
    return hi.to(tl.bfloat16), lo.to(tl.bfloat16)  # exact casts: already bf16 values


@triton.jit
def _bf16_dot(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b for bf16 tiles on tensor cores with an fp32 accumulator."""
    if INTERPRET:  # exact same values, computed in fp32 (bf16 arithmetic is broken there)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def mma_fp32(a, b, acc, PRECISION: tl.constexpr, A_IS_BF16: tl.constexpr,
             INTERPRET: tl.constexpr):
    """acc + a @ b for fp32 tiles at fp32-class accuracy (see PRECISIONS); used by grad_coeff.

    A_IS_BF16 says that `a` holds values loaded from a bf16 tensor: then its lo half is zero
    and the split needs two products instead of three.
    """
    if PRECISION == "ieee":
        return tl.dot(a, b, acc, input_precision="ieee")
    b_hi, b_lo = _split_bf16(b)
    if A_IS_BF16:
        a_hi = a.to(tl.bfloat16)  # exact: the values came from a bf16 tensor
        acc = _bf16_dot(a_hi, b_lo, acc, INTERPRET)
    else:
        a_hi, a_lo = _split_bf16(a)
        acc = _bf16_dot(a_lo, b_hi, acc, INTERPRET)  # small terms first
        acc = _bf16_dot(a_hi, b_lo, acc, INTERPRET)
    return _bf16_dot(a_hi, b_hi, acc, INTERPRET)


@triton.jit
def mma_pre(x, b_hi, b_lo, acc, INTERPRET: tl.constexpr):
    """acc + x @ (b_hi + b_lo) on bf16 tensor cores with fp32 accumulation.

    `b_hi`, `b_lo`: an fp32 operand already split into bf16 halves (`_split_bf16`, or the
    basis split once per call by `_basis.split_basis`). `x` as loaded: a bf16 tile is exact
    and goes in as it is (2 products; no fp32 copy, half the registers); fp16 and fp32 tiles
    are split too (3 products, the lo x lo term dropped: about 2^-17 relative per product).
    (Every helper here uses if/else, not an early return: Triton compiles the code after a
    constexpr `if` that returns, and it must be valid for the other operand types too.)
    """
    if x.dtype == tl.bfloat16:
        acc = _bf16_dot(x, b_lo, acc, INTERPRET)  # small terms first
        acc = _bf16_dot(x, b_hi, acc, INTERPRET)
    else:
        x_hi, x_lo = _split_bf16(x.to(tl.float32))
        acc = _bf16_dot(x_lo, b_hi, acc, INTERPRET)
        acc = _bf16_dot(x_hi, b_lo, acc, INTERPRET)
        acc = _bf16_dot(x_hi, b_hi, acc, INTERPRET)
    return acc


@triton.jit
def mma_split(x, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + x @ b for `x` as loaded and an fp32 `b` split here ("bf16x3"), or exact fp32
    FMA products ("ieee")."""
    if PRECISION == "ieee":
        acc = tl.dot(x.to(tl.float32), b, acc, input_precision="ieee")
    else:
        b_hi, b_lo = _split_bf16(b)
        acc = mma_pre(x, b_hi, b_lo, acc, INTERPRET)
    return acc


@triton.jit
def load_basis(u_ptr, ulo_ptr, offs, mask, PRECISION: tl.constexpr):
    """A tile of the basis: (fp32 U, the same) for "ieee", or its (hi, lo) bf16 halves."""
    hi = tl.load(u_ptr + offs, mask=mask, other=0.0)
    if PRECISION == "ieee":
        lo = hi
    else:
        lo = tl.load(ulo_ptr + offs, mask=mask, other=0.0)
    return hi, lo


@triton.jit
def mma_basis(x, u_hi, u_lo, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + x @ U for a basis tile from `load_basis`."""
    if PRECISION == "ieee":
        acc = tl.dot(x.to(tl.float32), u_hi, acc, input_precision="ieee")
    else:
        acc = mma_pre(x, u_hi, u_lo, acc, INTERPRET)
    return acc


@triton.jit
def nan_max(v, axis: tl.constexpr):
    """tl.max that returns NaN when any element is NaN (tl.max drops NaN on GPUs)."""
    m = tl.max(v, axis=axis)
    n_nan = tl.sum((v != v).to(tl.int32), axis=axis)
    return tl.where(n_nan > 0, float("nan"), m)
