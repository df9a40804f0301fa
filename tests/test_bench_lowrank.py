"""perf/bench_lowrank.py end to end on the tiny TRM (one backward per variant, batch 2)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from laser_triton.tools import bench

PERF = Path(__file__).resolve().parents[1] / "perf"


@pytest.mark.slow
def test_bench_lowrank_tiny(tmp_path):
    out = tmp_path / "lowrank.csv"
    bench_lowrank = bench.load_module(PERF, "bench_lowrank")
    assert bench_lowrank.main(["--out", str(out), "--presets", "tiny", "--batch", "4",
                               "--reps", "1", "--tau", "0.2"]) == 0
    df = pd.read_csv(out).set_index("variant")
    assert list(df.index) == ["plain", "laser_rebuild", "laser_lowrank"]
    low, reb = df.loc["laser_lowrank"], df.loc["laser_rebuild"]
    assert low.served > 0 and reb.served == 0 and df.loc["plain", "rebuilds"] == 0
    assert low.rebuilds <= reb.rebuilds - low.served  # no served input was rebuilt
    assert low.lin_gflop_lowrank < low.lin_gflop_rebuild  # served only where it pays
    assert low.bwd_gflop < reb.bwd_gflop
    assert 0 < low.bound_ratio_max <= 1.0  # ||dW - G^T X|| <= ||G||_2 tau ||X||
    assert low.grad_err_vs_rebuild < 1e-3  # fp32: the two paths differ by rounding only


def test_rebuild_variants_turn_the_lowrank_backward_off():
    variants = bench.load_module(PERF, "trm_variants")
    from laser_triton.trm import TRM, TRMConfig  # noqa: PLC0415

    for name, backend, on in (("laser_torch", "torch", True), ("laser_torch_rebuild", "torch", False),
                              ("laser_triton_rebuild+compile", "triton", False)):
        v = variants.parse_variant(name)
        assert (v.laser_backend, v.lowrank_backward) == (backend, on)
    model = TRM(TRMConfig.tiny())
    laser = variants.install_variant(model, variants.parse_variant("laser_torch_rebuild"))
    assert laser.cfg.lowrank_backward is False and model.laser is laser
