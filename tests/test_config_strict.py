"""LaserConfig rejects bad values at construction, naming the field (issue 14, class 8), and
every field that site_overrides accepts takes effect at that site (class 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from probe import rel, save, with_history

import laser_triton as lt


@pytest.mark.parametrize("kwargs,exc,field", [
    ({"seed": "abc"}, TypeError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": True}, TypeError, "seed"),
    ({"sync_basis": "yes"}, TypeError, "sync_basis"),
    ({"sync_basis": 1}, TypeError, "sync_basis"),
    ({"include": None}, TypeError, "include"),
    ({"exclude": [None]}, TypeError, "exclude"),
    ({"include": ["["]}, ValueError, "include"),
    ({"exclude": ["z/[ab"]}, ValueError, "exclude"),
    ({"include": [""]}, ValueError, "include"),
    ({"site_overrides": [("*", {"tau": 0.1})]}, TypeError, "site_overrides"),
    ({"site_overrides": {"*": 0.1}}, TypeError, "site_overrides"),
    ({"site_overrides": {"[": {"tau": 0.1}}}, ValueError, "site_overrides"),
    ({"site_overrides": {"*": {"coeff_dtype": "int8"}}}, TypeError, "coeff_dtype"),
    ({"site_overrides": {"*": {"coeff_dtype": torch.int8}}}, TypeError, "coeff_dtype"),
    ({"site_overrides": {"*": {"tau": "0.1"}}}, TypeError, "tau"),
    ({"site_overrides": {"*": {"rank": 2.0}}}, TypeError, "rank"),
    ({"site_overrides": {"*": {"rank": 512}}}, ValueError, "max_rank"),
    ({"site_overrides": {"*": {"batch_size": 8}}}, ValueError, "batch_size"),
    ({"site_overrides": {"*": {"decision_lag": 0}}}, ValueError, "decision_lag"),
    ({"site_overrides": {"*": {"seed": 1}}}, ValueError, "seed"),
    ({"reset_power_iters": 1.0}, TypeError, "reset_power_iters"),
    ({"shrink_target": "0.5"}, TypeError, "shrink_target"),
    ({"exact_below": None}, TypeError, "exact_below"),
    ({"mode": 3}, ValueError, "mode"),
    ({"coeff_dtype": "int8"}, TypeError, "coeff_dtype"),
])
def test_bad_values_fail_at_construction_naming_the_field(kwargs, exc, field):
    with pytest.raises(exc, match=field) as info:
        lt.LaserConfig(**kwargs)
    assert str(info.value).startswith("LaserConfig")


def test_numpy_scalars_are_accepted_as_python_numbers():
    cfg = lt.LaserConfig(rank=np.int64(16), max_rank=np.int32(64), tau=np.float32(0.1),
                         seed=np.int64(7), sync_basis=np.bool_(False),
                         site_overrides={"y/*": {"min_width": np.int16(64),
                                                 "tau": np.float64(0.2)}})
    assert (cfg.rank, cfg.max_rank, cfg.seed) == (16, 64, 7)
    assert type(cfg.rank) is int and type(cfg.seed) is int and type(cfg.tau) is float
    assert cfg.sync_basis is False
    site = cfg.for_site("y/#0")
    assert type(site.min_width) is int and site.min_width == 64 and site.tau == 0.2


@pytest.mark.parametrize("name,dtype", [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                        ("float16", torch.float16), ("torch.float32", torch.float32)])
def test_coeff_dtype_names_are_accepted(name, dtype):
    assert lt.LaserConfig(coeff_dtype=name).coeff_dtype is dtype
    cfg = lt.LaserConfig(site_overrides={"y/*": {"coeff_dtype": name}})
    assert cfg.for_site("y/#0").coeff_dtype is dtype


def _saved_in_roles(cfg: lt.LaserConfig, width: int, seed: int = 0) -> dict[str, float]:
    """Relative error of what backward receives for one low-rank (300, width) tensor saved
    in role z and one in role y."""
    g = torch.Generator().manual_seed(seed)
    laser, records, want, outs = lt.Laser(cfg), {}, {}, []
    with laser.compress():
        for role in ("z", "y"):
            x = torch.randn(300, 6, generator=g) @ torch.randn(6, width, generator=g)
            x = x + 1e-3 * torch.randn(300, width, generator=g)  # not exactly low rank
            want[role], records[role] = x.clone(), []
            with laser.role(role):
                outs.append(save(records[role], with_history(x)))
    sum(outs).backward()
    return {role: rel(records[role][0][0], want[role]) for role in ("z", "y")}


def test_per_site_min_width_takes_effect():
    base = dict(tau=0.05, rank=8, max_rank=32, min_width=128)
    err = _saved_in_roles(lt.LaserConfig(**base), 200)
    assert err["z"] > 0 and err["y"] > 0  # both compressed (not exact) at width 200
    err = _saved_in_roles(lt.LaserConfig(**base, site_overrides={"y/*": {"min_width": 256}}), 200)
    assert err["y"] == 0.0 and 0 < err["z"] <= 0.05


def test_per_site_tau_zero_is_exact_and_per_site_tau_can_enable():
    err = _saved_in_roles(lt.LaserConfig(tau=0.05, rank=8, max_rank=32,
                                         site_overrides={"y/*": {"tau": 0.0}}), 160)
    assert err["y"] == 0.0 and 0 < err["z"] <= 0.05
    cfg = lt.LaserConfig(tau=0.0, rank=8, max_rank=32, site_overrides={"y/*": {"tau": 0.05}})
    assert cfg.enabled
    err = _saved_in_roles(cfg, 160)
    assert err["z"] == 0.0 and 0 < err["y"] <= 0.05
