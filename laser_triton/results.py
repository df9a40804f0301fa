"""Result types shared by every backend."""

from __future__ import annotations

import torch


class CompressOut(tuple):
    """Result of `compress_pass`: unpacks as the 4-tuple (C, e_X, e_C, Y) of docs/design.md §6.1.

    Two extra fields ride along as attributes, produced by the same pass:
    - row_err_max: max over rows of sqrt(1 - ||c_i||^2 / ||x_i||^2) (fp32 scalar);
    - c_amax: max |C| before rounding to coeff_dtype (fp32 scalar), to detect overflow.
    All scalars are 0-dim device tensors; nothing here synchronizes.
    """

    __slots__ = ()

    def __new__(
        cls,
        C: torch.Tensor,
        e_X: torch.Tensor,
        e_C: torch.Tensor,
        Y: torch.Tensor | None,
        row_err_max: torch.Tensor,
        c_amax: torch.Tensor,
    ) -> CompressOut:
        return tuple.__new__(cls, (C, e_X, e_C, Y, row_err_max, c_amax))

    def __iter__(self):  # unpack as the public 4-tuple
        return iter(tuple.__getitem__(self, slice(0, 4)))

    def __len__(self) -> int:
        return 4

    def __repr__(self) -> str:
        return f"CompressOut(C={tuple(self.C.shape)}, e_X={self.e_X}, e_C={self.e_C})"

    C = property(lambda self: tuple.__getitem__(self, 0))
    e_X = property(lambda self: tuple.__getitem__(self, 1))
    e_C = property(lambda self: tuple.__getitem__(self, 2))
    Y = property(lambda self: tuple.__getitem__(self, 3))
    row_err_max = property(lambda self: tuple.__getitem__(self, 4))
    c_amax = property(lambda self: tuple.__getitem__(self, 5))
