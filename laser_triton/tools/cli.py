"""`laser-triton` console script: a thin dispatcher to the subcommands' own modules.

Each subcommand lives in its module as `cli_main(argv) -> int` with its own argparse, and is
imported only when used (so `laser-triton --help` imports no torch). A failing command ends
in one line on stderr and exit status 1 (argparse's usage errors: 2); `--debug` anywhere on the
command line, or LASER_TRITON_DEBUG=1, shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

DEBUG_ENV = "LASER_TRITON_DEBUG"

# name -> (module, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("laser_triton.tools.demo", "train a small TRM with and without LASER and compare memory"),
    "train": ("laser_triton.tools.train", "train a TRM preset on Sudoku (generated or a CSV file)"),
    "eval": ("laser_triton.tools.evaluate", "evaluate a TRM checkpoint"),
    "autotune": ("laser_triton.tools.autotune", "sweep kernel launch configs on this GPU"),
    "bench": ("laser_triton.tools.bench", "run the benchmarks and write the perf report"),
    "analyze": ("laser_triton.tools.analysis.analyze", "activation-manifold analysis of a TRM"),
    "study": ("laser_triton.tools.study.runner", "paired baseline-vs-LASER accuracy study"),
}


def _usage() -> str:
    lines = ["usage: laser-triton [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `laser-triton <command> --help` for a command's options.",
              f"Errors print one line; --debug (or {DEBUG_ENV}=1) shows the traceback."]
    return "\n".join(lines)


def _debug_wanted(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def describe_error(exc: BaseException) -> str:
    """One line saying what went wrong, for an exception a user's input can cause."""
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return f"file not found: {exc.filename}"
    if isinstance(exc, IsADirectoryError) and exc.filename is not None:
        return f"expected a file, got a directory: {exc.filename}"
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        msg = exc.args[0]  # str(KeyError) adds quotes around the message
    else:
        msg = str(exc)
    msg = " ".join(msg.split()) or "(no message)"
    if isinstance(exc, (ValueError, OSError, ImportError)):
        return msg
    return f"{type(exc).__name__}: {msg}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = _debug_wanted(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"laser-triton: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        return int(module.cli_main(rest) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"laser-triton {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (a user's mistake ends in one line, not a traceback)
        if debug:
            raise
        print(f"laser-triton {name}: error: {describe_error(exc)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
