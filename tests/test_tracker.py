"""The per-site algorithm on synthetic streams with known spectra and subspaces."""

import math

import pytest
import torch
from helpers import random_orthonormal, rel_err

import laser_triton as lt
from laser_triton import magnitude
from laser_triton.tracker import SiteTracker


def _stream_matrix(N, B, sigma, seed, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, B.shape[1], generator=g, dtype=torch.float64) / math.sqrt(N)
    X = (A * sigma.double()) @ B.t()
    if noise:
        X = X + noise * torch.randn(X.shape, generator=g, dtype=torch.float64) / math.sqrt(N)
    return X.float()


def _run(tr, X):
    """One tracker step as the hooks drive it; returns (stored, measured relative error)."""
    d = tr.draft(X)
    passed = bool(d.err <= tr.cfg.tau)
    tr.apply_pending()
    shrink = None if d.shrink_gram is None else (d.shrink_gram, float(d.e_X))
    st = tr.finalize(d, passed, shrink)
    X_hat = X if st.is_raw else magnitude.rebuild(st.C, st.U, X.dtype, st.scale)
    return st, rel_err(X_hat, X)


def _rotate(B, angle, seed):
    """Rotate the column space of B by `angle` radians towards random directions."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(B.shape, generator=g, dtype=torch.float64)
    Z = Z - B @ (B.t() @ Z)
    Z = torch.linalg.qr(Z)[0]
    return torch.linalg.qr(math.cos(angle) * B + math.sin(angle) * Z)[0]


def test_slow_drift_tracks_without_resets():
    D, N, k = 256, 3000, 8
    cfg = lt.LaserConfig(tau=0.05, max_rank=32, rank=8)
    tr = SiteTracker("z/#0", D, cfg)
    sigma = torch.logspace(0, -1, k)
    B = random_orthonormal(D, k, seed=1)
    errs = []
    for t in range(20):
        B = _rotate(B, 0.01, seed=100 + t)
        st, e = _run(tr, _stream_matrix(N, B, sigma, seed=t, noise=0.001))
        errs.append(e)
        assert e <= cfg.tau
    assert tr.resets == 1  # only the first tensor builds a basis
    assert tr.raw_fallbacks == 0


def test_subspace_jump_triggers_reset_and_stays_within_tau():
    D, N, k = 200, 2000, 6
    cfg = lt.LaserConfig(tau=0.05, max_rank=32, rank=8)
    tr = SiteTracker("z/#0", D, cfg)
    sigma = torch.ones(k)
    B1, B2 = random_orthonormal(D, k, seed=1), random_orthonormal(D, k, seed=2)
    for t in range(3):
        _, e = _run(tr, _stream_matrix(N, B1, sigma, seed=t))
        assert e <= cfg.tau
    assert tr.resets == 1
    st, e = _run(tr, _stream_matrix(N, B2, sigma, seed=9))
    assert tr.resets == 2 and not st.is_raw and e <= cfg.tau


@pytest.mark.parametrize("tau", [0.3, 0.1, 0.05])
def test_reset_picks_near_optimal_rank_on_known_spectrum(tau):
    D, N = 256, 4000
    sigma = torch.tensor([1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.12, 0.07, 0.04, 0.02])
    B = random_orthonormal(D, 10, seed=3)
    X = _stream_matrix(N, B, sigma, seed=0)
    s = torch.linalg.svdvals(X.double())
    tail = s.square().flip(0).cumsum(0).flip(0) / s.square().sum()
    optimal = next(j for j in range(1, D) if float(tail[j]) <= tau**2)
    tr = SiteTracker("s", D, lt.LaserConfig(tau=tau, max_rank=64))
    st, e = _run(tr, X)
    assert e <= tau and not st.is_raw
    r = st.C.shape[1]
    assert optimal <= r <= optimal + 2, (r, optimal)


def test_rank_above_max_rank_is_stored_raw():
    D, N = 160, 1000
    X = torch.randn(N, D)  # flat spectrum: needs ~all of D
    tr = SiteTracker("s", D, lt.LaserConfig(tau=0.05, max_rank=32))
    st, e = _run(tr, X)
    assert st.is_raw and e == 0.0 and tr.raw_fallbacks == 1


def test_rank_shrinks_when_spectrum_concentrates():
    D, N = 200, 3000
    B = random_orthonormal(D, 12, seed=4)
    wide = torch.ones(12)
    narrow = torch.tensor([1.0] * 3 + [1e-4] * 9)
    cfg = lt.LaserConfig(tau=0.05, max_rank=32, rank=8, shrink_every=2)
    tr = SiteTracker("s", D, cfg)
    _, e = _run(tr, _stream_matrix(N, B, wide, seed=0))
    assert tr.rank >= 12 and e <= cfg.tau
    for t in range(6):
        _, e = _run(tr, _stream_matrix(N, B, narrow, seed=1 + t))
        assert e <= cfg.tau
    assert tr.shrinks >= 1 and tr.rank <= 4


def test_nonfinite_activation_is_stored_raw():
    X = torch.randn(500, 128)
    X[3, 4] = float("inf")
    tr = SiteTracker("s", 128, lt.LaserConfig(tau=0.1))
    st, _ = _run(tr, X)
    assert st.is_raw and st.raw is X and tr.raw_fallbacks == 1
    # and the basis stays finite for the next tensor
    st2, e2 = _run(tr, torch.randn(500, 8) @ torch.randn(8, 128))
    assert not st2.is_raw and e2 <= 0.1 and torch.isfinite(tr.U).all()


def test_zero_activation_is_exact_and_basis_stays_finite():
    tr = SiteTracker("s", 128, lt.LaserConfig(tau=0.1))
    st, e = _run(tr, torch.zeros(300, 128))
    assert e == 0.0
    st, e = _run(tr, torch.zeros(300, 128))
    assert e == 0.0 and (tr.U is None or torch.isfinite(tr.U).all())
    st, e = _run(tr, torch.randn(300, 4) @ torch.randn(4, 128))
    assert e <= 0.1


def test_fp16_coefficient_overflow_is_scaled_not_inf():
    """Coefficients beyond fp16's max: the reset scales X by a power of two (magnitude.py)
    and stores it within tau; before scaling this fell back to raw."""
    X = (torch.randn(400, 3) @ torch.randn(3, 128)) * 3e4
    tr = SiteTracker("s", 128, lt.LaserConfig(tau=0.1, coeff_dtype=torch.float16))
    for _ in range(2):  # the reset, then the tracked path at the site's scale
        st, e = _run(tr, X)
        assert not st.is_raw and st.scale is not None and e <= 0.1
        assert bool(st.C.isfinite().all())


def test_bases_are_fresh_tensors_never_written_in_place():
    D = 128
    B = random_orthonormal(D, 4, seed=0)
    tr = SiteTracker("s", D, lt.LaserConfig(tau=0.05))
    kept = []
    for t in range(5):
        st, _ = _run(tr, _stream_matrix(800, _rotate(B, 0.02 * t, t), torch.ones(4), seed=t))
        kept.append((st.U, st.U.clone()))
    for U, snapshot in kept:
        assert torch.equal(U, snapshot)


@pytest.mark.parametrize("mode,power_iters", [("lagged", 2), ("refresh", 1)])
def test_modes_and_power_iters_meet_tau(mode, power_iters):
    D, N, k = 200, 2000, 6
    cfg = lt.LaserConfig(tau=0.05, max_rank=32, mode=mode, power_iters=power_iters)
    tr = SiteTracker("s", D, cfg)
    B = random_orthonormal(D, k, seed=1)
    for t in range(6):
        B = _rotate(B, 0.02, seed=t)
        _, e = _run(tr, _stream_matrix(N, B, torch.logspace(0, -1, k), seed=t, noise=0.001))
        assert e <= cfg.tau
    assert tr.resets <= 2


def test_small_tau_uses_measured_residual():
    D, N = 128, 1500
    sigma = torch.logspace(0, -3, 20)
    X = _stream_matrix(N, random_orthonormal(D, 20, seed=2), sigma, seed=0)
    cfg = lt.LaserConfig(tau=0.01, max_rank=64, coeff_dtype=torch.float32)
    tr = SiteTracker("s", D, cfg)
    for t in range(3):
        st, e = _run(tr, X * (1 + 0.01 * t))
        assert e <= cfg.tau


def test_sites_that_cannot_compress_back_off_resets():
    """A site whose tensors need more than max_rank stops paying a reset per tensor."""
    from models import GatedMLP

    import laser_triton as lt_

    laser = lt_.Laser(lt_.LaserConfig(tau=0.05, rank=8, max_rank=16, min_width=64))
    model = GatedMLP()
    for step in range(8):  # full-rank inputs: nothing fits in 16 columns at tau = 0.05
        x = torch.randn(2, 150, 160, generator=torch.Generator().manual_seed(step))
        with laser.compress():
            loss = model(x.requires_grad_()).square().mean()
        loss.backward()
    df = laser.report()
    total_tensors = int(sum(tr.tensors for tr in laser.trackers.values()))
    total_resets = int(sum(tr.resets for tr in laser.trackers.values()))
    assert total_resets <= total_tensors // 2, (total_resets, total_tensors)
    # tensors a site keeps raw in back-off are reported at that site, not in a rule row
    assert not any("backoff" in s for s in df.site)
    assert sum(tr.skipped for tr in laser.trackers.values()) > 0
    tracked = df[df.width > 0]
    assert (tracked.raw_tensors == tracked.tensors).all()
    assert (tracked.stored_bytes >= tracked.raw_bytes).all()  # raw, plus the basis at most
    # and every byte autograd saved is in exactly one row: the counter's total matches
    from laser_triton.trm.savecount import SavedTensorCounter

    counter = SavedTensorCounter()
    x = torch.randn(2, 150, 160, generator=torch.Generator().manual_seed(8))
    with counter.compress():
        model(x.requires_grad_()).square().mean().backward()
    with laser.compress():
        model(x).square().mean().backward()
    assert int(laser.report().raw_bytes.sum()) == counter.total_bytes()
