"""The wheel installs with --no-deps next to an existing torch and ships its tuned configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    dist, target = tmp / "dist", tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(ROOT)],
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


def test_shipped_configs_are_valid_json():
    files = sorted((ROOT / "autotune_configs").glob("*.json"))
    assert files, "autotune_configs/ ships no JSON"
    for f in files:
        json.loads(f.read_text())


def test_console_script_dispatches():
    from laser_triton import cli

    assert cli.main(["--help"]) == 0
    assert cli.main(["no-such-command"]) == 2
