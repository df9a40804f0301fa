"""The benchmarks' shared harness: run metadata, the backend switch, per-run time limits and
cleanup, command-line values. Every benchmark script imports it as `from .harness import ...`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import os
import signal
from collections.abc import Iterator

import torch

__all__ = ["Timeout", "add_threads_option", "backend_env", "set_threads", "cleanup", "compile_stats", "parse_value", "run_meta",
           "time_limit"]


def run_meta(device: torch.device) -> dict[str, str]:
    """The columns every result row carries: GPU name ("cpu" without one), torch and Triton
    versions ("none" when Triton does not import), today's date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return dict(gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch_version=torch.__version__, triton_version=triton_version,
                date=dt.date.today().isoformat())


@contextlib.contextmanager
def backend_env(name: str | None) -> Iterator[None]:
    """LASER_TRITON_BACKEND=name for the duration (None: leave it as it is)."""
    if name is None:
        yield
        return
    old = os.environ.get("LASER_TRITON_BACKEND")
    os.environ["LASER_TRITON_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LASER_TRITON_BACKEND", None)
        else:
            os.environ["LASER_TRITON_BACKEND"] = old


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise Timeout in the main thread after `seconds` (between Python bytecodes)."""
    def fire(signum, frame):
        raise Timeout(f"variant exceeded {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def parse_value(v: str) -> object:
    """A command-line value: int, float, bool, torch dtype name, else the string."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v in ("true", "false"):
        return v == "true"
    if v in ("bfloat16", "float16", "float32"):
        return getattr(torch, v)
    return v


def compile_stats() -> str:
    """Dynamo's counters since the last cleanup(): graphs built and graph breaks (a compiled
    variant that breaks into many graphs, or hits the recompile limit, runs partly eager)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    return f"graphs={graphs} breaks={breaks} recompile_limit={'recompile_limit' in str(counters)}"


def cleanup(cuda: bool) -> None:
    """Free what a finished run left: Python garbage, cached CUDA blocks, compiled graphs."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()


def add_threads_option(ap) -> None:
    """`--threads N` of every benchmark script (and so of `laser-triton bench <script>`)."""
    from laser_triton.tools.cliutil import nonnegative_int

    ap.add_argument("--threads", type=nonnegative_int, default=0,
                    help="intra-op CPU threads; 0 (the default): 1 on a CPU run (these small "
                         "ops run faster on one thread than on a contended pool), torch's "
                         "default on a GPU run")


def set_threads(threads: int, cuda: bool) -> int:
    """Apply `--threads`; returns the thread count torch now uses."""
    if threads:
        torch.set_num_threads(threads)
    elif not cuda:
        torch.set_num_threads(1)
    return torch.get_num_threads()
