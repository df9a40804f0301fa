"""`laser-triton eval`: held-out accuracy of a training checkpoint.

Runs every puzzle through all `halt_max_steps` supervision steps (as the reference evaluates)
with the EMA weights when the run kept an EMA, and reports cell accuracy over all 81 cells (the
reference's metric), accuracy over the blank cells only, and exact-puzzle accuracy.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from laser_triton.data import sudoku
from laser_triton.trm import TRM

from .cliutil import add_threads_argument, apply_threads, int_in, positive_int
from .trainer import describe_accuracy, evaluate_model
from .training import TrainConfig, read_checkpoint, resolve_device

__all__ = ["cli_main", "load_model", "held_out_set"]


def load_model(path: str, device: torch.device, use_ema: bool = True
               ) -> tuple[TRM, TrainConfig, dict]:
    """The checkpoint's model (EMA weights unless use_ema is False), its config and state."""
    state = read_checkpoint(path)
    cfg = TrainConfig(**state["config"])
    model = TRM(cfg.model_config())
    model.load_state_dict(state["model"])
    if use_ema and state.get("ema"):
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, t in state["ema"].items():
                params[name].copy_(t)
    return model.to(device), cfg, state


def held_out_set(args: argparse.Namespace, cfg: TrainConfig, state: dict
             ) -> tuple[np.ndarray, np.ndarray, str]:
    if args.data:
        s = sudoku.load_sudoku_csv(args.data, limit=args.puzzles)
        return s.puzzles, s.solutions, args.data
    if args.generate:
        p, s = sudoku.generate(args.generate, seed=args.seed, clues=args.clues or cfg.clues)
        return p, s, f"{args.generate} generated puzzles (seed {args.seed})"
    if state.get("data") is not None:
        p, s = state["data"][2], state["data"][3]
        return p[: args.puzzles], s[: args.puzzles], "the run's held-out generated puzzles"
    if cfg.test_data:
        s = sudoku.load_sudoku_csv(cfg.test_data, limit=args.puzzles)
        return s.puzzles, s.solutions, cfg.test_data
    raise ValueError("no test data: pass --data FILE or --generate N")


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="laser-triton eval", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint written by `laser-triton train`")
    p.add_argument("--data", default=None, help="Sudoku-Extreme CSV file to evaluate on")
    p.add_argument("--generate", type=positive_int, default=0, metavar="N",
                   help="evaluate on N freshly generated puzzles instead")
    p.add_argument("--clues", type=int_in(17, 81), default=None,
                   help="givens of generated puzzles (default: the run's)")
    p.add_argument("--seed", type=int, default=12345, help="seed of generated puzzles")
    p.add_argument("--puzzles", type=positive_int, default=None,
                   help="evaluate at most this many")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_threads_argument(p)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    apply_threads(args.threads, device.type, prog=None if args.json else "laser-triton eval")
    model, cfg, state = load_model(args.checkpoint, device, use_ema=not args.no_ema)
    puzzles, solutions, source = held_out_set(args, cfg, state)
    metrics = evaluate_model(model, puzzles, solutions, args.batch_size, device)
    metrics["step"] = int(state["step"])
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{args.checkpoint} (step {metrics['step']}, preset {cfg.preset}) on {source}:")
        print(f"  {describe_accuracy(metrics)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main())
