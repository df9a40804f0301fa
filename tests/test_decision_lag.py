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



@pytest.mark.parametrize("lag", [1, 2])
def test_counter_counts_the_waits_the_lag_forces_when_the_device_is_behind(monkeypatch, lag):
    """LaunchCounter(device_behind=True) plays a GPU that never catches up: with `lag`, the
    host waits at the end of a call for every batch past `lag` outstanding (decision_waits;
    one per call once `lag` calls are out) and for every batch left when compress() exits
    (final_waits); on CPU (values there at once) nothing is a wait. held_peak_bytes is the most the
    step's saved entries held at once, computed here from the entries (undecided: raw region
    plus coefficients; decided: what they store) at every decision point."""
    import torch

    from laser_triton import hooks, launches

    laser = lt.Laser(lt.LaserConfig(tau=0.05, rank=8, max_rank=48, min_width=64,
                                    decision_lag=lag))
    real_poll, held, expect = decisions.poll, [0], [0, 0]

    def poll(step, *args):
        b = 0
        for e in step.entries.values():
            if e.stored is None:
                C = e.draft.C
                b += e.raw_bytes() + (0 if C is None else C.numel() * C.element_size())
            else:
                b += e.held_bytes()
        held[0] = max(held[0], b)
        n, block = len(step.pending), args[0]
        expect[1 if block else 0] += n if block else max(0, n - lag)
        real_poll(step, *args)

    torch.manual_seed(0)
    model, calls = GatedMLP(), 6
    for s in range(3):
        if s == 2:
            monkeypatch.setattr(hooks, "poll", poll)
        x = low_rank_tokens(2, 150, 160, rank=6, seed=s).requires_grad_()
        with launches.LaunchCounter(device_behind=s == 2) as c:
            with laser.compress():
                h = x
                for _ in range(calls):
                    with laser.role("z"):
                        h = model(h)
                loss = h.square().mean()
            loss.backward()
        if s < 2:  # on CPU every batch's values are there at once: nothing to wait for
            assert c.waits == c.final_waits == 0
    assert c.waits >= calls - lag - 2 and c.final_waits >= lag  # (a call may draft nothing)
    assert [c.waits, c.final_waits] == expect
    assert c.summary()["decision_waits"] == c.waits
    assert c.held_peak == held[0] > 0
