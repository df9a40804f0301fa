"""Tiny Recursive Model (TRM) with LASER inside.

    from laser_triton.trm import TRM, TRMConfig
    model = TRM(TRMConfig.paper_sudoku(), laser=lt.Laser(lt.LaserConfig()))
"""

from .config import PRESETS, TRMConfig
from .losses import act_loss, stablemax_cross_entropy
from .model import TRM, Carry
from .sparse import PuzzleEmbedding, SparseSignSGD

__all__ = ["TRM", "TRMConfig", "Carry", "PRESETS", "PuzzleEmbedding", "SparseSignSGD",
           "act_loss", "stablemax_cross_entropy"]
