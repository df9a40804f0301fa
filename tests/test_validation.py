"""Bad input gets a clear TypeError/ValueError naming the problem (ops and LaserConfig)."""

import pytest
import torch

import laser_triton as lt
from laser_triton import ops


def test_config_defaults_and_site_overrides():
    cfg = lt.LaserConfig(site_overrides={"y/*": {"tau": 0.03, "max_rank": 64}}, exclude=("z/attn*",))
    assert cfg.for_site("y/#0").tau == 0.03 and cfg.for_site("y/#0").max_rank == 64
    assert cfg.for_site("z/#0") is cfg
    assert cfg.for_site("z/attn.qkv#0") is None
    assert lt.LaserConfig(include=("y/*",)).for_site("z/#1") is None


@pytest.mark.parametrize("kwargs,match", [
    ({"tau": 1.0}, "tau must be in"),
    ({"tau": -0.1}, "tau must be in"),
    ({"rank": 0}, "rank must be >= 1"),
    ({"rank": 64, "max_rank": 32}, "max_rank"),
    ({"min_rank": 40, "rank": 32}, "min_rank"),
    ({"power_iters": 0}, "power_iters"),
    ({"mode": "eager"}, "mode must be"),
    ({"tau": 0.001}, "below what"),
    ({"site_overrides": {"*": {"rnak": 3}}}, "unknown fields"),
    ({"reset_target": 1.5}, "reset_target"),
    ({"decision_lag": -1}, "decision_lag must be >= 0"),
])
def test_config_rejects_invalid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lt.LaserConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 2.5}, "rank must be an int"),
    ({"decision_lag": 1.0}, "decision_lag must be an int"),
    ({"tau": "0.1"}, "tau must be a float"),
    ({"coeff_dtype": torch.int8}, "coeff_dtype"),
    ({"include": "z/*"}, "sequence of glob"),
])
def test_config_rejects_wrong_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        lt.LaserConfig(**kwargs)


def test_tau_zero_is_allowed_and_disables():
    assert not lt.LaserConfig(tau=0.0).enabled


def _U(D=64, r=4):
    return torch.linalg.qr(torch.randn(D, r))[0]


@pytest.mark.parametrize("X,U,exc,match", [
    (torch.randint(0, 5, (8, 64)), _U(), TypeError, "X has dtype torch.int64"),
    (torch.zeros(8, 64, dtype=torch.bool), _U(), TypeError, "X has dtype torch.bool"),
    (torch.randn(8, 64, 2), _U(), ValueError, "X must be 2-D"),
    (torch.randn(0, 64), _U(), ValueError, "X is empty"),
    (torch.randn(8, 64), _U(64, 4).double(), TypeError, "U has dtype torch.float64"),
    (torch.randn(8, 64), _U(32, 4), ValueError, "U has 32 rows but the activation width is 64"),
    (torch.randn(8, 4), torch.randn(4, 6), ValueError, "U has 4 rows|rank 6"),
    ([[1.0]], _U(), TypeError, "X must be a torch.Tensor"),
])
def test_compress_pass_rejects_bad_input(X, U, exc, match):
    with pytest.raises(exc, match=match):
        ops.compress_pass(X, U)


def test_compress_pass_rank_above_width():
    with pytest.raises(ValueError, match="rank 6 of U exceeds its width 4"):
        ops.compress_pass(torch.randn(8, 4), torch.randn(4, 6))


def test_reconstruct_and_orthonormalize_reject_bad_input():
    with pytest.raises(ValueError, match="C has rank 3 but U has rank 4"):
        ops.reconstruct(torch.randn(5, 3), _U())
    with pytest.raises(TypeError, match="output dtype"):
        ops.reconstruct(torch.randn(5, 4), _U(), torch.int32)
    with pytest.raises(ValueError, match="rank 9 exceeds width 4"):
        ops.orthonormalize(torch.randn(4, 9))
    with pytest.raises(TypeError, match="Y has dtype"):
        ops.orthonormalize(torch.randint(0, 3, (10, 2)))
    with pytest.raises(ValueError, match=r"Ys\[1\]"):
        ops.orthonormalize_batched([torch.randn(10, 2), torch.randn(2, 5)])


def test_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("LASER_TRITON_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="LASER_TRITON_BACKEND"):
        ops.compress_pass(torch.randn(8, 64), _U())
    monkeypatch.setenv("LASER_TRITON_BACKEND", "torch")
    assert ops.backend_for("compress_pass", torch.randn(2, 2)) == "torch"
    monkeypatch.setenv("LASER_TRITON_BACKEND", "auto")
    assert ops.backend_for("compress_pass", torch.randn(2, 2)) == "torch"  # CPU tensors


def test_laser_rejects_bad_role_and_config():
    with pytest.raises(TypeError, match="LaserConfig"):
        lt.Laser({"tau": 0.1})
    laser = lt.Laser()
    with pytest.raises(ValueError, match="role name"):
        with laser.role("a/b"):
            pass


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_saves_are_kept_raw_not_a_crash(layout):
    """Hooks never raise on an ineligible tensor: a sparse tensor has no storage to key or
    compress (it used to raise NotImplementedError inside the pack hook)."""
    from laser_triton.trm.savecount import SavedTensorCounter

    g = torch.Generator().manual_seed(0)
    dense = torch.randn(300, 64, generator=g).relu()
    a = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    w = torch.randn(64, 160, generator=g, requires_grad=True)

    def loss_fn():
        return (torch.sparse.mm(a, w) if layout == "coo" else a @ w).square().sum()

    loss_fn().backward()
    want, w.grad = w.grad.clone(), None
    laser = lt.Laser(lt.LaserConfig(tau=0.05, rank=8, max_rank=64))
    with laser.compress():
        loss = loss_fn()
    loss.backward()
    # the sparse operand is served exactly; the dense product may be compressed (within tau)
    assert ((w.grad - want).norm() / want.norm()) < 2 * 0.05
    rep = laser.report().set_index("site")
    assert rep.loc["(raw: layout)", "raw_bytes"] > 0
    counter = SavedTensorCounter()
    with counter.compress():
        loss_fn().backward()
    assert counter.total_bytes() > 0
