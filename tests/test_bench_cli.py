"""`laser-triton bench <script> --help` names the command the user typed."""

from __future__ import annotations

import sys

import pytest

from laser_triton.tools import bench

pytestmark = pytest.mark.skipif(bench.find_perf_dir() is None, reason="needs a source checkout")


@pytest.mark.parametrize("what", ["kernels", "trm", "report"])
def test_script_usage_names_the_bench_command(what, capsys):
    argv0 = sys.argv[0]
    with pytest.raises(SystemExit) as exc:
        bench.cli_main([what, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: laser-triton bench {what} ")
    assert sys.argv[0] == argv0  # restored
