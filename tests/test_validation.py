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


# Each case: op, its arguments (built fresh), the error type, and what the message must say.
# Every input here is one that the launcher in laser_triton.kernels rejects too.
_META = torch.device("meta")  # a second device on a CPU-only machine (metadata only)
_BAD_INPUTS = {
    "compress_pass: integer X": ("compress_pass", lambda: (torch.randint(0, 5, (8, 64)), _U()),
                                 TypeError, "X has dtype torch.int64"),
    "compress_pass: 3-D X": ("compress_pass", lambda: (torch.randn(8, 64, 2), _U()),
                             ValueError, "X must be 2-D"),
    "compress_pass: empty X": ("compress_pass", lambda: (torch.randn(0, 64), _U()),
                               ValueError, "X is empty"),
    "compress_pass: fp64 U": ("compress_pass", lambda: (torch.randn(8, 64), _U().double()),
                              TypeError, "U has dtype torch.float64"),
    "compress_pass: U rows != width": ("compress_pass", lambda: (torch.randn(8, 64), _U(32, 4)),
                                       ValueError, "U has 32 rows but the activation width is 64"),
    "compress_pass: rank > width": ("compress_pass", lambda: (torch.randn(8, 4), torch.randn(4, 6)),
                                    ValueError, "rank 6 of U exceeds its width 4"),
    "compress_pass: U on another device": (
        "compress_pass", lambda: (torch.randn(8, 64), _U().to(_META)),
        ValueError, "U is on meta but the activation is on cpu"),
    "compress_pass: integer coeff_dtype": (
        "compress_pass", lambda: (torch.randn(8, 64), _U(), True, torch.int8),
        TypeError, "coeff_dtype torch.int8 is not one of float32"),
    "compress_pass: X not a tensor": ("compress_pass", lambda: ([[1.0]], _U()),
                                      TypeError, "X must be a torch.Tensor"),
    "compress_pass: sparse X": ("compress_pass", lambda: (torch.randn(8, 64).to_sparse(), _U()),
                                TypeError, "X must be a dense .strided. tensor, got layout "
                                           "torch.sparse_coo"),
    "reconstruct: integer C": ("reconstruct", lambda: (torch.randint(0, 5, (5, 4)), _U()),
                               TypeError, "C has dtype torch.int64"),
    "reconstruct: sparse CSR C": ("reconstruct", lambda: (torch.randn(5, 4).to_sparse_csr(), _U()),
                                  TypeError, "C must be a dense .strided. tensor"),
    "reconstruct: rank mismatch": ("reconstruct", lambda: (torch.randn(5, 3), _U()),
                                   ValueError, "C has rank 3 but U has rank 4"),
    "reconstruct: rank > width": ("reconstruct", lambda: (torch.randn(5, 6), torch.randn(4, 6)),
                                  ValueError, "rank 6 of U exceeds its width 4"),
    "reconstruct: U on another device": ("reconstruct", lambda: (torch.randn(5, 4), _U().to(_META)),
                                         ValueError, "U is on meta but C is on cpu"),
    "reconstruct: integer output dtype": ("reconstruct", lambda: (torch.randn(5, 4), _U(), torch.int32),
                                          TypeError, "output dtype torch.int32"),
    "orthonormalize: integer Y": ("orthonormalize", lambda: (torch.randint(0, 3, (10, 2)),),
                                  TypeError, "Y has dtype torch.int64"),
    "orthonormalize: 1-D Y": ("orthonormalize", lambda: (torch.randn(10),),
                              ValueError, "Y must be 2-D"),
    "orthonormalize: rank > width": ("orthonormalize", lambda: (torch.randn(4, 9),),
                                     ValueError, "rank 9 exceeds width 4"),
    "orthonormalize: empty Y": ("orthonormalize", lambda: (torch.randn(10, 0),),
                                ValueError, "Y is empty"),
    "orthonormalize_batched: rank > width": (
        "orthonormalize_batched", lambda: ([torch.randn(10, 2), torch.randn(2, 5)],),
        ValueError, r"Ys\[1\]: rank 5 exceeds width 2"),
    "orthonormalize_batched: two devices": (
        "orthonormalize_batched", lambda: ([torch.randn(10, 2), torch.randn(10, 2, device=_META)],),
        ValueError, r"Ys\[1\] is on meta but Ys\[0\] is on cpu"),
    "grad_coeff: integer G": ("grad_coeff", lambda: (torch.randint(0, 3, (2, 7, 5)), torch.randn(2, 7, 3)),
                              TypeError, "G has dtype torch.int64"),
    "grad_coeff: rows differ": ("grad_coeff", lambda: (torch.randn(2, 7, 5), torch.randn(2, 6, 3)),
                                ValueError, "must agree in every dimension but the last"),
    "grad_coeff: empty C": ("grad_coeff", lambda: (torch.randn(2, 7, 5), torch.randn(2, 7, 0)),
                            ValueError, "C is empty"),
    "grad_coeff: two devices": ("grad_coeff", lambda: (torch.randn(2, 7, 5), torch.randn(2, 7, 3, device=_META)),
                                ValueError, "C is on meta but G is on cpu"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS), ids=list(_BAD_INPUTS))
def test_bad_input_gets_the_same_error_through_ops_and_the_launcher(case):
    """One definition of each check (laser_triton.validation): ops and the Triton launcher
    reject the same input with the same exception type and message, and the message names
    the problem."""
    kernels = pytest.importorskip("laser_triton.kernels")
    op, make, exc, match = _BAD_INPUTS[case]
    with pytest.raises(exc, match=match) as via_ops:
        getattr(ops, op)(*make())
    with pytest.raises(exc, match=match) as via_launcher:
        getattr(kernels, op)(*make())
    assert type(via_launcher.value) is type(via_ops.value)
    assert str(via_launcher.value) == str(via_ops.value)


def test_supports_sends_too_many_rows_to_the_reference():
    """The launcher's int32 row-scratch bound is a size the kernels do not cover: `supports`
    says so (auto dispatch then runs the reference) instead of the launcher raising."""
    kernels = pytest.importorskip("laser_triton.kernels")
    U = torch.empty(256, 255)
    fits = torch.empty(1, 256).expand(2**31 // 256 - 1, 256)  # metadata only: stride 0 rows
    too_many = torch.empty(1, 256).expand(2**31 // 256, 256)
    assert kernels.supports("compress_pass", fits, U)
    assert not kernels.supports("compress_pass", too_many, U)
    with pytest.raises(ValueError, match="too many for rank 255"):
        kernels.compress_pass(too_many, U)
