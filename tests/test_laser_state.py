"""Laser.state_dict / load_state_dict: a restored Laser continues the same trajectory (bases,
decisions, gradients bit-identical), survives torch.save, and refuses or warns on bad state."""

from __future__ import annotations

import io

import pytest
import torch
from models import GatedMLP

import laser_triton as lt
from laser_triton.distributed import LocalSync

CFG = dict(tau=0.05, rank=8, max_rank=48, coeff_dtype=torch.float32, shrink_every=2)


def low_rank_batch(step: int, N: int = 300, D: int = 160, r: int = 6) -> torch.Tensor:
    """Activations in a slowly rotating rank-r subspace plus small noise."""
    g = torch.Generator().manual_seed(1234 + step)
    base = torch.Generator().manual_seed(7)
    A = torch.randn(D, r, generator=base) + 0.05 * step * torch.randn(D, r, generator=g)
    return torch.randn(N, r, generator=g) @ A.t() + 1e-3 * torch.randn(N, D, generator=g)


def train_step(model: torch.nn.Module, laser: lt.Laser, step: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with laser.compress():
        out = model(low_rank_batch(step))
    out.square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # plain tensors and builtins only


def make_model() -> GatedMLP:
    torch.manual_seed(0)
    return GatedMLP()


def test_restored_laser_continues_bit_identically():
    model = make_model()
    straight = lt.Laser(lt.LaserConfig(**CFG))
    for s in range(4):
        train_step(model, straight, s)
    state = roundtrip(straight.state_dict())
    assert straight.summary()["ratio"] < 0.5  # the trajectory being checked is compressed

    restored = lt.Laser(lt.LaserConfig(**CFG))
    restored.load_state_dict(state)
    fresh = lt.Laser(lt.LaserConfig(**CFG))
    for s in range(4, 8):
        want = train_step(model, straight, s)
        got = train_step(model, restored, s)
        for a, b in zip(want, got):
            assert torch.equal(a, b)
        if s == 4:  # without the state the same step resets and gives other gradients
            other = train_step(model, fresh, s)
            assert not all(torch.equal(a, b) for a, b in zip(want, other))
    for name, tr in straight.trackers.items():
        tr2 = restored.trackers[name]
        assert torch.equal(tr.U, tr2.U), name
        assert (tr.tensors, tr.resets, tr.shrinks, tr.raw_fallbacks) == (
            tr2.tensors, tr2.resets, tr2.shrinks, tr2.raw_fallbacks), name
    assert restored.steps == straight.steps == 8
    assert restored.report().equals(straight.report())


def test_state_dict_between_steps_only():
    laser = lt.Laser(lt.LaserConfig(**CFG))
    with laser.compress():
        with pytest.raises(RuntimeError, match="between steps"):
            laser.state_dict()
        with pytest.raises(RuntimeError, match="between steps"):
            laser.load_state_dict({})


@pytest.mark.parametrize("state", [None, {}, {"version": 99}, [1, 2]])
def test_load_rejects_foreign_state(state):
    with pytest.raises(ValueError, match="Laser state_dict"):
        lt.Laser().load_state_dict(state)


def test_load_under_another_config_warns_and_applies_it():
    model = make_model()
    laser = lt.Laser(lt.LaserConfig(**CFG))
    for s in range(2):
        train_step(model, laser, s)
    state = laser.state_dict()
    names = list(laser.trackers)
    excluded = names[0]
    cfg = lt.LaserConfig(**{**CFG, "rank": 4, "max_rank": 4, "exclude": (excluded,)})
    other = lt.Laser(cfg)
    with pytest.warns(RuntimeWarning, match="max_rank"):
        other.load_state_dict(state)
    assert excluded not in other.trackers
    assert any(laser.trackers[n].rank > 4 for n in names[1:])
    for name in names[1:]:
        # a basis above the new ceiling is dropped: the site resets under the new max_rank
        kept = laser.trackers[name].rank <= 4
        assert (other.trackers[name].U is not None) == kept, name
        assert other.trackers[name].cfg.max_rank == 4
    train_step(model, other, 2)  # and it still trains


def test_load_rejects_a_width_mismatch():
    model = make_model()
    laser = lt.Laser(lt.LaserConfig(**CFG))
    train_step(model, laser, 0)
    state = laser.state_dict()
    state["sites"][0]["U"] = torch.zeros(7, 3)
    with pytest.raises(ValueError, match="saved basis"):
        lt.Laser(lt.LaserConfig(**CFG)).load_state_dict(state)


def test_restored_trackers_join_the_sync_of_the_first_step(monkeypatch):
    """Trackers restored before the first sync_basis step must use the distributed sync, or
    ranks would stop summing their power products."""
    made = []

    class FakeSync(LocalSync):
        active = True

    def fake_make_sync(enabled):
        made.append(FakeSync())
        return made[-1]

    monkeypatch.setattr("laser_triton.hooks.make_sync", fake_make_sync)
    model = make_model()
    laser = lt.Laser(lt.LaserConfig(**CFG))
    train_step(model, laser, 0)
    resumed = lt.Laser(lt.LaserConfig(**CFG, sync_basis=True))
    with pytest.warns(RuntimeWarning, match="sync_basis"):
        resumed.load_state_dict(laser.state_dict())
    train_step(model, resumed, 1)
    assert made and all(tr.sync is made[0] for tr in resumed.trackers.values())
