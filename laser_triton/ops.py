"""The one dispatch point between LASER's algorithm and its backends.

Every public op validates its inputs from metadata only (no host synchronization; the checks
live in `validation`, which the kernel launchers run too, so both reject alike) and then
runs either the Triton kernels (`laser_triton.kernels`) or the pure-torch reference
(`laser_triton.reference`). Nothing else in the package picks a backend.

Triton launches on the *current* CUDA device and its current stream, so every kernel call
below runs under `device_guard(tensor.device)`: the tensor's device and that device's current
stream, whatever device the caller left current.

Backend choice (`LASER_TRITON_BACKEND`):
- `auto` (default): Triton for CUDA tensors when Triton imports and the kernel supports the
  shape; the torch reference otherwise.
- `torch`: always the reference.
- `triton`: always the kernels; with TRITON_INTERPRET=1 they run on CPU tensors too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Sequence

import torch

from . import launches, reference
from .results import CompressOut
from .util import device_guard
from .validation import (
    FLOAT_DTYPES,
    check_compress_pass,
    check_grad_coeff,
    check_orthonormalize,
    check_reconstruct,
)

__all__ = [
    "compress_pass",
    "orthonormalize",
    "orthonormalize_batched",
    "reconstruct",
    "grad_coeff",
    "backend_for",
    "FLOAT_DTYPES",
]

log = logging.getLogger("laser_triton")

_BACKENDS = ("auto", "torch", "triton")


# ----------------------------------------------------------------------------- backend choice


def _env_backend() -> str:
    b = os.environ.get("LASER_TRITON_BACKEND", "auto").strip().lower() or "auto"
    if b not in _BACKENDS:
        raise ValueError(f"LASER_TRITON_BACKEND={b!r}; expected one of {', '.join(_BACKENDS)}")
    return b


@functools.lru_cache(maxsize=1)
def _triton_kernels():
    """The kernels package if Triton imports and provides the ops, else None (logged once)."""
    try:
        from . import kernels  # noqa: PLC0415  (laser_triton.kernels, installed from kernels/)

        if not all(hasattr(kernels, f) for f in ("compress_pass", "orthonormalize", "reconstruct")):
            raise ImportError("laser_triton.kernels provides no launchers")
        return kernels
    except Exception as exc:  # ImportError, or a broken Triton install
        log.info("laser_triton: Triton kernels unavailable (%s); using the torch reference", exc)
        _UNAVAILABLE.append(" ".join(str(exc).split()))
        return None


_UNAVAILABLE: list[str] = []  # why the kernels did not import


@functools.lru_cache(maxsize=1)
def _warn_reference_on_gpu() -> None:
    """Once per process: CUDA tensors run the (slower) torch reference for want of Triton."""
    warnings.warn("laser_triton: the Triton kernels are unavailable "
                  f"({_UNAVAILABLE[0] if _UNAVAILABLE else 'unknown reason'}); LASER runs its "
                  'torch reference on the GPU instead, which is slower (pip install '
                  '"laser-triton[triton]")', RuntimeWarning, stacklevel=3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(op: str, *tensors: torch.Tensor) -> str:
    """'triton' or 'torch' for this op on these tensors (see the module docstring)."""
    choice = _env_backend()
    if choice == "torch":
        return "torch"
    kernels = _triton_kernels()
    if choice == "triton":
        if kernels is None:
            raise RuntimeError("LASER_TRITON_BACKEND=triton but the Triton kernels cannot be "
                               f"imported ({_UNAVAILABLE[0] if _UNAVAILABLE else 'unknown'}); "
                               'pip install "laser-triton[triton]"')
        if not (all(t.is_cuda for t in tensors) or _interpreting()):
            raise RuntimeError(
                "LASER_TRITON_BACKEND=triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)"
            )
        return "triton"
    if kernels is None or not all(t.is_cuda for t in tensors):
        if kernels is None and tensors and all(t.is_cuda for t in tensors):
            _warn_reference_on_gpu()
        return "torch"
    return "triton" if kernels.supports(op, *tensors) else "torch"


def _book(op: str, *tensors: torch.Tensor, need_y: bool = True,
          coeff_dtype: torch.dtype = torch.bfloat16):
    """Under a `launches.LaunchCounter`: book this call as the launches of the Triton launcher
    when the kernels handle these inputs (what `auto` runs on a GPU), else count its torch ops.
    Without a counter (always, outside the benchmarks): a shared no-op context."""
    if launches.active() is None:
        return _NO_BOOKING
    kernels = _triton_kernels()
    n = None
    if kernels is not None and kernels.supports(op, *tensors):
        n = kernels.launch_count(op, *tensors, need_y=need_y, book=True,
                                 coeff_dtype=coeff_dtype)
    return launches.booked(op, n)


_NO_BOOKING = contextlib.nullcontext()

# ----------------------------------------------------------------------------- ops


def compress_pass(
    X: torch.Tensor,
    U: torch.Tensor,
    need_y: bool = True,
    coeff_dtype: torch.dtype | None = None,
) -> CompressOut:
    """One pass over X (N x D): C = X U, ||X||^2, ||C||^2 and, if need_y, Y = X^T C.

    Unpacks as (C, e_X, e_C, Y); `.row_err_max` and `.c_amax` are extra fields (see
    `CompressOut`). C has `coeff_dtype` (default X.dtype); the rest is fp32.
    """
    coeff_dtype = check_compress_pass(X, U, coeff_dtype)
    with _book("compress_pass", X, U, need_y=need_y, coeff_dtype=coeff_dtype):
        if backend_for("compress_pass", X, U) == "triton":
            with device_guard(X.device):
                return _triton_kernels().compress_pass(X, U, need_y, coeff_dtype)
        return reference.compress_pass(X, U, need_y, coeff_dtype)


def orthonormalize(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal fp32 basis of span(Y) (D x r, r <= D) and a device bool `ok`."""
    check_orthonormalize([Y], ["Y"])
    with _book("orthonormalize", Y):
        if backend_for("orthonormalize", Y) == "triton":
            with device_guard(Y.device):
                return _triton_kernels().orthonormalize(Y)
        return reference.orthonormalize(Y)


