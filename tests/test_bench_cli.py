"""`laser-triton bench <script> --help` names the command the user typed."""

from __future__ import annotations

import sys

import pytest

from laser_triton.tools import bench

pytestmark = pytest.mark.skipif(bench.find_perf_dir() is None, reason="needs a source checkout")


@pytest.mark.parametrize("what", ["kernels", "trm", "lowrank", "report", "compare"])
def test_script_usage_names_the_bench_command(what, capsys):
    argv0 = sys.argv[0]
    with pytest.raises(SystemExit) as exc:
        bench.cli_main([what, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: laser-triton bench {what} ")
    assert sys.argv[0] == argv0  # restored


@pytest.mark.parametrize("what", ["kernels", "trm", "lowrank", "all"])
def test_benchmarks_take_threads(what, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.cli_main([what, "--help"])
    assert exc.value.code == 0 and "--threads" in capsys.readouterr().out


def test_threads_option_sets_torch_threads():
    import torch

    from laser_triton.tools.bench import find_perf_dir, load_module

    harness = load_module(find_perf_dir(), "harness")
    before = torch.get_num_threads()
    try:
        assert harness.set_threads(2, cuda=False) == 2
        assert harness.set_threads(0, cuda=False) == 1  # the CPU default: one thread
    finally:
        torch.set_num_threads(before)
