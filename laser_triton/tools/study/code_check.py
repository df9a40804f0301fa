"""Is the code that runs the code a protocol declared? (`check_code`, run before any stage)

A protocol names `code_commit`, the `code_paths` it pins, and `code_paths_exempt`: the tooling
(reporting, statistics, command line) that may change without changing what is measured.

Issue 18 moved the tools from laser_triton/ into laser_triton/tools/ (`MOVED`). A protocol
declared before the move (perf/results/study_ni_protocol.json) names its exempt files by their
old paths, on purpose: it is frozen. Rule at the new layout:
- a declared exempt path is exempt at its new place too (mapped through `MOVED`);
- the files the move added (`ADDED_BY_MOVE`: package docstrings, `python -m` entry) and new
  modules under laser_triton/tools/study/ (split out of the study runner and its reports,
  which the declared protocol exempts whole) are tooling;
- a moved file that is not exempt (the trainer: `train.py`, `training.py`) counts as unchanged
  only when it is the declared file with its imports re-pointed through `MOVED`
  (`same_after_move`); any other edit is a change.
Everything under laser_triton/tools/ is NOT exempt wholesale: the trainer lives there and
defines the training the study measures.
"""

from __future__ import annotations

import ast
import subprocess

__all__ = ["MOVED", "ADDED_BY_MOVE", "check_code", "exempt_paths", "same_after_move"]

# old path -> new path, for every module the issue 18 move carried into laser_triton/tools/
MOVED: dict[str, str] = {
    f"laser_triton/{old}.py": f"laser_triton/tools/{new}.py" for old, new in {
        "cli": "cli", "cliutil": "cliutil", "train": "train", "training": "training",
        "evaluate": "evaluate", "demo": "demo", "autotune": "autotune", "bench": "bench",
        "livebytes": "livebytes",
        "analysis": "analysis/analyze", "analysis_plots": "analysis/plots",
        "capture": "analysis/capture", "spectra": "analysis/spectra",
        "study": "study/runner", "study_protocol": "study/protocol", "study_trm": "study/trm",
        "study_report": "study/report", "study_ni": "study/ni",
        "study_ni_report": "study/ni_report", "stats": "study/stats",
    }.items()}
ADDED_BY_MOVE = ("laser_triton/__main__.py", "laser_triton/tools/__init__.py",
                 "laser_triton/tools/analysis/__init__.py", "laser_triton/tools/study/__init__.py")
STUDY_DIR = "laser_triton/tools/study/"


def exempt_paths(declared: list[str]) -> list[str]:
    """The declared exempt paths and, for each the move carried, its new path."""
    return sorted(set(declared) | {MOVED[p] for p in declared if p in MOVED})


def _module(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


_RENAMED = {_module(old): _module(new) for old, new in MOVED.items()}
_KNOWN = set(_RENAMED) | set(_RENAMED.values())


class _Imports(ast.NodeTransformer):
    """Removes the imports from a tree, recording the absolute names each binds (new layout)."""

    def __init__(self, module: str):
        self.package = module.rpartition(".")[0]
        self.bindings: list[tuple[str, ...]] = []

    def visit_Import(self, node: ast.Import) -> None:
        self.bindings += [(_RENAMED.get(a.name, a.name), a.asname or "") for a in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        prefix = node.module or ""
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        for a in node.names:
            full = f"{prefix}.{a.name}"
            if full in _KNOWN:  # `from package import module`
                self.bindings.append((_RENAMED.get(full, full), a.asname or a.name))
            else:
                self.bindings.append((_RENAMED.get(prefix, prefix), a.name, a.asname or a.name))


def _canonical(source: str, path: str) -> tuple[str, list[tuple[str, ...]]]:
    imports = _Imports(_module(path))
    tree = imports.visit(ast.parse(source))
    return ast.dump(tree), sorted(imports.bindings)


def same_after_move(old_source: str, old_path: str, new_source: str, new_path: str) -> bool:
    """Whether new_source is old_source with only its imports re-pointed through `MOVED`
    (the syntax trees without their imports are equal, so comments and layout aside, and the
    names the imports bind are the same set, so their order and grouping aside)."""
    try:
        return _canonical(old_source, old_path) == _canonical(new_source, new_path)
    except SyntaxError:
        return False


def check_code(p: dict, repo: str = ".") -> dict:
    """HEAD and whether the declared code paths equal the declared commit (work tree included).
    Raises when they differ, unless the protocol is a smoke run (then recorded, not raised)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True,
                              text=True).stdout

    exempt = exempt_paths(p.get("code_paths_exempt", []))
    paths = ["--", *p.get("code_paths", ["laser_triton", "kernels"]),
             *[f":(exclude){x}" for x in exempt]]
    try:
        head = git("rev-parse", "HEAD").strip()
        # --no-renames: a moved file is listed under both paths, matched below
        changed = set(git("diff", "--no-renames", "--name-only", p["code_commit"], *paths).split())
        changed |= set(git("ls-files", "--others", "--exclude-standard", *paths).split())
        moved_to = set(MOVED.values())
        changed -= {c for c in changed if c in ADDED_BY_MOVE
                    or (c.startswith(STUDY_DIR) and c not in moved_to)}
        for old, new in MOVED.items():
            if old in changed and new in changed:
                declared = git("show", f"{p['code_commit']}:{old}")
                with open(f"{repo}/{new}") as f:
                    if same_after_move(declared, old, f.read(), new):
                        changed -= {old, new}
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise RuntimeError(f"cannot compare the code with the declared commit: {e}") from e
    info = {"head": head, "code_commit": p["code_commit"], "code_changed": sorted(changed)}
    if changed and not p["smoke"]:
        raise RuntimeError(
            f"the code differs from the protocol's commit {p['code_commit'][:10]} in "
            f"{sorted(changed)[:8]}: declare a new protocol (a new file, before any run) "
            "or check out that code")
    return info
