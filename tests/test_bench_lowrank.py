"""perf/bench_lowrank.py end to end on the tiny TRM, lean saves (one backward per variant, batch 4)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from laser_triton.tools import bench

PERF = Path(__file__).resolve().parents[1] / "perf"


@pytest.mark.slow
def test_bench_lowrank_tiny(tmp_path):
    out, layers_out = tmp_path / "lowrank.csv", tmp_path / "layers.csv"
    bench_lowrank = bench.load_module(PERF, "bench_lowrank")
    assert bench_lowrank.main(["--out", str(out), "--presets", "tiny+lean", "--batch", "4",
                               "--reps", "1", "--tau", "0.2", "--layers-out",
                               str(layers_out)]) == 0
    layers = pd.read_csv(layers_out).set_index("layer")
    lin = layers[layers.kind == "linear"]
    assert lin.served.sum() > 0 and (layers.kind == "norm").any()
    served = lin[lin.served == lin.compressed]  # every compressed call served: dW flops below
    assert len(served) and (served.flop_ratio < 1).all()
    assert (layers.compressed <= layers.calls).all() and (layers.served <= layers.compressed).all()
    df = pd.read_csv(out).set_index("variant")
    assert list(df.index) == ["plain", "laser_rebuild", "laser_lowrank"]
    low, reb = df.loc["laser_lowrank"], df.loc["laser_rebuild"]
    assert low.served > 0 and reb.served == 0 and df.loc["plain", "rebuilds"] == 0
    assert low.served == lin.served.sum() and low.norms_served == layers.loc[
        layers.kind == "norm", "served"].sum()
    assert low.served_rebuilt == 0  # no served input rebuilt for another consumer
    assert low.rebuilds <= reb.rebuilds - low.served  # no served input was rebuilt
    assert low.lin_gflop_lowrank < low.lin_gflop_rebuild  # served only where it pays
    # (Total backward flops are not asserted: the lean RMSNorm from (C, U) costs 2 N D r more
    # than its rebuild, which untrained activations at batch 4 need not win back.)
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
