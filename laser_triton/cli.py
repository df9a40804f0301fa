"""`laser-triton` console script: a thin dispatcher to the subcommands' own modules.

Each subcommand lives in its module as `cli_main(argv) -> int` with its own argparse, and is
imported only when used (so `laser-triton demo` does not import Triton, for instance).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("laser_triton.demo", "train a small TRM with and without LASER and compare memory"),
    "train": ("laser_triton.train", "train a TRM preset on Sudoku (generated or a CSV file)"),
    "eval": ("laser_triton.evaluate", "evaluate a TRM checkpoint"),
    "autotune": ("laser_triton.autotune", "sweep kernel launch configs on this GPU"),
    "bench": ("laser_triton.bench", "run the benchmarks and write the perf report"),
    "analyze": ("laser_triton.analysis", "activation-manifold analysis of a TRM"),
    "study": ("laser_triton.study", "paired baseline-vs-LASER accuracy study"),
}


def _usage() -> str:
    lines = ["usage: laser-triton <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `laser-triton <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"laser-triton: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"laser-triton: command {name!r} is not available in this build", file=sys.stderr)
        return 2
    return int(module.cli_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
