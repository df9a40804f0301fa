"""laser-triton: LASER (Low-Rank Activation SVD for Efficient Recursion) for TRM training.

    import laser_triton as lt
    laser = lt.Laser(lt.LaserConfig(tau=0.05))
    with laser.compress():
        loss = model(x).sum()
    loss.backward()
    print(laser.report())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["Laser", "LaserConfig", "data", "ops", "reference", "trm", "__version__"]
__version__ = "0.1.0"

# Everything is imported on first use (`lt.Laser`, `lt.trm.TRM`), so that `import laser_triton`
# and `laser-triton --help` import no torch, and torch.compile's machinery (dynamo, sympy,
# Triton) is imported only when the first `Laser` is built.
_LAZY = {"Laser": ".hooks", "LaserConfig": ".config"}
_SUBMODULES = ("ops", "reference", "trm", "data")

if TYPE_CHECKING:
    from . import data, ops, reference, trm
    from .config import LaserConfig
    from .hooks import Laser


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'laser_triton' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
