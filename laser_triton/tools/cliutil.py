"""What every `laser-triton` command and example shares: one CPU thread policy (`--threads`)
and argument types that reject values meaning nothing (`--steps 0`).

Thread policy (`--threads 0`, the default): torch's own choice (one thread per core) on an idle
CPU, and 1 thread when the load average shows the cores already busy with other processes.
There, OpenMP threads spin-wait on each other and several threads run many times slower than
one (measured on a 2-core machine with another job running: 89-230 s per tiny-TRM training
step with torch's default threads, ~10 s with one). A GPU run keeps torch's default.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["add_threads_argument", "apply_threads", "choose_threads", "int_in", "positive_int",
           "nonnegative_int", "positive_float"]

THREADS_HELP = ("intra-op CPU threads; 0 (auto, the default): torch's default on an idle CPU, "
                "1 when the load average shows the cores busy with other processes")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _parse(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _parse(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def int_in(low: int, high: int):
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        value = _parse(text, int, "an integer")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _parse(text, float, "a number")
    if not (0.0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _parse(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=nonnegative_int, default=0, help=THREADS_HELP)


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_threads(requested: int, device_type: str = "cpu") -> tuple[int, str]:
    """(threads, reason): the thread count to set (0: keep torch's default) and why."""
    if requested < 0:
        raise ValueError(f"--threads must be 0 (auto) or more, got {requested}")
    if requested:
        return requested, f"{requested} thread(s) as asked (--threads)"
    if device_type != "cpu" or not hasattr(os, "getloadavg"):
        return 0, "torch's default threads"
    cores, load = _cores(), os.getloadavg()[0]
    if cores > 1 and load > 0.5 * cores:
        return 1, (f"load average {load:.1f} on {cores} cores: 1 thread, as several threads "
                   "on busy cores run slower than one (--threads N to override)")
    return 0, f"torch's default threads ({cores} cores, load average {load:.1f})"


def apply_threads(requested: int, device_type: str = "cpu", prog: str | None = None) -> int:
    """Set torch's intra-op threads by the policy above; prints the choice when it is not
    torch's default. Returns the number of threads torch now uses."""
    import torch

    threads, reason = choose_threads(requested, device_type)
    if threads:
        torch.set_num_threads(threads)
        if prog is not None:
            print(f"{prog}: {reason}")
    return torch.get_num_threads()
