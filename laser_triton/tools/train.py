"""`laser-triton train`: deep-supervision training of a TRM on Sudoku, with or without LASER.

The command line of `trainer.Trainer`: one --option per `TrainConfig` and `LaserConfig` field,
`--resume` to continue a checkpoint with its saved configuration, and the run's outputs
(config.json, last.pt, train/eval metrics, LASER's report) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from .cliutil import add_threads_argument, apply_threads
from .trainer import Trainer, describe_accuracy
from .training import TrainConfig

__all__ = ["build_parser", "config_from_args", "cli_main"]


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str, skip: set[str],
                        defaults: object) -> None:
    """One --option per dataclass field, typed by its default value."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        dest = f"{prefix.replace('-', '_')}{f.name}"
        help_ = f"{cls.__name__}.{f.name} (default {default!r}"
        help_ += ", or the preset's)" if cls is TrainConfig else ")"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=help_)
        elif isinstance(default, (int, float)):
            parser.add_argument(flag, dest=dest, type=type(default), default=None, help=help_)
        elif isinstance(default, (tuple, list)):
            parser.add_argument(flag, dest=dest, nargs="*", default=None, help=help_)
        elif isinstance(default, dict):
            parser.add_argument(flag, dest=dest, type=json.loads, default=None,
                                help=help_ + "; a JSON object")
        else:  # str, None, torch.dtype
            parser.add_argument(flag, dest=dest, type=str, default=None, help=help_)


def _parse_kv(items: list[str]) -> dict[str, object]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_parser(prog: str = "laser-triton train") -> argparse.ArgumentParser:
    import laser_triton as lt

    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0],
        epilog="Presets: tiny (CPU), paper_sudoku, paper_sudoku_att. LASER is off unless "
        "--use-laser; every --laser-* option is a LaserConfig field.")
    p.add_argument("--out", default=None, help="output folder (checkpoints, metrics); default "
                   "runs/train, or the checkpoint's folder with --resume")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, with its saved "
                   "configuration (only --steps, --eval-every, --checkpoint-every may change)")
    p.add_argument("--no-progress", action="store_true")
    add_threads_argument(p)
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                   help="TRMConfig overrides, e.g. L_cycles=4 mlp_t=false")
    _add_dataclass_args(p, TrainConfig, "", skip={"model", "laser"}, defaults=TrainConfig())
    _add_dataclass_args(p, lt.LaserConfig, "laser-", skip=set(), defaults=lt.LaserConfig())
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    import laser_triton as lt

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name not in ("model", "laser") and getattr(args, f.name, None) is not None}
    preset = given.pop("preset", "tiny")
    laser = dict(TrainConfig.for_preset(preset).laser)
    for f in dataclasses.fields(lt.LaserConfig):
        v = getattr(args, f"laser_{f.name}")
        if v is not None:
            laser[f.name] = v
    cfg = TrainConfig.for_preset(preset, **given, laser=laser)
    cfg.model = {**cfg.model, **_parse_kv(args.model)}
    return cfg


RESUME_OPTIONS = ("steps", "eval_every", "checkpoint_every")


def _options_ignored_on_resume(args: argparse.Namespace) -> list[str]:
    """Configuration options given together with --resume, which keeps the saved ones."""
    import laser_triton as lt

    given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)
             if f.name not in ("model", "laser", *RESUME_OPTIONS)
             and getattr(args, f.name, None) is not None]
    given += [f"--laser-{f.name.replace('_', '-')}" for f in dataclasses.fields(lt.LaserConfig)
              if getattr(args, f"laser_{f.name}", None) is not None]
    return given + (["--model"] if args.model else [])


def cli_main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        ignored = _options_ignored_on_resume(args)
        if ignored:
            parser.error(f"--resume continues the checkpoint's saved configuration; "
                         f"{', '.join(ignored)} would be ignored (only --steps, --eval-every "
                         "and --checkpoint-every may change)")
        trainer = Trainer.from_checkpoint(args.resume, **{
            k: getattr(args, k) for k in RESUME_OPTIONS if getattr(args, k) is not None})
        if trainer.step >= trainer.cfg.steps:
            parser.error(f"{args.resume} is at step {trainer.step} already; give --steps with "
                         f"the new total (more than {trainer.step})")
        args.out = args.out or os.path.dirname(os.path.abspath(args.resume))
    else:
        trainer = Trainer(config_from_args(args))
        args.out = args.out or "runs/train"
    apply_threads(args.threads, trainer.device.type, prog="laser-triton train")
    cfg = trainer.cfg
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"preset {cfg.preset}: {n_params:,} parameters, device {trainer.device}, "
          f"LASER {'on' if trainer.laser is not None else 'off'}")
    t0 = time.time()
    evals = trainer.train(progress=not args.no_progress, out=args.out)
    trainer.save(os.path.join(args.out, "last.pt"))
    import pandas as pd

    pd.DataFrame(trainer.history).to_csv(os.path.join(args.out, "train_metrics.csv"), index=False)
    # All evaluations of the run, those before a --resume included.
    pd.DataFrame(trainer.eval_history).to_csv(os.path.join(args.out, "eval_metrics.csv"),
                                              index=False)
    if trainer.laser is not None:
        trainer.laser.report().to_csv(os.path.join(args.out, "laser_report.csv"), index=False)
    last = evals[-1]
    print(f"step {trainer.step} in {time.time() - t0:.1f}s, test set: {describe_accuracy(last)}; "
          f"outputs in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main())
