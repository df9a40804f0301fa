"""docs/design.md is the map the code and tests cite: every "docs/design.md §N" reference and
every invariant name (I1, I2, ...) in the tests resolves to a heading there, every test it
names exists, and nothing points at a design document outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SOURCES = ["laser_triton", "kernels", "tests", "perf", "examples", "autotune_configs"]
TOP_FILES = ["Makefile", "README.md", "pyproject.toml"]


def _sources() -> list[Path]:
    files = [ROOT / f for f in TOP_FILES if (ROOT / f).is_file()]
    for d in SOURCES:
        files += [p for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".sh", ".toml")
                  and ".venv" not in p.parts]
    return files


def _design_sections() -> tuple[set[str], set[str]]:
    """Section numbers ("2", "2.3") and invariant names ("I1") of the headings."""
    sections, invariants = set(), set()
    for line in DESIGN.read_text().splitlines():
        if m := re.match(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", line):
            sections.add(m.group(1))
        if m := re.match(r"^### (I\d+)\. ", line):
            invariants.add(m.group(1))
    return sections, invariants


def test_design_section_references_resolve():
    sections, _ = _design_sections()
    assert {"2.1", "4", "6.1", "7"} <= sections  # the parser reads the headings
    seen, missing = 0, []
    for path in _sources():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if "design.md" not in line or path == DESIGN:
                continue
            for ref in re.findall(r"§(\d+(?:\.\d+)?)", line.split("design.md", 1)[1]):
                seen += 1
                if ref not in sections:
                    missing.append(f"{path.relative_to(ROOT)}:{n}: §{ref}")
    assert seen >= 20, f"only {seen} references found: is the scan looking at the right files?"
    assert not missing, "references to sections docs/design.md lacks:\n" + "\n".join(missing)


def test_invariant_names_in_tests_resolve():
    _, invariants = _design_sections()
    assert {"I1", "I2", "I3", "I4", "I5"} <= invariants
    missing = []
    for path in (ROOT / "tests").glob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for a, b in re.findall(r"\bI(\d+)(?:\s*[-–]\s*I(\d+))?\b", line):
                for k in range(int(a), int(b or a) + 1):
                    if f"I{k}" not in invariants:
                        missing.append(f"{path.name}:{n}: I{k}")
    assert not missing, "invariants docs/design.md does not define:\n" + "\n".join(missing)


def test_tests_named_in_the_design_exist():
    text = DESIGN.read_text()
    named = re.findall(r"tests/(test_\w+\.py)::(test_\w+)", text)
    assert len(named) >= 20
    missing = [f"{f}::{t}" for f, t in named
               if not (ROOT / "tests" / f).is_file()
               or not re.search(rf"^def {t}\(", (ROOT / "tests" / f).read_text(), re.M)]
    assert not missing, "tests named in docs/design.md that do not exist:\n" + "\n".join(missing)


def test_no_reference_to_an_outside_design_document():
    this = Path(__file__).resolve()
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in _sources() if p.resolve() != this
           for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           if re.search(r"DESIGN §|shared/DESIGN|DESIGN\.md", line)]
    assert not bad, "references to a design document outside the repository:\n" + "\n".join(bad)
