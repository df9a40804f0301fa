"""The command line as a new user meets it: a mistake ends in one line on stderr and a non-zero
exit (no traceback unless --debug), meaningless values are refused, every command takes
`--threads` under one policy, and `--help` does not import torch's compiler stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_source

from laser_triton.tools import cli, cliutil

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FAST = ["--steps", "1", "--batch-size", "2", "--train-puzzles", "4", "--test-puzzles", "2",
              "--clues", "60", "--no-progress", "--model", "hidden_size=32", "num_heads=2",
              "expansion=2.0", "H_cycles=1", "L_cycles=1", "halt_max_steps=2"]


def _fails_in_one_line(argv: list[str], capsys, needle: str, code: int = 1) -> str:
    """Runs the console entry point; it must exit `code` with one stderr line holding needle."""
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == code, (rc, err)
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert needle in last, err
    if code == 1:  # runtime errors: exactly one line
        assert len(err.splitlines()) == 1, err
        assert last.startswith(f"laser-triton {argv[0]}: error: ")
    return last


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--steps", "0"], "--steps: must be a positive integer, got 0"),
    (["demo", "--steps", "-5"], "--steps: must be a positive integer"),
    (["demo", "--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["demo", "--preset", "nope"], "--preset: invalid choice: 'nope'"),
    (["demo", "--threads", "-1"], "--threads: must be 0 or more"),
    (["demo", "--steps", "10", "--long"], "not allowed with argument"),
    (["eval", "x.pt", "--generate", "0"], "--generate: must be a positive integer"),
    (["eval", "x.pt", "--clues", "5"], "--clues: must be in [17, 81], got 5"),
])
def test_meaningless_arguments_are_refused(argv, needle, capsys):
    _fails_in_one_line(argv, capsys, needle, code=2)


def test_user_errors_end_in_one_line(tmp_path, capsys):
    _fails_in_one_line(["train", "--preset", "nope", *TRAIN_FAST], capsys,
                       "unknown TRM preset 'nope'")
    _fails_in_one_line(["train", "--steps", "0"], capsys, "steps must be an integer >= 1, got 0")
    missing = tmp_path / "missing.csv"
    _fails_in_one_line(["train", "--data", str(missing), *TRAIN_FAST], capsys,
                       f"file not found: {missing}")
    bad = tmp_path / "bad.csv"
    bad.write_text("source,question,answer,rating\nx,123,456,0\n")
    _fails_in_one_line(["train", "--data", str(bad), *TRAIN_FAST], capsys, f"{bad}:2:")
    _fails_in_one_line(["eval", str(tmp_path / "nope.pt")], capsys, "file not found")
    _fails_in_one_line(["train", "--resume", str(tmp_path / "nope.pt")], capsys,
                       "file not found")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    _fails_in_one_line(["eval", str(junk)], capsys, "is not a checkpoint torch can read")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    _fails_in_one_line(["eval", str(tmp_path / "other.pt")], capsys,
                       "not a checkpoint written by `laser-triton train`")
    if not torch.cuda.is_available():
        _fails_in_one_line(["demo", "--device", "cuda"], capsys, "torch sees no CUDA GPU")
    _fails_in_one_line(["demo", "--device", "tpu9"], capsys, "unknown device 'tpu9'")
    _fails_in_one_line(["demo", "--tau", "5"], capsys, "tau must be in [0, 1), got 5.0")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "eval", str(tmp_path / "nope.pt")])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["eval", str(tmp_path / "nope.pt")])


def test_autotune_without_a_gpu_fails(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert cli.main(["autotune", "--hidden", "512", "--rank", "8"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_resume_needs_more_steps(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TRAIN_FAST, "--out", str(out)]) == 0
    _fails_in_one_line(["train", "--resume", str(out / "last.pt"), "--no-progress"], capsys,
                       "at step 1 already; give --steps with the new total", code=2)


@pytest.mark.parametrize("command", ["demo", "train", "eval", "analyze", "study"])
def test_every_command_takes_threads(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert "--threads" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["own_model", "ddp_laser"])
def test_examples_take_threads(name, capsys, monkeypatch):
    module = load_source(name, f"examples/{name}.py")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])  # ddp_laser reads sys.argv
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"]) if name == "own_model" else module.main()
    assert exc.value.code == 0 and "--threads" in capsys.readouterr().out


def test_thread_policy(monkeypatch):
    monkeypatch.setattr(cliutil, "_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    threads, why = cliutil.choose_threads(0, "cpu")
    assert threads == 1 and "load average 3.5 on 2 cores" in why
    assert cliutil.choose_threads(3, "cpu")[0] == 3  # asked for: kept, busy or not
    assert cliutil.choose_threads(0, "cuda")[0] == 0  # GPU runs keep torch's default
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.3, 0.1))
    assert cliutil.choose_threads(0, "cpu")[0] == 0  # idle: torch's default
    with pytest.raises(ValueError):
        cliutil.choose_threads(-1)


def test_help_imports_no_compiler_stack():
    """`laser-triton --help` imports no torch at all; a command's module and `laser_triton`
    itself import no dynamo, sympy or Triton (they made --help take 15-20 s on a busy machine);
    the first Laser built still runs its bookkeeping outside torch.compile."""
    probe = """
import sys
from laser_triton.tools import cli
assert cli.main(["--help"]) == 0
assert "torch" not in sys.modules, "--help imported torch"
import laser_triton, laser_triton.tools.demo, laser_triton.tools.train, laser_triton.tools.evaluate
heavy = [m for m in ("torch._dynamo", "sympy", "triton", "matplotlib") if m in sys.modules]
assert not heavy, heavy
laser = laser_triton.Laser()
from laser_triton import hooks
assert getattr(hooks.Laser._pack, "_torchdynamo_disable", False)
assert getattr(hooks._unpack, "_torchdynamo_disable", False)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_python_dash_m_runs_the_same_command_line():
    """`python -m laser_triton` is the console script (the command table moved to
    laser_triton/tools/cli.py, issue 18); `--help` still imports no torch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "laser_triton", "--help"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(f"  {name} " in out.stdout for name in cli.SUBCOMMANDS), out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines()}
    assert "laser_triton.tools.cli" in imported and "torch" not in imported
    bad = subprocess.run([sys.executable, "-m", "laser_triton", "no-such-command"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown command 'no-such-command'" in bad.stderr
