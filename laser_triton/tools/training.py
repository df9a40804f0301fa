"""Training configuration and helpers: data, LASER construction, EMA, learning-rate schedule.

The trainer itself (`Trainer`) lives in `trainer.py`; this module holds what it and the demo/eval
commands share. Hyper-parameters of the paper presets follow the reference's Sudoku command
(pretrain.py with `lr=1e-4 puzzle_emb_lr=1e-4 weight_decay=1.0 puzzle_emb_weight_decay=1.0
ema=True`, global batch 768, 2000 warm-up steps, constant learning rate after warm-up).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from laser_triton.data import sudoku
from laser_triton.trm import TRMConfig

__all__ = ["TrainConfig", "EMA", "lr_at", "load_data", "make_laser",
           "read_checkpoint", "resolve_device"]


@dataclass
class TrainConfig:
    """Everything a training run needs; `laser` holds LaserConfig keyword arguments."""

    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # TRMConfig overrides
    # Data: a Sudoku-Extreme CSV file, or the generator (data=None)
    data: str | None = None
    test_data: str | None = None
    train_puzzles: int = 1000  # generated pool size (the reference subsamples 1000 puzzles)
    test_puzzles: int = 256
    clues: int = 30  # givens of generated puzzles (difficulty)
    data_seed: int = 0
    augment: bool = True
    # Optimization
    steps: int = 1000
    batch_size: int = 768
    lr: float = 1e-4
    lr_warmup_steps: int = 2000
    lr_min_ratio: float = 1.0  # cosine decay floor after warm-up; 1.0 = constant (reference)
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    puzzle_emb_lr: float = 1e-4
    puzzle_emb_weight_decay: float = 1.0
    ema: bool = True
    ema_rate: float = 0.999
    # Evaluation and bookkeeping
    eval_every: int = 0  # 0: only at the end
    eval_batch_size: int = 256
    checkpoint_every: int = 0
    seed: int = 0
    device: str = "auto"
    compile: bool = False  # torch.compile the network (the reference compiles its model)
    # LASER: one switch, and every LaserConfig field
    use_laser: bool = False
    laser: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Values that mean nothing fail here, naming the field, before any work starts."""
        from laser_triton.trm.config import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"unknown TRM preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        at_least = {"steps": 1, "batch_size": 1, "train_puzzles": 1, "test_puzzles": 1,
                    "eval_batch_size": 1, "eval_every": 0, "checkpoint_every": 0,
                    "lr_warmup_steps": 0, "clues": 17}
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.clues > 81:
            raise ValueError(f"clues must be at most 81 (a Sudoku has 81 cells), got {self.clues}")
        for name in ("lr", "puzzle_emb_lr", "weight_decay", "puzzle_emb_weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "ema_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")

    @classmethod
    def for_preset(cls, preset: str, **overrides: object) -> TrainConfig:
        """Paper hyper-parameters for the paper presets; CPU-scaled ones for `tiny`."""
        TRMConfig.preset(preset)  # validates the name
        base: dict[str, object] = {"preset": preset}
        if preset == "tiny":
            # A few hundred steps on 2 cores: warm-up, EMA horizon and lr scaled down with them;
            # easier puzzles so that learning shows within minutes.
            # (lr 3e-3 with the paper's weight decay 1.0 learned fastest of those tried.)
            base.update(batch_size=32, lr=3e-3, lr_warmup_steps=20, ema_rate=0.95,
                        weight_decay=1.0, puzzle_emb_lr=3e-3, puzzle_emb_weight_decay=1.0,
                        train_puzzles=400, test_puzzles=128, clues=45, steps=150,
                        eval_batch_size=128)
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    def model_config(self) -> TRMConfig:
        return TRMConfig.preset(self.preset).replace(**self.model)

    def to_dict(self) -> dict[str, object]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when there is a GPU, else CPU) or a torch device name that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here "
                         "(use --device cpu)")
    return device


def read_checkpoint(path: str) -> dict:
    """A checkpoint written by `laser-triton train`, or a ValueError saying what `path` is."""
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors alike: not a checkpoint
        raise ValueError(f"{path} is not a checkpoint torch can read ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(state, dict) or not {"config", "model", "step"} <= set(state):
        raise ValueError(f"{path} is not a checkpoint written by `laser-triton train` "
                         "(no config, model and step in it)")
    return state


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """The reference's schedule at 1-based `step`: linear warm-up, then cosine decay to
    min_ratio * base_lr (min_ratio = 1 keeps it constant)."""
    if step < warmup:
        return base_lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))))


class EMA:
    """Exponential moving average of the main parameters (not the puzzle embedding, which the
    reference keeps in a buffer outside its EMA). No bias correction, as in the reference."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], rate: float):
        self.rate = rate
        self.shadow = {n: p.detach().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        for n, p in named_params:
            self.shadow[n].mul_(self.rate).add_(p.detach(), alpha=1.0 - self.rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(t)


def load_data(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train puzzles, train solutions, test puzzles, test solutions), uint8 (n, 81).

    Generated data draws train and test pools from different seeds, so test puzzles are new
    puzzles, not augmentations of training ones. With a CSV file and no test file, the last
    `test_puzzles` rows are held out.
    """
    if cfg.data is None:
        tp, ts = sudoku.generate(cfg.train_puzzles, seed=2 * cfg.data_seed, clues=cfg.clues)
        vp, vs = sudoku.generate(cfg.test_puzzles, seed=2 * cfg.data_seed + 1, clues=cfg.clues)
        return tp, ts, vp, vs
    train = sudoku.load_sudoku_csv(cfg.data)
    if cfg.test_data is not None:
        test = sudoku.load_sudoku_csv(cfg.test_data, limit=cfg.test_puzzles)
        return train.puzzles, train.solutions, test.puzzles, test.solutions
    k = min(cfg.test_puzzles, len(train) // 2)
    if k == 0:
        raise ValueError(f"{cfg.data}: too few puzzles to hold any out; give --test-data")
    return train.puzzles[:-k], train.solutions[:-k], train.puzzles[-k:], train.solutions[-k:]


def make_laser(cfg: TrainConfig):
    """The run's `laser_triton.Laser`, or None when LASER is switched off."""
    if not cfg.use_laser:
        return None
    import laser_triton as lt

    return lt.Laser(lt.LaserConfig(**cfg.laser))  # LaserConfig reads dtype names ("bf16")
