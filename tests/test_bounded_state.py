"""A site whose row width changes every step (attention scores over varying sequence lengths)
gets a tracker per width; LASER keeps at most WIDTHS_PER_SITE of them per site and counts the
ones it drops (issue 14, class 7). Values still meet tau."""

from __future__ import annotations

import torch
from probe import rel, save, with_history

import laser_triton as lt
from laser_triton.hooks import WIDTHS_PER_SITE


def test_trackers_per_site_are_bounded_over_varying_widths():
    laser = lt.Laser(lt.LaserConfig(tau=0.05, rank=8, max_rank=32, min_width=64))
    g = torch.Generator().manual_seed(0)
    widths = [130 + 7 * i for i in range(20)]  # a new width every step
    worst = 0.0
    for width in widths:
        x = torch.randn(200, 4, generator=g) @ torch.randn(4, width, generator=g)
        record = []
        with laser.compress(), laser.role("z"):
            out = save(record, with_history(x))
        out.backward()
        worst = max(worst, rel(record[0][0], x))
        assert len(laser.trackers) <= WIDTHS_PER_SITE
    assert worst <= 0.05
    assert laser.dropped_sites == len(widths) - WIDTHS_PER_SITE
    assert laser.summary()["dropped_sites"] == laser.dropped_sites
    basis_floats = sum(tr.U.numel() for tr in laser.trackers.values() if tr.U is not None)
    assert basis_floats <= WIDTHS_PER_SITE * max(widths) * 32
    state = laser.state_dict()  # the bound survives a restore
    again = lt.Laser(laser.cfg)
    again.load_state_dict(state)
    x = torch.randn(200, 4, generator=g) @ torch.randn(4, 999, generator=g)
    with again.compress(), again.role("z"):
        out = save([], with_history(x))
    out.backward()
    assert len(again.trackers) <= WIDTHS_PER_SITE and again.dropped_sites == 1


def test_a_fixed_width_site_keeps_its_tracker():
    laser = lt.Laser(lt.LaserConfig(tau=0.05, rank=8, max_rank=32, min_width=64))
    g = torch.Generator().manual_seed(1)
    B = torch.randn(4, 160, generator=g)
    for _ in range(6):
        with laser.compress():
            for role in ("z", "y"):
                with laser.role(role):
                    out = save([], with_history(torch.randn(200, 4, generator=g) @ B))
        out.backward()
    assert sorted(laser.trackers) == ["y/#0", "z/#0"] and laser.dropped_sites == 0
    assert laser.trackers["z/#0"].resets == 1  # tracked, not rebuilt every step
