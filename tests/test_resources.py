"""Resource safety: LASER holds no growing state over many training steps (issue: hardening)."""

import gc

import pytest
from helpers import fitted_slope, live_tensor_bytes

from laser_triton import numerics
from laser_triton.tools.trainer import Trainer
from laser_triton.tools.training import TrainConfig


@pytest.mark.slow
def test_no_growth_over_150_tiny_trm_steps():
    cfg = TrainConfig.for_preset("tiny", batch_size=2, steps=160, use_laser=True,
                                 train_puzzles=64, test_puzzles=8, ema=False,
                                 model={"L_cycles": 2})
    trainer = Trainer(cfg)
    steps, held, state = [], [], []
    for step in range(160):
        trainer.train_step()
        if step >= 40 and step % 10 == 0:  # after warm-up: bases and caches exist
            gc.collect()
            trs = list(trainer.laser.trackers.values())
            site_state = [tr.U for tr in trs if tr.U is not None]  # (error maxima: floats)
            caches = list(numerics._COMPLETION_CACHE.values())
            steps.append(step)
            held.append(live_tensor_bytes(site_state + caches))
            state.append(sum(t.numel() * t.element_size() for t in site_state))
            bound = sum(tr.width * tr.cfg.max_rank * 4 + 8 for tr in trs)
            assert state[-1] <= bound and len(caches) <= numerics.COMPLETION_CACHE_SIZE
    # Everything but the per-site bases (whose ranks follow the spectra, bounded by max_rank,
    # checked above) must not trend upward: fitted growth over the window below 1% of the level.
    window = steps[-1] - steps[0]
    assert fitted_slope(steps, held) * window <= 0.01 * (sum(held) / len(held)), held
    assert len(trainer.laser.trackers) == len(trs)  # no new sites appear after warm-up
    assert trainer.laser._step is None
