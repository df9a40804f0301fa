"""perf/gpu_check.sh cannot lie: failing tests give a non-zero rc in its log, every section has
a budget inside 8 minutes, and everything it runs imports with torch, triton, pandas and pytest
alone (a bare GPU machine has nothing else)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "perf" / "gpu_check.sh"
WHOLE_SCRIPT_S = 480  # what a lent GPU gives one script run

_IMPORT_PROBE = r"""
import importlib, importlib.metadata as md, pkgutil, re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def closure(roots):
    seen, todo = set(), [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req:
                continue
            todo.append(norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0)))
    return seen

allowed = closure(["torch", "triton", "pandas", "pytest"])
blocked = {mod for mod, dists in md.packages_distributions().items()
           if not any(norm(d) in allowed for d in dists)} - {"laser_triton"}

import importlib.machinery

class NotInstalled(importlib.machinery.PathFinder):
    # Blocked packages look uninstalled: imports raise ModuleNotFoundError and find_spec
    # probes (torch checks for optional packages that way) see None.
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

sys.meta_path = [NotInstalled if f is importlib.machinery.PathFinder else f
                 for f in sys.meta_path]
for mod in [m for m in blocked if m in sys.modules]:
    raise SystemExit(f"{mod} was imported before the probe")
import laser_triton
names = [m.name for m in pkgutil.walk_packages(laser_triton.__path__, "laser_triton.")]
sys.path.insert(0, sys.argv[1])
names += ["perf.bench_trm", "perf.bench_kernels", "perf.report"]
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("blocked:", sorted(b for b in blocked if not b.startswith("_"))[:40])
print("FAILED" if failed else "OK", *failed, sep="\n")
"""


def test_everything_gpu_check_runs_imports_with_core_dependencies_only():
    """Each laser_triton module and the perf scripts import with every installed package
    outside torch/triton/pandas/pytest (and what they require) blocked, e.g. tqdm."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, str(ROOT)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout[-3000:]
    assert "tqdm" in proc.stdout  # the probe really blocked an optional package


def _plan(env_extra: dict) -> dict[str, int]:
    env = {**os.environ, "OUT": "/tmp/unused", "PLAN": "1", **env_extra}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {m[1]: int(m[2]) for m in re.finditer(r"## (\w+): plan limit (\d+)s", proc.stdout)}


def test_section_budgets_leave_room_for_every_section_within_8_minutes():
    """Worst case (each section runs to its limit), on the GPU path: every section gets a
    non-trivial limit, the sweep included, and the whole script fits 8 minutes."""
    plan = _plan({"PLAN_GPU": "1"})
    assert set(plan) >= {"env", "warm", "gpu_tests", "trm_bench", "kernel_bench", "autotune",
                         "report"}, plan
    assert all(limit >= 30 for name, limit in plan.items() if name != "env"), plan
    assert sum(limit for name, limit in plan.items() if name != "warm") <= WHOLE_SCRIPT_S - 30
    # The cache warm runs beside the tests; it ends before the TRM bench starts.
    assert plan["warm"] <= plan["gpu_tests"] + 5, plan


def test_failing_gpu_tests_give_nonzero_rc(tmp_path):
    """pipefail inside the test section: pytest's failure survives the `| tee`."""
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert False\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SECTIONS": "gpu_tests",
           "GPU_TEST_FILES": str(failing), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert re.search(r"## gpu_tests: rc=1 ", log), log[-3000:]
    assert "1 failed" in (tmp_path / "out" / "tests_gpu.txt").read_text()
    assert proc.returncode == 0  # the script itself always ends with its summary


@pytest.mark.slow
def test_warm_tool_lists_laser_variants():
    """The cache-warming tool enumerates the launches of LASER's shapes (no compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "laser_triton.kernels._warm", "--hidden", "128",
                           "512", "--rank", "16", "63", "--rows", "776", "--list"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kernel in ("_compress_fused_kernel", "_reconstruct_kernel", "_orth_factor_kernel"):
        assert kernel in proc.stdout
