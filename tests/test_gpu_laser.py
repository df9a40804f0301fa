"""GPU-only checks of the LASER hooks (skipped without CUDA)."""

import gc

import pytest
import torch
from models import Block, GatedMLP, low_rank_tokens

import laser_triton as lt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _forward(laser, model, x, calls=3):
    with laser.compress():
        h = x
        for _ in range(calls):
            with laser.role("z"):
                h = model(h)
        return h.float().square().mean()


def test_one_laser_step_has_no_host_sync():
    dev = torch.device("cuda")
    laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=64, min_width=64, shrink_every=1000))
    model = GatedMLP().to(dev)
    x = low_rank_tokens(4, 150, 160, rank=6, seed=0).to(dev).requires_grad_()
    for _ in range(2):  # warm-up: first bases are built by resets, which may synchronize
        _forward(laser, model, x).backward()
    resets = {k: tr.resets for k, tr in laser.trackers.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = _forward(laser, model, x)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert {k: tr.resets for k, tr in laser.trackers.items()} == resets


def test_reported_bytes_match_the_allocator():
    dev = torch.device("cuda")
    laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=64, min_width=64))
    model = Block(laser=laser).to(dev)
    x = low_rank_tokens(4, 256, 160, rank=6, seed=1).to(dev).requires_grad_()
    _forward(laser, model, x).backward()
    torch.cuda.synchronize()
    loss = _forward(laser, model, x)
    torch.cuda.synchronize()
    with_graph = torch.cuda.memory_allocated()
    del loss
    torch.cuda.synchronize()
    freed = with_graph - torch.cuda.memory_allocated()
    stored = laser.summary()["stored_bytes"]
    # the caching allocator rounds each block up to 512 bytes
    n_blocks = int(laser.report().tensors.sum()) * 2 + 8
    assert abs(freed - stored) <= 512 * n_blocks + 0.02 * stored, (freed, stored)


def test_decision_lag_bounds_undecided_tensors_when_the_host_runs_ahead():
    """Undecided tensors are held raw. With the GPU behind the host (a sleep kernel per call),
    an unbounded lag keeps every call's tensors undecided until compress() exits; lag 1 keeps
    at most two calls' worth, by waiting on the oldest call's event (no device sync)."""
    dev = torch.device("cuda")
    model = GatedMLP().to(dev)
    x = low_rank_tokens(8, 512, 160, rank=6, seed=2).to(dev).requires_grad_()
    calls = 6

    def undecided_per_call(lag: int) -> list[int]:
        laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=64, min_width=64, decision_lag=lag))
        for _ in range(2):  # bases built (resets synchronize), steady state after
            _forward(laser, model, x, calls).backward()
        torch.cuda.synchronize()
        counts = []
        with laser.compress():
            h = x
            for _ in range(calls):
                torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time: the host runs ahead
                with laser.role("z"):
                    h = model(h)
                counts.append(sum(e.stored is None for e in laser._step.entries.values()))
            loss = h.float().square().mean()
        loss.backward()
        torch.cuda.synchronize()
        return counts

    unbounded = undecided_per_call(10_000)
    per_call = unbounded[0]
    if unbounded[-1] <= per_call:
        pytest.skip(f"the GPU kept up with the host ({unbounded}): nothing to bound")
    bounded = undecided_per_call(1)
    assert max(bounded) <= 2 * per_call, (bounded, unbounded)


def _laser_state_and_caches(laser) -> list[torch.Tensor]:
    """LASER's per-site state and its bounded caches (torch and Triton sides): excluded from
    the fit, as on CPU; their size is bounded separately."""
    import sys

    from laser_triton import numerics

    trs = list(laser.trackers.values())
    out = [t for tr in trs for t in (tr.U, tr.pending_shrink)
           if t is not None]  # (the error maxima are host floats, not tensors)
    out += list(numerics._COMPLETION_CACHE.values())
    orth = sys.modules.get("laser_triton.kernels.orthonormalize")
    if orth is not None:
        out += [t for plan in orth._PLANS.values() for t in (plan.meta, plan.Z, plan.ZZ)]
    return out


def test_no_allocator_growth_over_training_steps():
    """The GPU side of the no-growth guarantee, fitted like its CPU twin
    (tests/test_resources.py): the bytes of live CUDA tensors after each step, without
    LASER's per-site bases and bounded caches (whose ranks follow the spectra, bounded by
    max_rank, checked here), have a fitted growth below 1% of their level."""
    from helpers import fitted_slope, live_tensor_bytes

    from laser_triton.tools.trainer import Trainer
    from laser_triton.tools.training import TrainConfig

    cfg = TrainConfig.for_preset("tiny", batch_size=16, steps=90, use_laser=True,
                                 train_puzzles=64, test_puzzles=8, ema=False, device="cuda")
    trainer = Trainer(cfg)
    steps, held = [], []
    for step in range(90):
        trainer.train_step()
        if step >= 30 and step % 5 == 0:
            torch.cuda.synchronize()
            gc.collect()
            trs = list(trainer.laser.trackers.values())
            state = _laser_state_and_caches(trainer.laser)
            steps.append(step)
            held.append(live_tensor_bytes(state, device_type="cuda"))
            site_bytes = sum(tr.U.numel() * 4 for tr in trs if tr.U is not None)
            assert site_bytes <= sum(tr.width * tr.cfg.max_rank * 4 for tr in trs)
    window = steps[-1] - steps[0]
    assert fitted_slope(steps, held) * window <= 0.01 * (sum(held) / len(held)), held
    assert len(trainer.laser.trackers) == len(trs)  # no new sites appear after warm-up
    assert trainer.laser._step is None
