"""Lean RMSNorm backward in LASER's compressed domain (laser_triton/lowrank.py `rms_norm`):
dx = r (dy - y mean(dy y)) with y taken from (C, U), never rebuilt.

Measured from outside: rebuilds are ops.reconstruct calls in backward, served inputs what the
unpack hook returned as (C, U); the reference is the same LASER step rebuilding y
(lowrank_backward=False), and, for raw y, trm.lean's RMSNorm bit for bit."""

from __future__ import annotations

import pytest
import torch
from models import low_rank_tokens

import laser_triton as lt
from laser_triton import lowrank, ops
from laser_triton.trm.lean import rms_norm_lean

TAU, EPS = 0.05, 1e-5


def _norm_step(x0, G, cfg, transposed, monkeypatch):
    """rms_norm on x0 (or its (B, D, L) transposed view) inside compress(); -> (dx, served
    layouts, rebuilds in backward)."""
    served, rebuilds = [], []
    serve, rebuild = lowrank.serve, ops.reconstruct

    def counting_serve(p):
        out = serve(p)
        if out is not None:
            served.append(lowrank.served_input().layout)
        return out

    def counting_rebuild(*a, **k):
        rebuilds.append(1)
        return rebuild(*a, **k)

    x = x0.detach().clone().requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(lowrank, "serve", counting_serve)
        m.setattr(ops, "reconstruct", counting_rebuild)
        if cfg is None:
            h = x * 1.0
            y = rms_norm_lean(h.transpose(1, 2) if transposed else h, EPS)
        else:
            with lt.Laser(cfg).compress():
                h = x * 1.0  # (B, L, D) storage; transposed: the norm's output keeps its layout
                y = lowrank.rms_norm(h.transpose(1, 2) if transposed else h, EPS)
        y.backward(G)
    return x.grad, served, len(rebuilds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_norm_gradient_from_coefficients_matches_the_rebuild_path(monkeypatch, dtype, transposed):
    B, L, D = 2, 150, 160  # no size a multiple of a block
    x0 = low_rank_tokens(B, L, D, rank=6, seed=5, dtype=dtype, noise=0.03)
    G = torch.randn((B, D, L) if transposed else (B, L, D),
                    generator=torch.Generator().manual_seed(6)).to(dtype)
    dx, served, rebuilds = _norm_step(x0, G, lt.LaserConfig(tau=TAU, min_width=64), transposed,
                                      monkeypatch)
    assert served == ["cols" if transposed else "rows"] and rebuilds == 0  # y never rebuilt
    dx_r, served_r, rebuilds_r = _norm_step(
        x0, G, lt.LaserConfig(tau=TAU, min_width=64, lowrank_backward=False), transposed,
        monkeypatch)
    assert served_r == [] and rebuilds_r == 1
    # Same y_hat = C U^T on both paths; the rebuild path rounds it to the activation dtype.
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
    assert float((dx.double() - dx_r.double()).norm() / dx_r.double().norm()) < tol
    exact = _norm_step(x0, G, None, transposed, monkeypatch)[0]
    assert float((dx.double() - exact.double()).norm() / exact.double().norm()) < 4 * TAU


@pytest.mark.parametrize("transposed", [False, True])
def test_raw_outputs_take_the_lean_norm_path_bit_identically(monkeypatch, transposed):
    """Excluded sites (stored raw) and tau 0: exactly trm.lean's gradients, nothing served."""
    x0 = low_rank_tokens(2, 140, 160, rank=6, seed=1)
    G = torch.randn((2, 160, 140) if transposed else (2, 140, 160))
    ref = _norm_step(x0, G, None, transposed, monkeypatch)[0]
    for cfg in (lt.LaserConfig(tau=TAU, include=()), lt.LaserConfig(tau=0.0)):
        dx, served, _ = _norm_step(x0, G, cfg, transposed, monkeypatch)
        assert torch.equal(dx, ref) and served == [], cfg


def test_norm_reuses_a_live_rebuild(monkeypatch):
    """When another consumer's unpack has rebuilt the region and the rebuild is still alive
    (y * y saves y twice; its backward runs first), the norm reads it instead of (C, U)."""
    x0 = low_rank_tokens(2, 140, 160, rank=6, seed=1)
    served, rebuilds = [], []
    serve, rebuild = lowrank.serve, ops.reconstruct
    monkeypatch.setattr(lowrank, "serve", lambda p: served.append(serve(p)) or served[-1])
    monkeypatch.setattr(ops, "reconstruct", lambda *a, **k: rebuilds.append(1) or rebuild(*a, **k))
    x = x0.clone().requires_grad_()
    with lt.Laser(lt.LaserConfig(tau=TAU)).compress():
        y = lowrank.rms_norm(x * 1.0, EPS)
        loss = (y * y).sum()
    loss.backward()
    assert len(served) == 4 and all(s is None for s in served)  # asked, and declined
    assert len(rebuilds) == 1
