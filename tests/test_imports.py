"""No import cycles inside the package: the modules of laser_triton (with laser_triton.kernels,
installed from kernels/, and the benchmarks' perf package) form a directed acyclic graph, so dependencies point one way
(docs/design.md §10). Every import counts: module level, under TYPE_CHECKING, and deferred
inside functions (a deferred import hides a cycle from the interpreter, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"laser_triton": ROOT / "laser_triton", "laser_triton.kernels": ROOT / "kernels",
            "perf": ROOT / "perf"}

# None: the kernels declare themselves (kernels/_spec.py registry); the store, the sm_90
# compile checks and the audit read the registry and import no kernel module.
ALLOWED_EDGES: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = path
    return mods


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom,
              mods: dict[str, Path]) -> list[str]:
    """Names node imports, as dotted module names (for `from m import x`: m.x when x is a
    submodule, else m)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".")
        if path.name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (the nearest enclosing module of each name)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported(module, path, node, mods):
                    while name and name not in mods:
                        name = name.rpartition(".")[0]
                    if name and name != module:
                        deps.add(name)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    assert "laser_triton.hooks" in graph and "laser_triton.kernels.compress_pass" in graph
    assert "laser_triton.tracker" in graph["laser_triton.hooks"]
    assert "laser_triton.kernels.configs" in graph["laser_triton.kernels.compress_pass"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    for a, b in ALLOWED_EDGES:
        graph.get(a, set()).discard(b)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


TOOLS = "laser_triton.tools"
# Entry points that start the tools; nothing imports them.
ENTRY_POINTS = {"laser_triton.__main__"}


def _is_tool(module: str) -> bool:
    return module == TOOLS or module.startswith(TOOLS + ".")


def core_imports_of_tools(graph: dict[str, set[str]]) -> list[str]:
    """`core -> tool` edges: a module of laser_triton (kernels included) outside
    laser_triton.tools importing one inside it."""
    return sorted(f"{a} -> {b}" for a, deps in graph.items()
                  if a.startswith("laser_triton") and not _is_tool(a) and a not in ENTRY_POINTS
                  for b in deps if _is_tool(b))


def test_the_core_never_imports_the_tools():
    """The tools (laser_triton/tools/: commands, studies, analysis) sit on the core; the core
    (config, ops, tracker, storage, hooks, ..., trm/, data/, kernels) never imports them, at
    module level or inside a function (docs/design.md §10)."""
    graph = import_graph()
    assert "laser_triton.tools.train" in graph and "laser_triton.hooks" in graph
    assert "laser_triton.tools.cli" in graph["laser_triton.__main__"]  # the check sees tools
    edges = core_imports_of_tools(graph)
    assert not edges, "core modules import the tools: " + ", ".join(edges)


def test_core_imports_of_tools_finds_one():
    graph = {"laser_triton.hooks": {"laser_triton.tools.study.stats"},
             "laser_triton.tools.train": {"laser_triton.hooks"},
             "laser_triton.__main__": {"laser_triton.tools.cli"}}
    assert core_imports_of_tools(graph) == ["laser_triton.hooks -> laser_triton.tools.study.stats"]


def test_no_sys_path_edits():
    """Modules find each other as packages (relative imports), never by editing sys.path."""
    offenders = [f"{path.relative_to(ROOT)}:{node.lineno}"
                 for path in _modules().values()
                 for node in ast.walk(ast.parse(path.read_text(), str(path)))
                 if isinstance(node, ast.Attribute) and node.attr in ("insert", "append")
                 and isinstance(node.value, ast.Attribute) and node.value.attr == "path"
                 and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"]
    assert not offenders, "sys.path edited at " + ", ".join(offenders)
