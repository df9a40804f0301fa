"""The wheel installs with --no-deps next to an existing torch and ships its tuned configs; from
a fresh virtual environment outside the repository its `laser-triton demo` runs to the end
without matplotlib and Triton, and a missing Triton is reported with the pip extra to install."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    dist, target, src = tmp / "dist", tmp / "site", tmp / "src"
    # Built from a copy without build/: setuptools reuses build/lib, where a module deleted
    # from the source stays and would ship in the wheel (CI's fresh clone has none).
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "out", "runs", "__pycache__",
        ".pytest_cache", ".ruff_cache", ".hypothesis"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(src)],
        check=True, cwd=tmp, capture_output=True, text=True,
    )
    wheels = list(dist.glob("laser_triton-*.whl"))
    assert len(wheels) == 1
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheels[0])],
        check=True, capture_output=True, text=True,
    )
    return tmp, target


def test_wheel_imports_outside_repo_and_reads_configs(installed_wheel):
    tmp, target = installed_wheel
    probe = """
import importlib.resources as res, json, laser_triton, laser_triton.kernels
import laser_triton.autotune_configs as cfgs
files = [f for f in res.files("laser_triton.autotune_configs").iterdir() if f.name.endswith(".json")]
assert files, "no autotune config shipped"
data = json.loads(files[0].read_text())
print(laser_triton.__file__)
print(len(files), sorted(data)[:3])
"""
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp, env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith(str(target)), out  # the wheel, not the source tree
    assert int(out[1].split()[0]) >= 1


def test_wheel_ships_every_module_of_the_package(installed_wheel):
    """pyproject lists the packages by name: a new subpackage (laser_triton/tools/study/, ...)
    left out of the list would be missing from the wheel, and its command with it."""
    _, target = installed_wheel
    source = ROOT / "laser_triton"
    missing = [str(p.relative_to(ROOT)) for p in source.rglob("*.py")
               if "__pycache__" not in p.parts
               and not (target / "laser_triton" / p.relative_to(source)).is_file()]
    assert not missing, f"not in the wheel: {missing}"
    run = subprocess.run([sys.executable, "-m", "laser_triton", "--help"], cwd=target.parent,
                         env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "study" in run.stdout, run.stderr[-2000:]


def test_shipped_configs_are_valid_json():
    files = sorted((ROOT / "autotune_configs").glob("*.json"))
    assert files, "autotune_configs/ ships no JSON"
    for f in files:
        json.loads(f.read_text())


def test_console_script_dispatches():
    from laser_triton.tools import cli

    assert cli.main(["--help"]) == 0
    assert cli.main(["no-such-command"]) == 2


# What a fresh environment lacks when it got `pip install laser-triton` without extras.
_BLOCKED = ("matplotlib", "triton")


@pytest.fixture(scope="module")
def wheel_venv(installed_wheel, tmp_path_factory):
    """A new venv with the wheel installed (by pip, console script included). Its other
    dependencies (torch, pandas, numpy, tqdm) come from this environment through a .pth line
    instead of a download; matplotlib and Triton are made missing by packages that raise
    ModuleNotFoundError, which stand in front of this environment's copies."""
    tmp, _ = installed_wheel
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    wheel = next((tmp / "dist").glob("laser_triton-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, text=True)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    # Only the .pth line's directory is added: the editable install's own .pth in it is not
    # processed, so `laser_triton` can only come from the wheel.
    (site / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name in _BLOCKED:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp), "OMP_NUM_THREADS": "1",
           "LASER_TRITON_BACKEND": "auto"}
    return venv, env, tmp


def test_wheel_demo_runs_from_a_fresh_venv_without_extras(wheel_venv):
    venv, env, tmp = wheel_venv
    out = tmp / "demo_out"
    run = subprocess.run([str(venv / "bin" / "laser-triton"), "demo", "--steps", "2",
                          "--batch-size", "4", "--test-puzzles", "4", "--no-progress",
                          "--out", str(out)], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "demo.png skipped: matplotlib is not installed" in run.stdout
    assert "LASER/plain: held for backward" in run.stdout
    for name in ("sites.csv", "summary.csv", "laser_report.csv"):
        assert (out / name).exists(), name
    assert not (out / "demo.png").exists()
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import laser_triton; print(laser_triton.__file__)"], cwd=tmp,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # the wheel, not the source tree


def test_wheel_names_the_triton_extra_when_triton_is_missing(wheel_venv):
    venv, env, tmp = wheel_venv
    imp = subprocess.run([str(venv / "bin" / "python"), "-c", "import laser_triton.kernels"],
                         cwd=tmp, env=env, capture_output=True, text=True)
    assert imp.returncode != 0
    assert 'pip install "laser-triton[triton]"' in imp.stderr.splitlines()[-1]
    tune = subprocess.run([str(venv / "bin" / "laser-triton"), "autotune"], cwd=tmp, env=env,
                          capture_output=True, text=True)
    assert tune.returncode == 1
    err = tune.stderr.strip().splitlines()
    assert len(err) == 1 and 'pip install "laser-triton[triton]"' in err[0], tune.stderr
