"""Saves that share one storage (issue 14): views with another dtype (class 2), an in-place
change between two saves (class 3), and a partial view saved by a later network call while
the storage's fidelity decision is still pending (class 4). Each test measures what backward
receives against a copy taken at save time."""

from __future__ import annotations

import pytest
import torch
from probe import rel, save, with_history

import laser_triton as lt
from laser_triton import decisions
from laser_triton.util import HostFuture

MSG = "modified by an inplace operation"


def low_rank(N: int, D: int, seed: int, rank: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, rank, generator=g) @ torch.randn(rank, D, generator=g)
            + 1e-3 * torch.randn(N, D, generator=g))


def _cfg(**kw) -> lt.LaserConfig:
    return lt.LaserConfig(**{"tau": 0.05, "rank": 8, "max_rank": 32, **kw})


@pytest.mark.parametrize("order", ["float_first", "views_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_views_of_one_storage_get_their_own_values(order, dtype):
    x = with_history(low_rank(300, 256, 0).to(dtype))
    views = [x.detach().view(torch.int32 if dtype == torch.float32 else torch.int16),
             x.detach().view(torch.uint8),
             x.detach().view(torch.bfloat16 if dtype != torch.bfloat16 else torch.float16)]
    saved = [x, *views] if order == "float_first" else [*views, x]
    want = [t.detach().clone() for t in saved]
    laser, record = lt.Laser(_cfg()), []
    with laser.compress():
        out = save(record, *saved)
    out.backward()
    for got, ref in zip(record[0], want):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        # the bit-reinterpreting views hold NaN/Inf patterns: compare their bytes
        same_bits = torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
        assert same_bits or (ref.is_floating_point() and rel(got, ref) <= 0.05)


@pytest.mark.parametrize("warm", [False, True], ids=["no_basis", "basis"])
@pytest.mark.parametrize("between", ["same_call", "next_call"])
def test_inplace_between_two_saves_raises(warm, between):
    """Save x, modify x in place, save x again: plain autograd raises at backward; so does
    LASER, whether the first save was decided (held compressed) or not."""
    def run(laser):
        x = with_history(low_rank(300, 256, 1))
        record = []
        ctx = laser.compress() if laser is not None else torch.enable_grad()
        with ctx:
            with (laser.role("a") if laser is not None else torch.enable_grad()):
                first = save(record, x)
            if between == "same_call" or laser is None:
                x.mul_(2.0)
                second = save(record, x)
            else:
                with laser.role("b"):  # the first save is decided before this call
                    x.mul_(2.0)
                    second = save(record, x)
        (first + second).backward()

    with pytest.raises(RuntimeError, match=MSG):
        run(None)
    laser = lt.Laser(_cfg())
    if warm:
        for s in range(3):
            record = []
            with laser.compress(), laser.role("a"):
                out = save(record, with_history(low_rank(300, 256, 10 + s)))
            out.backward()
        assert next(iter(laser.trackers.values())).rank > 0
    with pytest.raises(RuntimeError, match=MSG):
        run(laser)


class LaggingFuture(HostFuture):
    """Never ready when polled, as on a GPU behind the host; get() still answers."""

    def ready(self) -> bool:
        return False


def test_partial_view_saved_while_the_decision_is_pending_meets_tau(monkeypatch):
    """Rows 0-149 carry almost all the energy, rows 150-299 are small noise: the whole
    storage meets tau with a rank-4 basis, its second half alone does not. Call a saves the
    whole; call b, while a's decision is pending, saves the second half."""
    monkeypatch.setattr(decisions, "HostFuture", LaggingFuture)
    laser = lt.Laser(_cfg(decision_lag=2))

    B = torch.randn(4, 256, generator=torch.Generator().manual_seed(99))  # one row space

    def storage(seed):
        g = torch.Generator().manual_seed(100 + seed)
        return torch.cat([torch.randn(150, 4, generator=g) @ B,
                          0.01 * torch.randn(150, 256, generator=g)])

    for s in range(3):  # warm site a: the whole storage then passes with the tracked basis
        record = []
        with laser.compress(), laser.role("a"):
            out = save(record, with_history(storage(s)))
        out.backward()
    resets = laser.trackers["a/#0"].resets
    x = with_history(storage(5))
    want = x.detach().clone()
    record_a, record_b = [], []
    with laser.compress():
        with laser.role("a"):
            out_a = save(record_a, x)
        pending = [e for e in laser._step.entries.values() if e.stored is None]
        assert pending  # a's decision has not reached the host
        with laser.role("b"):
            out_b = save(record_b, x[150:])
    (out_a + out_b).backward()
    assert laser.trackers["a/#0"].resets == resets  # decided with the tracked basis
    assert rel(record_a[0][0], want) <= 0.05
    assert rel(record_b[0][0], want[150:]) <= 0.05
