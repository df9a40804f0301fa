"""Triton kernels for LASER's hot paths, installed as `laser_triton.kernels`.

One module per primitive, each with its kernels and launcher:
- `compress_pass(X, U, need_y, coeff_dtype)` -> CompressOut (C, e_X, e_C, Y; row_err_max, c_amax)
- `orthonormalize(Y)` -> (Q, ok) and `orthonormalize_batched(Ys)` -> ([Q], ok)
- `reconstruct(C, U, dtype)` -> X_hat
- `grad_coeff(G, C)` -> fp32 G^T C per batch (a linear layer's weight gradient in LASER's
  coefficient space)
- `supports(op, *tensors)`: whether the kernels are the better choice for these shapes.
- `launch_count(op, *tensors, need_y=True)`: how many kernels that launcher launches (the
  launch budget of issue 13 books every op call by it; a test checks it against the launches).
Launch configs come from `configs` (docs/design.md §7). Importing this package raises ImportError when
Triton is missing or broken, which `laser_triton.ops` takes as "use the torch reference".
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # not installed, or an install that fails on import
    raise ImportError(f"laser_triton.kernels needs a working Triton ({exc}); install it with "
                      'pip install "laser-triton[triton]"') from exc

import torch

from .compress_pass import compress_pass
from .compress_plan import rows_fit
from .grad_coeff import grad_coeff
from .orthonormalize import completion_matrix, orthonormalize, orthonormalize_batched
from .reconstruct import MAX_WIDTH as _RECONSTRUCT_MAX_WIDTH
from .reconstruct import reconstruct

__all__ = ["compress_pass", "orthonormalize", "orthonormalize_batched", "reconstruct", "grad_coeff",
           "supports", "launch_count", "completion_matrix", "MAX_D", "MAX_RANK", "MAX_ORTH_RANK"]

MAX_D = 8192  # widest activation the compress pass is built and tested for
MAX_RANK = 256  # largest basis rank of compress_pass / reconstruct
# Largest rank the orthonormalization kernels take under `auto` dispatch: up to 128 every one
# of them compiles for sm_90 without spills (the factor is blocked; no R_PAD x R_PAD register
# tile; tests/test_kernel_audit.py checks it). Larger ranks go to the torch reference.
MAX_ORTH_RANK = 128


def _span_fits(t: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """Whether t's element offsets along `dims` (sum of stride * (size - 1)) stay below 2^31.

    The kernels address rows with 64-bit offsets but columns and ranks with 32-bit ones
    (`dd * stride_xd`, `offs_k * stride_cr`, ...): a row-major tensor always fits; a strided
    view (say column-major X, stride N) with N * D >= 2^31 would wrap silently.
    """
    return sum(t.stride(d) * (t.shape[d] - 1) for d in dims) < 2**31


def supports(op: str, *tensors: torch.Tensor) -> bool:
    """True when the Triton kernels handle `op` on these tensors (metadata only, no sync).

    The inputs are those `laser_triton.validation` accepted (dtypes, ranks, shapes, devices:
    checked once there, by `ops` and the launchers alike); this decides only whether the
    kernels cover their sizes.
    """
    if not tensors:
        return False
    if op == "grad_coeff":  # G (B, N, O), C (B, N, R): any strides, any float dtypes
        G, C = tensors[0], tensors[1]
        return C.shape[2] <= MAX_RANK and _span_fits(G, (2,)) and _span_fits(C, (2,))
    if op == "compress_pass":
        X, U = tensors[0], tensors[1]
        return (X.shape[1] <= MAX_D and U.shape[1] <= MAX_RANK
                and rows_fit(X.shape[0], U.shape[1]) and _span_fits(X, (1,))
                and _span_fits(U, (0, 1)))
    if op == "reconstruct":
        C, U = tensors[0], tensors[1]
        return (C.shape[1] <= MAX_RANK and U.shape[0] <= _RECONSTRUCT_MAX_WIDTH
                and _span_fits(C, (1,)) and _span_fits(U, (0, 1)))
    if op == "orthonormalize":
        return all(Y.shape[0] <= MAX_D and Y.shape[1] <= MAX_ORTH_RANK for Y in tensors)
    return False


def launch_count(op: str, *tensors: torch.Tensor, need_y: bool = True, book: bool = False,
                 coeff_dtype: torch.dtype = torch.bfloat16) -> int:
    """Kernel launches one call of the launcher of `op` issues for these inputs (metadata only).

    compress_pass: fused kernel + finishing kernel, or coefficient kernel [+ Y kernel] +
    finishing kernel (`launch_plan`), plus the basis split on a basis's first tensor-core use;
    orthonormalize(_batched): gram, 3 factor steps, 2 applies (6; 8 when a padded rank exceeds
    64: the applies' Grams then run as Gram launches), plus one cat to pack several (or
    non-fp32, non-contiguous) inputs; reconstruct: 1 (+ the basis split on first use).
    Buffers are allocated, never filled. The basis split counts unless its halves are cached
    (`_basis.split_launches`); book=True (booking calls the kernels do not run) counts it on
    a basis's first booked call only, as a GPU run would launch it. coeff_dtype: compress_pass's
    C (the store may pick another design for it).
    """
    if op == "compress_pass":  # what `launch_plan` lists: [split_basis +] kernels + finish
        import importlib  # noqa: PLC0415

        from ._basis import split_launches  # noqa: PLC0415
        from ._common import DTYPE_NAMES  # noqa: PLC0415
        from .configs import get_store  # noqa: PLC0415

        cp = importlib.import_module(f"{__name__}.compress_pass")
        X, U = tensors[0], tensors[1]
        plan = cp.launch_plan(get_store(X.device), X.shape[0], X.shape[1], U.shape[1],
                              DTYPE_NAMES[X.dtype], need_y, DTYPE_NAMES[coeff_dtype],
                              tma_ok=cp.x_ok(X))
        return sum(split_launches(U, book) if k == "split_basis" else 1 for k, _, _ in plan)
    if op == "orthonormalize":
        from .orthonormalize import orth_launches  # noqa: PLC0415

        packed = len(tensors) == 1 and tensors[0].dtype == torch.float32 and \
            tensors[0].is_contiguous()
        return orth_launches(max(int(Y.shape[1]) for Y in tensors), packed)
    if op == "reconstruct":  # [split_basis +] the kernel
        from ._common import DTYPE_NAMES  # noqa: PLC0415
        from .configs import get_store  # noqa: PLC0415

        C, U = tensors[0], tensors[1]
        cname = DTYPE_NAMES[C.dtype]  # the output dtype defaults to C's
        cfg = get_store(C.device).lookup("reconstruct", U.shape[0], C.shape[1], cname,
                                         C.shape[0], cname)
        from ._basis import split_launches  # noqa: PLC0415

        return 1 + (split_launches(U, book) if cfg["PRECISION"] != "ieee" else 0)
    if op == "grad_coeff":  # the kernel, plus the sum of its row splits' partials if split
        from .grad_coeff import row_splits  # noqa: PLC0415

        return 1 if row_splits(*tensors) == 1 else 2
    raise ValueError(f"launch_count: unknown op {op!r}")
