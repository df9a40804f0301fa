"""Undecided tensors are held raw until their fidelity decisions reach the host. On a GPU the
host runs ahead, so a non-blocking poll finds nothing ready: without a bound, a whole step's
activations stay raw until compress() exits. `decision_lag` bounds the outstanding batches; the
host then waits on the oldest batch's event (not a device synchronization)."""

from __future__ import annotations

import pytest
from models import GatedMLP, low_rank_tokens

import laser_triton as lt
from laser_triton import decisions
from laser_triton.util import HostFuture


class LaggingFuture(HostFuture):
    """Never ready when polled: as on a GPU far behind the host. get() still answers."""

    waits = 0

    def ready(self) -> bool:
        return False

    def get(self):
        LaggingFuture.waits += 1
        return super().get()


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_undecided_tensors_are_bounded_by_the_lag(monkeypatch, lag):
    monkeypatch.setattr(decisions, "HostFuture", LaggingFuture)
    laser = lt.Laser(lt.LaserConfig(tau=0.05, rank=8, max_rank=48, min_width=64,
                                    decision_lag=lag))
    model = GatedMLP()
    x = low_rank_tokens(2, 150, 160, rank=6, seed=0).requires_grad_()
    calls = 6
    undecided, new = [], []
    with laser.compress():
        h = x
        for i in range(calls):
            before = len(laser._step.entries)
            with laser.role(f"call{i}"):
                h = model(h)
            entries = laser._step.entries.values()
            new.append(len(entries) - before)
            undecided.append(sum(e.stored is None for e in entries))
        loss = h.square().mean()
    loss.backward()
    # After call k exits, only the last `lag` calls' tensors may await their decisions
    # (without the bound: every call's, [3, 7, 11, ...]).
    for k in range(calls):
        assert undecided[k] <= sum(new[max(0, k - lag + 1):k + 1]) if lag else undecided[k] == 0
    assert undecided[-1] < sum(new) - new[0]
    assert LaggingFuture.waits > 0
