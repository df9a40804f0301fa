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

from . import ops, reference
from .config import LaserConfig
from .hooks import Laser

__all__ = ["Laser", "LaserConfig", "ops", "reference", "trm", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The model is imported on first use: `lt.trm.TRM(...)`.
    if name in ("trm", "data"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'laser_triton' has no attribute {name!r}")
