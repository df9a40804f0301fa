"""Saved tensors modified in place: plain autograd raises; through saved-tensor hooks it does
not check, so LASER does. A tensor served raw or rebuilt from modified values must raise the
same error, never feed backward silently; one held compressed from the values as saved gives
the gradient of those values."""

from __future__ import annotations

import pytest
import torch

import laser_triton as lt

MSG = "modified by an inplace operation"


def low_rank(N: int, D: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 4, generator=g) @ torch.randn(4, D, generator=torch.Generator()
                                                         .manual_seed(99))


def forward(x, w, laser, modify: str):
    """y = x @ w, loss = sum(y * y) (mul saves y, low rank like x); modify y or w in place."""
    ctx = laser.compress() if laser is not None else torch.enable_grad()
    with ctx:
        y = x @ w
        z = y * y  # saves y
        if modify == "inside":  # before the step's fidelity decisions are read
            y.mul_(2)
        loss = z.sum()
    if modify == "after":  # after compress() returned: decisions made
        y.mul_(2)
    if modify == "weight":
        with torch.no_grad():
            w.add_(1.0)
    return loss


@pytest.mark.parametrize("modify", ["inside", "after", "weight"])
def test_plain_autograd_raises(modify):
    x, w = low_rank(300, 160, 0).requires_grad_(), torch.randn(160, 160, requires_grad=True)
    with pytest.raises(RuntimeError, match=MSG):
        forward(x, w, None, modify).backward()


@pytest.mark.parametrize("modify", ["inside", "weight"])
def test_laser_raises_where_it_would_serve_modified_values(modify):
    # The site's first tensor goes through a reset, which reads y after the modification.
    laser = lt.Laser(lt.LaserConfig(tau=0.05, rank=8, max_rank=64))
    x, w = low_rank(300, 160, 0).requires_grad_(), torch.randn(160, 160, requires_grad=True)
    with pytest.raises(RuntimeError, match=MSG):
        forward(x, w, laser, modify).backward()


def test_laser_raises_for_a_modified_raw_tensor():
    laser = lt.Laser(lt.LaserConfig(tau=0.05, min_width=128))
    x, w = torch.randn(300, 60), torch.randn(60, 60, requires_grad=True)  # narrow: kept raw
    loss = forward(x, w, laser, "after")
    assert "(raw: narrow)" in set(laser.report().site)
    with pytest.raises(RuntimeError, match=MSG):
        loss.backward()


def test_compressed_values_are_the_saved_ones():
    """Decided and held compressed from the values as saved: backward sees those values."""
    cfg = lt.LaserConfig(tau=0.05, rank=8, max_rank=64, coeff_dtype=torch.float32)
    laser = lt.Laser(cfg)
    w = torch.randn(160, 160, requires_grad=True)
    for step in range(3):  # warm the site: later tensors pass with the tracked basis
        forward(low_rank(300, 160, step), w, laser, "none").backward()
    tracker = next(iter(laser.trackers.values()))
    resets = tracker.resets
    x = low_rank(300, 160, 3)
    w.grad = None
    forward(x, w, laser, "after").backward()  # no error: nothing modified reaches backward
    assert tracker.resets == resets  # this tensor was held compressed, not reset
    got = w.grad.clone()
    w.grad = None
    forward(x, w, None, "none").backward()  # plain autograd on the unmodified values
    assert ((got - w.grad).norm() / w.grad.norm()) < 2 * cfg.tau