def orthonormalize_batched(Ys: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Orthonormalize the bases of many sites in one call; `ok` is a bool tensor per input."""
    Ys = list(Ys)
    check_orthonormalize(Ys)
    if not Ys:
        return reference.orthonormalize_batched(Ys)
    with _book("orthonormalize", *Ys):
        if backend_for("orthonormalize", *Ys) == "triton":
            with device_guard(Ys[0].device):
                return _triton_kernels().orthonormalize_batched(Ys)
        return reference.orthonormalize_batched(Ys)


def reconstruct(C: torch.Tensor, U: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """X_hat = C U^T (N x D), computed in fp32 and returned in `dtype` (default C.dtype)."""
    dtype = check_reconstruct(C, U, dtype)
    with _book("reconstruct", C, U):
        if backend_for("reconstruct", C, U) == "triton":
            with device_guard(C.device):
                return _triton_kernels().reconstruct(C, U, dtype)
        return reference.reconstruct(C, U, dtype)


def grad_coeff(G: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """T = G^T C in fp32: (O, R) for G (N, O) and C (N, R); (B, O, R) for G (B, N, O) and C
    (B, N, R), where C may be expanded along B (stride 0). Any float dtypes; the products and
    their sums are fp32 (a linear layer's weight gradient in LASER's coefficient space)."""
    check_grad_coeff(G, C)
    flat = G.dim() == 2
    G3, C3 = (G.unsqueeze(0), C.unsqueeze(0)) if flat else (G, C)
    with _book("grad_coeff", G3, C3):
        if backend_for("grad_coeff", G3, C3) == "triton":
            with device_guard(G.device):
                T = _triton_kernels().grad_coeff(G3, C3)
        else:
            T = reference.grad_coeff(G3, C3)
    return T[0] if flat else T
