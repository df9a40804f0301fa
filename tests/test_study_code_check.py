"""The study's code check across the issue 18 move: a protocol declared at the old layout
(perf/results/study_ni_protocol.json names its exempt tooling by old paths, and is frozen) still
tells tooling from code at the new layout, and a moved trainer counts as unchanged only when
nothing but its imports changed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from laser_triton.tools.study.code_check import MOVED, check_code, same_after_move

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "perf" / "results" / "study_ni_protocol.json"


def test_the_move_map_describes_this_tree():
    for old, new in MOVED.items():
        assert not (ROOT / old).exists(), f"{old} is still there"
        assert (ROOT / new).is_file(), f"{new} (moved from {old}) is missing"
    # every exempt path the declared protocol names has a place at this layout
    declared = json.loads(PROTOCOL.read_text())["code_paths_exempt"]
    assert declared
    for path in declared:
        assert (ROOT / path).is_file() or (ROOT / MOVED.get(path, path)).is_file(), path


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


OLD_TRAIN = ("import os\n\nfrom . import stats\nfrom .training import B\n\n\n"
             "def f():\n    from .tracker import a\n    return a + B + stats.s + len(os.sep)\n")
# the same trainer at the new layout: imports re-pointed, regrouped and reordered
NEW_TRAIN = ("import os\n\nfrom .training import B  # moved (issue 18)\nfrom .study import stats\n"
             "\n\ndef f():\n    from laser_triton.tracker import a\n"
             "    return a + B + stats.s + len(os.sep)\n")


def test_a_protocol_declared_before_the_move_still_knows_its_tooling(tmp_path):
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *a], check=True, text=True,
                              capture_output=True).stdout.strip()

    git("init", "-q")
    _write(tmp_path, {"laser_triton/__init__.py": "", "laser_triton/tracker.py": "a = 1\n",
                      "laser_triton/training.py": "from .tracker import a\n\nB = a + 1\n",
                      "laser_triton/train.py": OLD_TRAIN, "laser_triton/stats.py": "s = 1\n",
                      "laser_triton/study_ni.py": "x = 1\n"})
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "declared")
    p = {"code_commit": git("rev-parse", "HEAD"), "code_paths": ["laser_triton"],
         "code_paths_exempt": ["laser_triton/study_ni.py", "laser_triton/stats.py"],
         "smoke": False}
    for old in ("train", "training", "stats", "study_ni"):
        new = MOVED[f"laser_triton/{old}.py"]
        (tmp_path / new).parent.mkdir(parents=True, exist_ok=True)
        git("mv", f"laser_triton/{old}.py", new)
    _write(tmp_path, {"laser_triton/tools/train.py": NEW_TRAIN,
                      "laser_triton/tools/training.py":
                          "from laser_triton.tracker import a\n\nB = a + 1\n",
                      "laser_triton/tools/__init__.py": '"""tools"""\n',
                      "laser_triton/tools/study/__init__.py": '"""study"""\n',
                      "laser_triton/__main__.py": "import sys\n"})
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the move")
    _write(tmp_path, {"laser_triton/tools/study/code_check.py": "y = 1\n"})  # untracked, study
    assert check_code(p, str(tmp_path))["code_changed"] == []

    # exempt by their declared (old) paths, edited at their new place: still tooling
    _write(tmp_path, {"laser_triton/tools/study/ni.py": "x = 2\n",
                      "laser_triton/tools/study/stats.py": "s = 2\n"})
    assert check_code(p, str(tmp_path))["code_changed"] == []

    # the trainer is code, not tooling, wherever it lives
    _write(tmp_path, {"laser_triton/tools/train.py": NEW_TRAIN.replace("a + B", "a - B")})
    with pytest.raises(RuntimeError, match="laser_triton/tools/train.py"):
        check_code(p, str(tmp_path))
    _write(tmp_path, {"laser_triton/tools/train.py": NEW_TRAIN.replace(
        "from .training import B", "from laser_triton.tracker import a as B")})
    with pytest.raises(RuntimeError, match="laser_triton/tools/train.py"):
        check_code(p, str(tmp_path))
    _write(tmp_path, {"laser_triton/tools/train.py": NEW_TRAIN,
                      "laser_triton/tools/train_loop.py": "z = 1\n"})  # new, outside study/
    with pytest.raises(RuntimeError, match="train_loop.py"):
        check_code(p, str(tmp_path))


def test_same_after_move_counts_everything_but_imports():
    old, new = "laser_triton/train.py", "laser_triton/tools/train.py"
    assert same_after_move(OLD_TRAIN, old, NEW_TRAIN, new)
    assert not same_after_move(OLD_TRAIN, old, '"""doc"""\n' + NEW_TRAIN, new)
    assert not same_after_move(OLD_TRAIN, old, NEW_TRAIN.replace("import os", "import sys"), new)
    # an unmoved relative import keeps its meaning only if it still names the same module
    assert not same_after_move(OLD_TRAIN, old, NEW_TRAIN.replace(
        "from laser_triton.tracker import a", "from .tracker import a"), new)
