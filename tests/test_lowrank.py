"""Linear backward in LASER's compressed domain (laser_triton/lowrank.py): dW = (G^T C) U^T.

Measured from outside: the exact gradient is G^T X in fp64 from the activation as it was saved,
the rebuild count is the number of ops.reconstruct calls in backward, and the bound is
||dW - G^T X||_F <= ||G||_2 tau ||X||_F.
"""

from __future__ import annotations

import pytest
import torch
from models import low_rank_tokens

import laser_triton as lt
from laser_triton import lowrank, ops

TAU = 0.05


class _Served:
    """Counts the (C, U) handles served, by layout, and the rebuilds in backward."""

    def __init__(self, monkeypatch):
        self.layouts: list[str] = []
        self.rebuilds: list[tuple[int, int]] = []
        serve, rebuild = lowrank.serve, ops.reconstruct

        def counting_serve(p):
            out = serve(p)
            if out is not None:
                self.layouts.append(lowrank.served_input().layout)
            return out

        def counting_rebuild(C, U, dtype=None):
            self.rebuilds.append((C.shape[0], U.shape[0]))
            return rebuild(C, U, dtype)

        monkeypatch.setattr(lowrank, "serve", counting_serve)
        monkeypatch.setattr(ops, "reconstruct", counting_rebuild)


def _layer_step(x0: torch.Tensor, w: torch.Tensor, G: torch.Tensor, cfg: lt.LaserConfig | None,
                lean: bool, transposed: bool):
    """One linear layer on x0 (or its (B, D, L) transpose) inside compress(); -> (dx, dW)."""
    x = x0.detach().clone().requires_grad_()
    wp = w.detach().clone().requires_grad_()
    laser = lt.Laser(cfg) if cfg is not None else None
    ctx = laser.compress() if laser is not None else torch.enable_grad()
    with ctx:
        h = x * 1.0  # an activation with history, as in a network
        inp = h.transpose(1, 2) if transposed else h
        if lowrank.active():
            y = lowrank.linear(inp, wp, lean)
        else:
            y = torch.nn.functional.linear(inp, wp.to(inp.dtype))
    y.backward(G)
    return x.grad, wp.grad


def _bound(G: torch.Tensor, X: torch.Tensor, tau: float) -> float:
    G2 = G.reshape(-1, G.shape[-1]).double()
    return float(torch.linalg.matrix_norm(G2, ord=2)) * tau * float(X.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lean,transposed", [(False, False), (True, False), (True, True)])
def test_weight_gradient_within_bound_and_no_rebuild(monkeypatch, dtype, lean, transposed):
    """Random low-rank-plus-noise activations (error about 0.6 tau): dW from (C, U) meets
    ||G||_2 tau ||X||, matches the rebuild path, and backward rebuilds nothing."""
    B, L, D, out = 2, 150, 160, 37  # no size a multiple of a block
    x0 = low_rank_tokens(B, L, D, rank=6, seed=3, dtype=dtype, noise=0.03)
    g = torch.Generator().manual_seed(4)
    K = L if transposed else D
    w = torch.randn(out, K, generator=g) / K ** 0.5
    G = torch.randn(B, D if transposed else L, out, generator=g).to(dtype)
    cfg = lt.LaserConfig(tau=TAU, min_width=64, coeff_dtype=torch.bfloat16)
    served = _Served(monkeypatch)
    dx, dw = _layer_step(x0, w, G, cfg, lean, transposed)
    assert served.layouts == ["cols" if transposed else "rows"] and served.rebuilds == []
    X = (x0.transpose(1, 2) if transposed else x0).reshape(-1, K)
    exact = G.reshape(-1, out).double().t() @ X.double()
    err = float((dw.double() - exact).norm())
    # arithmetic: fp32 sums of exact products; a bf16 weight copy rounds dW once more
    slack = (2.0 ** -8 if dtype == torch.bfloat16 and not lean else 1e-5) * float(exact.norm())
    assert err <= _bound(G, X, TAU) + slack
    assert err > 0  # the compressed path really ran on lossy coefficients
    off = lt.LaserConfig(tau=TAU, min_width=64, lowrank_backward=False)
    dx_r, dw_r = _layer_step(x0, w, G, off, lean, transposed)
    assert len(served.rebuilds) == 1 and len(served.layouts) == 1  # the rebuild path rebuilt
    assert torch.equal(dx, dx_r)  # dX = G W needs no X
    diff = float((dw.double() - dw_r.double()).norm())
    assert diff <= _bound(G, X, TAU) + slack + 2.0 ** -8 * float(exact.norm())


@pytest.mark.parametrize("lean", [False, True])
def test_raw_inputs_take_the_ordinary_path_bit_identically(monkeypatch, lean):
    """Excluded sites (stored raw), tau 0 and narrow rows give F.linear's gradients exactly."""
    x0 = low_rank_tokens(2, 140, 160, rank=6, seed=1)
    w = torch.randn(20, 160)
    G = torch.randn(2, 140, 20)
    ref = _layer_step(x0, w, G, None, lean, False)
    served = _Served(monkeypatch)
    for cfg in (lt.LaserConfig(tau=TAU, include=()), lt.LaserConfig(tau=0.0),
                lt.LaserConfig(tau=TAU, min_width=200)):
        got = _layer_step(x0, w, G, cfg, lean, False)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), cfg
    assert served.layouts == []


