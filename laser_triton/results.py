"""Result types shared by every backend."""

from __future__ import annotations

import torch


class CompressOut(tuple):
    """Result of `compress_pass`: unpacks as the 4-tuple (C, e_X, e_C, Y) of docs/design.md §6.1.

    Two extra fields ride along as attributes, produced by the same pass:
    - row_err_max: max over rows of sqrt(1 - ||c_i||^2 / ||x_i||^2) (fp32 scalar);
    - c_amax: max |C| before rounding to coeff_dtype (fp32 scalar), to detect overflow.
    - stats: the four scalars (e_X, e_C, row_err_max, c_amax) as one (4,) fp32 buffer, of
      which the scalars are views when the backend produced them so (both do); the decisions
      stack these buffers, one launch per batch instead of several per tensor.
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
        stats: torch.Tensor | None = None,
    ) -> CompressOut:
        return tuple.__new__(cls, (C, e_X, e_C, Y, row_err_max, c_amax, stats))

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

    @property
    def stats(self) -> torch.Tensor:
        s = tuple.__getitem__(self, 6)
        if s is None:  # built by a caller from separate scalars: one stack
            s = torch.stack([self.e_X, self.e_C, self.row_err_max, self.c_amax])
        return s
