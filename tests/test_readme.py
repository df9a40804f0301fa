"""The README's commands work as written on a fresh clone: it starts with exactly `make demo`
and `make test`, every command runs the project's .venv (no bare `python`, which has no torch
outside it), and each one states its expected time."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _bash_blocks(text: str) -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first = _bash_blocks(text)[0]
    assert [line.split()[:2] for line in first] == [["make", "demo"], ["make", "test"]]
    assert text.index("```bash") < text.index("\n## ")  # before any section


def test_every_readme_command_uses_the_venv_and_states_its_time():
    commands = [line for block in _bash_blocks(README.read_text()) for line in block
                if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) >= 5
    for line in commands:
        program = line.split()[0]
        assert program == "make" or program.startswith(".venv/bin/"), line
        assert re.search(r"#\s*~\d", line), f"no expected time stated: {line}"
    prose = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    assert not re.search(r"`python (examples|-m)", prose), "bare python: no torch outside .venv"
