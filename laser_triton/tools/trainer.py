"""The TRM trainer (`Trainer`): deep-supervision training on Sudoku, with or without LASER.

The command line around it is `train.py` (`laser-triton train`).

One training step is one supervision step of the reference's loop (pretrain.py `train_batch`):
a fresh batch arrives, samples whose carry halted take the new puzzle at their index, the model
runs one supervision step, and (loss / batch) goes backward. AdamW trains the network, SignSGD
the puzzle embedding, both under the warm-up schedule; an EMA of the weights is evaluated.

Deliberate differences from the reference trainer:
- AdamW (torch) instead of AdamATan2 (the same decoupled weight decay; eps-division instead of
  atan2), as this project's issue specifies.
- Augmentations are drawn fresh per sample instead of 1000 precomputed copies per puzzle, and
  the default data is the built-in generator (see laser_triton/data/sudoku.py), not
  Sudoku-Extreme.
- Checkpoints hold the full training state (optimizers, EMA, carry, RNGs, data position), so
  a resumed run continues identically; the reference saves model weights only.
- torch.compile is opt-in (`compile=True`, the network only) and no distributed data
  parallel.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

import numpy as np
import torch

from laser_triton.data.sudoku import PuzzleStream, encode
from laser_triton.trm import TRM, SparseSignSGD, act_loss

from .training import (
    EMA,
    TrainConfig,
    load_data,
    lr_at,
    make_laser,
    read_checkpoint,
    resolve_device,
)

__all__ = ["Trainer", "evaluate_model", "describe_accuracy"]

StepContext = Callable[[int], contextlib.AbstractContextManager]


class _NoBar:
    """Stands in for tqdm when it is not installed (it is optional at import)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar, or a silent stand-in without tqdm (a bare GPU machine may lack it)."""
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


class Trainer:
    """Owns the model, optimizers, EMA, deep-supervision carry, data stream and RNGs."""

    def __init__(self, cfg: TrainConfig, data: tuple[np.ndarray, ...] | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        model_cfg = cfg.model_config()
        if (model_cfg.seq_len, model_cfg.vocab_size) != (81, 11):
            raise ValueError(f"preset {cfg.preset!r} models sequences of {model_cfg.seq_len} "
                             f"tokens over {model_cfg.vocab_size} symbols; this trainer only has "
                             "Sudoku data (81 cells, vocabulary 11). Build the model directly "
                             "with laser_triton.trm.TRM for other tasks.")
        torch.manual_seed(cfg.seed)
        self.data = tuple(data) if data is not None else load_data(cfg)
        train_p, train_s, self.test_p, self.test_s = self.data
        self.stream = PuzzleStream(train_p, train_s, cfg.batch_size, seed=cfg.seed,
                                   augment=cfg.augment)
        self.model = TRM(model_cfg).to(self.device)
        self.laser = make_laser(cfg)
        self.model.laser = self.laser
        if self.laser is not None:
            self.laser.watch(self.model.net)  # sites named like "z/blocks.0.mlp.down_proj#0"
        if cfg.compile:
            # In place, so parameter names (checkpoints, EMA) stay those of the eager model.
            # Compiled regions save through one Function: LASER sees them with the network's
            # role but without module paths ("z/#9").
            self.model.net.compile()
        self.opt = torch.optim.AdamW(list(self.model.main_parameters()), lr=0.0,
                                     betas=(cfg.beta1, cfg.beta2),
                                     weight_decay=cfg.weight_decay)
        self.sparse_opt = None
        if self.model.puzzle_emb is not None:
            self.sparse_opt = SparseSignSGD([self.model.puzzle_emb], lr=0.0,
                                            weight_decay=cfg.puzzle_emb_weight_decay)
        self.ema = EMA(self._main_named(), cfg.ema_rate) if cfg.ema else None
        self.gen = torch.Generator(device=self.device)  # halting exploration
        self.gen.manual_seed(cfg.seed + 1)
        self.carry = None
        self.step = 0
        self.history: list[dict[str, float]] = []  # one row per training step
        self.eval_history: list[dict[str, float]] = []  # one row per evaluation, kept on resume

    def _main_named(self):
        sparse = None if self.model.puzzle_emb is None else self.model.puzzle_emb.weight
        return [(n, p) for n, p in self.model.named_parameters() if p is not sparse]

    # -- training ---------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        model.train()
        self.step += 1
        batch = {k: v.to(self.device) for k, v in next(self.stream).items()}
        if self.carry is None:
            self.carry = model.initial_carry(batch)
        self.carry, out = model(self.carry, batch, generator=self.gen)
        loss, m = act_loss(out["logits"], out["q_halt_logits"], self.carry.data["labels"],
                           self.carry.halted, self.carry.steps)
        B = batch["inputs"].shape[0]
        (loss / B).backward()
        lr = lr_at(self.step, cfg.lr, cfg.lr_warmup_steps, cfg.steps, cfg.lr_min_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        if self.sparse_opt is not None:
            self.sparse_opt.param_groups[0]["lr"] = lr_at(
                self.step, cfg.puzzle_emb_lr, cfg.lr_warmup_steps, cfg.steps, cfg.lr_min_ratio)
            self.sparse_opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sparse_opt is not None:
            self.sparse_opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self._main_named())
        # Accuracies are over the samples that halted this step: NaN when none did (a 0 there
        # read as "the model is wrong on everything").
        count = int(m["count"])
        per_halted = (lambda key: float(m[key]) / count) if count else (lambda key: math.nan)
        row = {"step": self.step, "lr": lr, "loss": float(loss.detach()) / B,
               "lm_loss": float(m["lm_loss"]) / B, "q_halt_loss": float(m["q_halt_loss"]) / B,
               "halted": count, "cell_acc": per_halted("cell_acc"),
               "exact_acc": per_halted("exact_acc"), "q_halt_acc": per_halted("q_halt_acc"),
               "steps": per_halted("steps")}
        self.history.append(row)
        return row

    def train(self, steps: int | None = None, progress: bool = True, out: str | None = None,
              desc: str = "train", step_context: StepContext | None = None
              ) -> list[dict[str, float]]:
        """Run until `steps` (default cfg.steps) total steps, evaluating and checkpointing as
        configured; returns this call's evaluation rows (all of them: `eval_history`).
        `step_context(step)`, if given, returns a context manager to run that step in (the
        demo measures the last step's peak memory this way)."""
        cfg, target = self.cfg, self.cfg.steps if steps is None else steps
        evals = []
        bar = _progress_bar(target, self.step, desc, progress)
        halted_cell = "-"  # training accuracy exists only on steps where samples halted
        while self.step < target:
            with step_context(self.step + 1) if step_context else contextlib.nullcontext():
                row = self.train_step()
            if row["halted"]:
                halted_cell = f"{row['cell_acc']:.3f}"
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", halted_cell_acc=halted_cell)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < target:
                evals.append(self._record_eval())
            if out and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save(os.path.join(out, "last.pt"))
        bar.close()
        evals.append(self._record_eval())
        return evals

    def _record_eval(self) -> dict[str, float]:
        row = self.evaluate()
        self.eval_history.append(row)
        return row

    # -- evaluation ---------------------------------------------------------------------------
    def eval_model(self, use_ema: bool = True) -> TRM:
        """The model to evaluate: a copy holding the EMA weights, or the live model."""
        if self.ema is None or not use_ema:
            return self.model
        m = TRM(self.model.config).to(self.device)
        m.load_state_dict(self.model.state_dict())
        with torch.no_grad():
            params = dict(m.named_parameters())
            for n, t in self.ema.shadow.items():
                params[n].copy_(t)
        return m

    def evaluate(self, use_ema: bool = True) -> dict[str, float]:
        model = self.eval_model(use_ema)
        row = evaluate_model(model, self.test_p, self.test_s, self.cfg.eval_batch_size,
                             self.device)
        row["step"] = self.step
        return row

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        state = {
            "config": self.cfg.to_dict(), "step": self.step, "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sparse_opt": None if self.sparse_opt is None else self.sparse_opt.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "carry": None if self.carry is None else self.carry.state_dict(),
            "stream": self.stream.state_dict(), "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(), "history": list(self.history),
            "eval_history": list(self.eval_history),
            "data": self.data if self.cfg.data is None else None,
        }
        if self.laser is not None and hasattr(self.laser, "state_dict"):
            state["laser"] = self.laser.state_dict()
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        from laser_triton.trm import Carry

        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.sparse_opt is not None and state["sparse_opt"] is not None:
            self.sparse_opt.load_state_dict(state["sparse_opt"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        carry = state["carry"]
        if carry is not None:
            dev = self.device
            carry = {k: ({n: t.to(dev) for n, t in v.items()} if isinstance(v, dict) else v.to(dev))
                     for k, v in carry.items()}
        self.carry = None if carry is None else Carry.from_state_dict(carry)
        self.stream.load_state_dict(state["stream"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])
        self.eval_history = list(state.get("eval_history", []))  # absent before it was kept
        if self.laser is not None and "laser" in state and hasattr(self.laser, "load_state_dict"):
            self.laser.load_state_dict(state["laser"])

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind

    @classmethod
    def from_checkpoint(cls, path: str, **overrides: object) -> Trainer:
        state = read_checkpoint(path)
        cfg = TrainConfig(**{**state["config"], **overrides})
        trainer = cls(cfg, data=state.get("data"))
        trainer.load_state_dict(state)
        return trainer


@torch.inference_mode()
def evaluate_model(model: TRM, puzzles: np.ndarray, solutions: np.ndarray, batch_size: int,
                   device: torch.device) -> dict[str, float]:
    """Run every test puzzle through all halt_max_steps supervision steps; accuracies of the
    final answers: cells (all 81, the reference's metric), blank cells only, exact puzzles."""
    model.eval()
    sums = {"loss": 0.0, "cell_acc": 0.0, "blank_acc": 0.0, "exact_acc": 0.0, "q_halt_acc": 0.0}
    n = len(puzzles)
    for start in range(0, n, batch_size):
        batch = {k: v.to(device) for k, v in encode(puzzles[start:start + batch_size],
                                                   solutions[start:start + batch_size]).items()}
        carry = model.initial_carry(batch)
        for _ in range(model.config.halt_max_steps):
            carry, out = model(carry, batch)
        labels = carry.data["labels"]
        loss, m = act_loss(out["logits"], out["q_halt_logits"], labels, carry.halted, carry.steps)
        blank = carry.data["inputs"] == 1
        hit = (out["logits"].argmax(-1) == labels) & blank
        sums["blank_acc"] += float((hit.sum(-1) / blank.sum(-1).clamp_min(1)).sum())
        sums["loss"] += float(loss)
        for k in ("cell_acc", "exact_acc", "q_halt_acc"):
            sums[k] += float(m[k])
    return {k: v / max(n, 1) for k, v in sums.items()} | {"puzzles": n}


def describe_accuracy(m: dict) -> str:
    """One line of `evaluate_model`'s accuracies, as `train` and `eval` print them."""
    return (f"cell accuracy {m['cell_acc']:.4f}, blank-cell accuracy {m['blank_acc']:.4f}, "
            f"exact puzzles {m['exact_acc']:.4f} ({m['puzzles']} puzzles, loss {m['loss']:.4f})")
