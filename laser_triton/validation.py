"""Input checks of every op, shared by `laser_triton.ops` and the kernel launchers
(docs/design.md §6.5).

One definition per fact, so an input is rejected with the same message whether it enters
through `ops` or a launcher in `laser_triton.kernels`. The checks read metadata only (no host
synchronization) and name the problem: TypeError for types and dtypes, ValueError for ranks,
shapes, emptiness and devices. Like `numerics`, this module depends on torch alone, so the
kernels can import it and `ops` runs it without Triton. Whether the kernels cover a valid
input's sizes is a separate question (`kernels.supports`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["FLOAT_DTYPES", "DTYPE_NAMES", "DTYPES_BY_NAME", "check_tensor", "check_basis", "check_out_dtype", "check_compress_pass",
           "check_reconstruct", "check_orthonormalize", "check_grad_coeff"]

# The activation, coefficient and output dtypes every op takes, and their short names (the
# config store's keys, command lines).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = dict(zip(FLOAT_DTYPES, ("fp32", "bf16", "fp16")))
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t: object, ndim: int,
                 dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> torch.Tensor:
    """A non-empty, dense `ndim`-D tensor of one of `dtypes` (any strides); TypeError /
    ValueError naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:  # sparse layouts have no strides for the kernels to follow
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {_names(dtypes)}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def check_basis(U: object, device: torch.device, *, width: int | None = None,
                rank: int | None = None, what: str = "U",
                other: str = "the activation") -> torch.Tensor:
    """An fp32 (D, r) basis with r <= D on `device` (and D == width, r == rank when given)."""
    U = check_tensor(what, U, 2, (torch.float32,))
    D, r = U.shape
    if width is not None and D != width:
        raise ValueError(f"{what} has {D} rows but the activation width is {width}")
    if rank is not None and r != rank:
        raise ValueError(f"C has rank {rank} but {what} has rank {r}")
    if r > D:
        raise ValueError(f"rank {r} of {what} exceeds its width {D}")
    if U.device != device:
        raise ValueError(f"{what} is on {U.device} but {other} is on {device}")
    return U


def check_out_dtype(what: str, dtype: object) -> torch.dtype:
    """A dtype the ops can write (FLOAT_DTYPES)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} {dtype} is not one of {_names(FLOAT_DTYPES)}")
    return dtype


def check_compress_pass(X: object, U: object, coeff_dtype: object = None) -> torch.dtype:
    """X (N, D) float, U (D, r) fp32 with r <= D on X's device; returns the coefficient dtype
    (default X.dtype)."""
    X = check_tensor("X", X, 2)
    check_basis(U, X.device, width=X.shape[1])
    return check_out_dtype("coeff_dtype", X.dtype if coeff_dtype is None else coeff_dtype)


def check_reconstruct(C: object, U: object, dtype: object = None) -> torch.dtype:
    """C (N, r) float, U (D, r) fp32 with r <= D on C's device; returns the output dtype
    (default C.dtype)."""
    C = check_tensor("C", C, 2)
    check_basis(U, C.device, rank=C.shape[1], other="C")
    return check_out_dtype("output dtype", C.dtype if dtype is None else dtype)


def check_orthonormalize(Ys: Sequence[object], names: Sequence[str] | None = None) -> None:
    """Float (D, r) matrices with r <= D, all on the first one's device. `names` name them in
    errors (default Ys[i])."""
    names = [f"Ys[{i}]" for i in range(len(Ys))] if names is None else names
    for name, Y in zip(names, Ys):
        check_tensor(name, Y, 2)
        if Y.shape[1] > Y.shape[0]:
            raise ValueError(f"{name}: rank {Y.shape[1]} exceeds width {Y.shape[0]}: "
                             "cannot orthonormalize")
        if Y.device != Ys[0].device:
            raise ValueError(f"{name} is on {Y.device} but {names[0]} is on {Ys[0].device}")


def check_grad_coeff(G: object, C: object, ndims: tuple[int, ...] = (2, 3)) -> None:
    """G (..., N, O) and C (..., N, R), float, of one of `ndims` dimensions each, agreeing in
    every dimension but the last, on one device."""
    if not isinstance(G, torch.Tensor) or not isinstance(C, torch.Tensor):
        raise TypeError("grad_coeff: G and C must be torch.Tensors")
    if G.dim() != C.dim() or G.dim() not in ndims:
        allowed = " or ".join(f"both {n}-D" for n in ndims).replace("both", "both be", 1)
        raise ValueError(f"grad_coeff: G and C must {allowed}, got shapes "
                         f"{tuple(G.shape)} and {tuple(C.shape)}")
    check_tensor("G", G, G.dim())
    check_tensor("C", C, C.dim())
    if G.shape[:-1] != C.shape[:-1]:
        raise ValueError(f"grad_coeff: G {tuple(G.shape)} and C {tuple(C.shape)} must agree in "
                         "every dimension but the last (the rows of the same activation)")
    if G.device != C.device:
        raise ValueError(f"C is on {C.device} but G is on {G.device}")