def test_backward_inside_compress_uses_the_undecided_raw_values():
    """Backward before the decisions are read (inside compress()): exact values, no handle."""
    x0 = low_rank_tokens(2, 140, 160, rank=6, seed=1)
    w = torch.randn(20, 160)
    G = torch.randn(2, 140, 20)
    ref = _layer_step(x0, w, G, None, False, False)
    x = x0.clone().requires_grad_()
    wp = w.clone().requires_grad_()
    laser = lt.Laser(lt.LaserConfig(tau=TAU, batch_size=1000, decision_lag=1000))
    with laser.compress():
        y = lowrank.linear(x * 1.0, wp, False)
        y.backward(G)
    assert torch.equal(x.grad, ref[0]) and torch.equal(wp.grad, ref[1])


def test_other_consumers_of_the_storage_still_get_the_rebuild(monkeypatch):
    """A second op saving the same activation unpacks the rebuilt tensor as before; only the
    linear layer's own rebuild goes away."""
    x0 = low_rank_tokens(2, 140, 160, rank=6, seed=1)
    w = torch.randn(20, 160)
    served = _Served(monkeypatch)
    grads, rebuilds = [], []
    for on in (True, False):
        x, wp = x0.clone().requires_grad_(), w.clone().requires_grad_()
        with lt.Laser(lt.LaserConfig(tau=TAU, lowrank_backward=on)).compress():
            h = x * 1.0
            loss = lowrank.linear(h, wp, True).square().sum() + (h * h).sum()  # mul saves h
        n = len(served.rebuilds)
        loss.backward()
        rebuilds.append(len(served.rebuilds) - n)
        grads.append((x.grad, wp.grad))
    assert served.layouts == ["rows"]
    # The mul still gets the rebuilt tensor; a region is rebuilt once for all its unpacks
    # (issue 13), so the linear's unpack shares that rebuild when it is not low-rank.
    assert rebuilds == [1, 1]
    for a, b in zip(*grads):
        assert float((a - b).norm() / b.norm()) < 1e-2


def test_inactive_outside_compress_and_when_disabled():
    assert not lowrank.active()
    laser = lt.Laser(lt.LaserConfig(tau=TAU))
    with laser.compress():
        assert lowrank.active()
        with torch.no_grad():
            assert not lowrank.active()
    assert not lowrank.active()
    with lt.Laser(lt.LaserConfig(tau=TAU, lowrank_backward=False)).compress():
        assert not lowrank.active()
    with pytest.raises(TypeError, match="lowrank_backward"):
        lt.LaserConfig(lowrank_backward=1)


def test_high_rank_inputs_take_the_rebuild_path(monkeypatch):
    """A compressed input whose rank makes dW from (C, U) dearer than rebuild + G^T X_hat (the
    column layout near full rank) is rebuilt instead."""
    x0 = low_rank_tokens(2, 140, 150, rank=120, seed=2)  # stored below r ~ 144, pays below 78
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1000, 140, generator=g)
    G = torch.randn(2, 150, 1000, generator=g)
    served = _Served(monkeypatch)
    laser = lt.Laser(lt.LaserConfig(tau=TAU))
    x = x0.clone().requires_grad_()
    with laser.compress():
        y = lowrank.linear((x * 1.0).transpose(1, 2), w.clone().requires_grad_(), True)
    r = int(laser.report().iloc[0]["rank"])
    assert r >= 78 and r * 1000 * (150 + 140) >= 150 * 140 * (r + 1000)  # does not pay ...
    y.backward(G)
    assert served.layouts == [] and len(served.rebuilds) == 1  # ... so it was rebuilt
    rows = lowrank.LowRankInput(torch.zeros(3000, 150), torch.zeros(160, 150), "rows", (3000, 160))
    assert lowrank.pays(rows, 512)  # near full rank, the row layout still pays
    def cols(r):
        return lowrank.LowRankInput(torch.zeros(2, 97, r), torch.zeros(128, r), "cols", (2, 128, 97))
    assert lowrank.pays(cols(40), 512) and not lowrank.pays(cols(100), 512)


def test_column_layout_weight_gradient_holds_no_more_than_the_rebuild():
    """mlp_t's column view with a wide output: G_b^T U for all b (2 B out r fp32 with its copy,
    7.2 MB here) would outgrow the B L D input (0.6 MB); dW from (C, U) allocates about what
    rebuilding the input takes (chunk rounding: 1.25x), plus dW and one partial sum, and
    equals the exact product."""
    from laser_triton.tools.livebytes import LiveBytes  # noqa: PLC0415

    B, D, L, r, out = 32, 96, 50, 40, 700
    g = torch.Generator().manual_seed(5)
    U = torch.linalg.qr(torch.randn(D, r, generator=g))[0]
    C = torch.randn(B, L, r, generator=g)
    G = torch.randn(B, D, out, generator=g)
    x = lowrank.LowRankInput(C, U, "cols", (B, D, L))
    with LiveBytes() as live:
        dw = lowrank.weight_grad(G, x)
    rebuild, dw_bytes = B * L * D * 4, out * L * 4
    assert live.peak <= 1.25 * rebuild + 2 * dw_bytes + 65536, (live.peak, rebuild, dw_bytes)
    X = (U @ C.transpose(1, 2)).double()  # (B, D, L)
    exact = G.double().reshape(-1, out).t() @ X.reshape(-1, L)
    assert float((dw.double() - exact).norm() / exact.norm()) < 1e-5
