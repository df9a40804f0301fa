"""`laser-triton bench`: run the benchmarks and write the performance report.

    laser-triton bench kernels --out perf/results/h200/kernels.csv [bench_kernels options]
    laser-triton bench trm --out perf/results/h200/trm.csv [bench_trm options]
    laser-triton bench lowrank --out perf/results/cpu/lowrank.csv [bench_lowrank options]
    laser-triton bench report [--results perf/results]
    laser-triton bench audit [--full]   # static sm_90 audit + performance model (CPU, no GPU)
    laser-triton bench compare --measured perf/results/h200/kernels.csv   # model vs a GPU run (CPU)
    laser-triton bench all [--results perf/results] [--set NAME]   # both benchmarks + report

kernels, trm, lowrank and all take --threads N (intra-op CPU threads; 0, the default: 1 on a
CPU run, torch's default on a GPU run).

The benchmark scripts live in `perf/` of a source checkout and are not part of the wheel:
they write CSVs and plots into the repository's perf/results/ and are meant to be run from a
checkout (`pip install -e .`). This command finds `perf/` from
`$LASER_TRITON_PERF_DIR`, else `./perf`, else next to the installed package (an editable
install), and says so clearly when there is none.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["cli_main", "find_perf_dir", "load_script", "load_module", "PACKAGE"]

SCRIPTS = {"kernels": "bench_kernels.py", "trm": "bench_trm.py", "lowrank": "bench_lowrank.py",
           "report": "report.py", "audit": "audit.py", "compare": "compare.py"}
USAGE = __doc__.split("\n\n")[1]


def find_perf_dir() -> Path | None:
    """The folder holding the benchmark scripts, or None outside a checkout."""
    candidates = []
    if os.environ.get("LASER_TRITON_PERF_DIR"):
        candidates.append(Path(os.environ["LASER_TRITON_PERF_DIR"]))
    candidates.append(Path.cwd() / "perf")
    candidates.append(Path(__file__).resolve().parents[2] / "perf")  # laser_triton/tools/bench.py
    for c in candidates:
        if all((c / s).is_file() for s in ("__init__.py", *SCRIPTS.values())):
            return c.resolve()
    return None


PACKAGE = "laser_triton_perf"  # the private name perf/ is imported under


def load_script(perf: Path, name: str) -> ModuleType:
    """Import perf/<script> for `name` in ("kernels", "trm", "report")."""
    return load_module(perf, SCRIPTS[name].removesuffix(".py"))


def load_module(perf: Path, module: str) -> ModuleType:
    """Import perf/<module>.py as a module of the perf package, itself imported from `perf`
    under the private name PACKAGE (no sys.path edit, and no clash with an unrelated
    top-level `perf`)."""
    package = sys.modules.get(PACKAGE)
    if package is None or list(package.__path__) != [str(perf)]:
        for key in [k for k in sys.modules if k == PACKAGE or k.startswith(PACKAGE + ".")]:
            del sys.modules[key]  # another checkout's perf/ was loaded before
        spec = importlib.util.spec_from_file_location(
            PACKAGE, perf / "__init__.py", submodule_search_locations=[str(perf)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{module}")


def _set_name() -> str:
    """Results folder name: 'cpu', or the GPU's name and today's date."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_").lower()
    return f"{gpu}_{dt.date.today().isoformat()}"


def _run_all(perf: Path, argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="laser-triton bench all")
    p.add_argument("--results", type=Path, default=perf / "results")
    p.add_argument("--set", default=None, help="subfolder (default: 'cpu' or <gpu>_<date>)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds per benchmark")
    p.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: 1 on CPU)")
    args = p.parse_args(argv)
    out = args.results / (args.set or _set_name())
    out.mkdir(parents=True, exist_ok=True)
    budget = [] if args.time_budget is None else ["--time-budget", str(args.time_budget)]
    budget += ["--threads", str(args.threads)]
    rc = load_script(perf, "kernels").main(["--out", str(out / "kernels.csv"), *budget])
    rc |= load_script(perf, "trm").main(["--out", str(out / "trm.csv"), *budget])
    return rc | load_script(perf, "report").main(["--results", str(args.results)])


def cli_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage:\n{USAGE}\n\nRun `laser-triton bench <kernels|trm|lowrank|report|audit|compare> --help` for a "
              "script's options.")
        return 0
    what, rest = argv[0], argv[1:]
    if what not in (*SCRIPTS, "all"):
        print(f"laser-triton bench: unknown target {what!r}; choose kernels, trm, lowrank, report, audit, compare or all",
              file=sys.stderr)
        return 2
    perf = find_perf_dir()
    if perf is None:
        print("laser-triton bench: the benchmark scripts (perf/bench_kernels.py, "
              "perf/bench_trm.py, perf/report.py) are part of the source checkout, not of the "
              "installed package. Run this command from a checkout of laser-triton (pip "
              "install -e .), or set LASER_TRITON_PERF_DIR to its perf/ folder.", file=sys.stderr)
        return 2
    if what == "all":
        return _run_all(perf, rest)
    # The scripts' parsers take their program name from sys.argv[0]: make their usage and
    # errors read `laser-triton bench <what>`, the command the user typed.
    argv0 = sys.argv[0] if sys.argv else None
    sys.argv[:1] = [f"laser-triton bench {what}"]
    try:
        return int(load_script(perf, what).main(rest) or 0)
    finally:
        if argv0 is None:
            del sys.argv[:1]
        else:
            sys.argv[0] = argv0


if __name__ == "__main__":
    sys.exit(cli_main())
