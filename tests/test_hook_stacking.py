"""Saved-tensor hooks do not stack: the innermost context takes every save. LASER raises rather
than let torch.autograd.graph.save_on_cpu (or any other such context) and compress() silently
replace each other (issue 14)."""

from __future__ import annotations

import pytest
import torch
from probe import rel, save, with_history

import laser_triton as lt


def _x(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(300, 4, generator=g) @ torch.randn(4, 160, generator=g)


def _cfg(**kw) -> lt.LaserConfig:
    return lt.LaserConfig(**{"tau": 0.05, "rank": 8, "max_rank": 32, **kw})


def test_compress_inside_save_on_cpu_raises():
    laser = lt.Laser(_cfg())
    with torch.autograd.graph.save_on_cpu():
        with pytest.raises(RuntimeError, match="save_on_cpu"):
            with laser.compress():
                pass
    with laser.compress():  # the failed entry left nothing behind
        out = save([], with_history(_x()))
    out.backward()


def test_save_on_cpu_around_a_role_inside_compress_raises():
    laser = lt.Laser(_cfg())
    with pytest.raises(RuntimeError, match="save_on_cpu"):
        with laser.compress():
            with torch.autograd.graph.save_on_cpu():
                with laser.role("z"):
                    save([], with_history(_x()))


def test_save_on_cpu_over_the_whole_body_raises_at_exit():
    laser = lt.Laser(_cfg())
    hooks = torch.autograd.graph.save_on_cpu()
    with pytest.raises(RuntimeError, match="save_on_cpu"):
        with laser.compress():
            hooks.__enter__()  # left open to the end of compress()
            save([], with_history(_x()))
    hooks.__exit__(None, None, None)


def test_own_contexts_still_nest():
    """raw() and role() inside compress() are LASER's own and keep working."""
    laser, records = lt.Laser(_cfg()), {"raw": [], "z": []}
    x, y = _x(1), _x(2)
    with laser.compress():
        with laser.raw(), laser.role("a"):
            a = save(records["raw"], with_history(x))
        with laser.role("z"):
            b = save(records["z"], with_history(y))
    (a + b).backward()
    assert torch.equal(records["raw"][0][0], x)
    assert 0 < rel(records["z"][0][0], y) <= 0.05


def test_disabled_laser_installs_no_hooks_and_allows_save_on_cpu():
    laser = lt.Laser(_cfg(tau=0.0))
    x, record = _x(3), []
    with torch.autograd.graph.save_on_cpu():
        with laser.compress():
            out = save(record, with_history(x))
    out.backward()
    assert torch.equal(record[0][0], x)
