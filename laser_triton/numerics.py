"""Numerical constants and fixed data that the Triton kernels and their torch twins share.

Kept in one place so that the two implementations cannot drift apart: the kernels import this
module (it depends on torch and `util` only, nothing of LASER's algorithm), and so does
`laser_triton.reference` (docs/design.md §2.6, §6.2).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .util import to_device_async

__all__ = ["DEGENERATE_REL", "ORTH_TOL", "completion_matrix", "COMPLETION_CACHE_SIZE"]

# Column j of the (column-scaled) input of orthonormalize is degenerate when its component
# orthogonal to the earlier columns is below this fraction of its norm. fp32 data cannot
# resolve directions much below ~1e-6 relative, so replacing them by completion directions
# loses nothing measurable.
DEGENERATE_REL = 1e-6

# orthonormalize reports ok = False when max |Q^T Q - I| exceeds this (or a factor failed, or Q
# is not finite); callers then keep their previous basis.
ORTH_TOL = 1e-4

_COMPLETION_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
COMPLETION_CACHE_SIZE = 16  # bounded: resets ask for many (D, r) shapes over a run


def completion_matrix(D: int, r: int, device: torch.device) -> torch.Tensor:
    """The fixed D x r fp64 matrix (unit columns) whose columns replace degenerate ones.

    Seeded by the shape alone, independently of the global RNG, so results do not depend on
    user randomness and the kernels and the reference complete with the same directions.
    Cached per (D, r, device), at most COMPLETION_CACHE_SIZE entries.
    """
    key = (D, r, str(device))
    Z = _COMPLETION_CACHE.get(key)
    if Z is not None:
        _COMPLETION_CACHE.move_to_end(key)
    else:
        gen = torch.Generator().manual_seed(0x1A5E2 + 7919 * D + r)
        Z = torch.randn(D, r, generator=gen, dtype=torch.float64)
        Z = to_device_async(Z / Z.norm(dim=0, keepdim=True), torch.device(device))
        _COMPLETION_CACHE[key] = Z
        while len(_COMPLETION_CACHE) > COMPLETION_CACHE_SIZE:
            _COMPLETION_CACHE.popitem(last=False)
    return Z
