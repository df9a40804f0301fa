"""What a study declares before its first run (`StudyProtocol`) and the shape of its records.

Shared by the orchestration (`runner`), the TRM runner (`trm`) and the report (`report`), so
that none of them imports another for these definitions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["ARMS", "RUN_COLUMNS", "RunFn", "StudyProtocol"]

ARMS = ("baseline", "laser")
RUN_COLUMNS = ["phase", "seed", "arm", "loss", "exact_acc", "cell_acc", "blank_acc",
               "activation_bytes", "raw_activation_bytes", "activation_bytes_final", "steps",
               "train_s"]
RunFn = Callable[[int, str, str], dict]  # (seed, arm, run_dir) -> metrics


@dataclass(frozen=True)
class StudyProtocol:
    """Everything declared before the first run."""

    preset: str = "tiny"
    steps: int = 150
    train: dict = field(default_factory=dict)  # TrainConfig overrides for both arms
    laser: dict = field(default_factory=dict)  # LaserConfig options of the LASER arm
    primary: str = "cell_acc"
    secondary: tuple = ("blank_acc", "exact_acc", "loss")
    margin_fraction: float = 0.05  # equivalence margin: +- this fraction of the baseline level
    alpha: float = 0.05
    power: float = 0.8
    pilot_seeds: int = 3
    min_seeds: int = 5
    max_seeds: int = 5
    first_seed: int = 0
    separate_pilot: bool = False
    checkpoint_every: int = 25
    memory_every: int = 10  # training steps between activation-memory samples

    def __post_init__(self) -> None:
        if self.pilot_seeds < 2:
            raise ValueError("the pilot needs at least 2 seeds to estimate a variance")
        if not 2 <= self.min_seeds <= self.max_seeds:
            raise ValueError("need 2 <= min_seeds <= max_seeds")
        if not self.separate_pilot and self.pilot_seeds > self.max_seeds:
            raise ValueError("an internal pilot cannot be larger than max_seeds")
        object.__setattr__(self, "secondary", tuple(self.secondary))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))
