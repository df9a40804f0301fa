"""torch.compile of the whole TRM with LASER inside (as the reference compiles its model): LASER's
bookkeeping stays eager, so dynamo neither traces into it nor recompiles per shape and rank,
and what unpack returns still meets tau."""

from __future__ import annotations

import torch
import torch._dynamo
from helpers import UnpackTap, sudoku_batch, trm_steps

import laser_triton as lt
from laser_triton.trm import TRM, TRMConfig

CFG = lt.LaserConfig(tau=0.05, coeff_dtype=torch.float32)


def _train(compiled: bool, laser: lt.Laser | None, steps: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TRM(TRMConfig.tiny().replace(L_cycles=2), laser=laser)
    if laser is not None:
        laser.watch(model.net)
    run = torch.compile(model, backend="aot_eager") if compiled else model
    trm_steps(model, sudoku_batch(4), steps, run)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_whole_model_compiles_with_laser_eager_inside(monkeypatch):
    plain = _train(False, None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    laser = lt.Laser(CFG)
    tap = UnpackTap(laser, monkeypatch)
    got = _train(True, laser)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # Traced, LASER's hooks made ~84 graphs and hit the recompile limit; eager, a handful.
    assert graphs <= 16, graphs
    errs = tap.errors()
    assert sum(not exact for _, exact in errs) >= 4  # compression happened under compile
    assert all(e <= CFG.tau + 1e-6 or exact for e, exact in errs)  # I1 on what unpack returned
    assert laser.summary()["ratio"] < 0.9
    for n in plain:  # the compiled graph saves other tensors than eager: compare with plain
        err = (got[n] - plain[n]).norm() / plain[n].norm().clamp_min(1e-12)
        assert err < 2 * CFG.tau, (n, float(err))
