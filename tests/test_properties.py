"""Property-based checks over shapes, dtypes and ranks (hypothesis, capped examples)."""

import math

import torch
from helpers import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import laser_triton as lt
from laser_triton import ops
from laser_triton.tracker import SiteTracker

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(N=st.integers(1, 300), D=st.integers(1, 200), r_frac=st.floats(0.01, 1.0),
       dtype=DTYPES, seed=st.integers(0, 2**16))
def test_compress_reconstruct_consistency(N, D, r_frac, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = max(1, min(D, int(round(r_frac * D))))
    X = torch.randn(N, D, generator=g).to(dtype)
    U, ok = ops.orthonormalize(torch.randn(D, r, generator=g))
    assert bool(ok)
    assert float((U.t() @ U - torch.eye(r)).abs().max()) <= 1e-5
    C, e_X, e_C, Y = ops.compress_pass(X, U, True, torch.float32)
    assert C.shape == (N, r) and Y.shape == (D, r)
    # Pythagoras: ||X||^2 = ||C||^2 + ||X - C U^T||^2 for orthonormal U
    X_hat = ops.reconstruct(C, U, torch.float32)
    resid = float((X.double() - X_hat.double()).square().sum())
    assert math.isclose(float(e_X), float(e_C) + resid, rel_tol=1e-4, abs_tol=1e-6)
    assert float(e_C) <= float(e_X) * (1 + 1e-5)


@SETTINGS
@given(N=st.integers(130, 400), D=st.integers(128, 260), k=st.integers(1, 12),
       tau=st.sampled_from([0.03, 0.05, 0.1, 0.2]), dtype=DTYPES,
       noise=st.sampled_from([0.0, 1e-3, 1e-1]), seed=st.integers(0, 2**16))
def test_tracker_never_stores_above_tau(N, D, k, tau, dtype, noise, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.linalg.qr(torch.randn(D, k, generator=g))[0]
    tr = SiteTracker("p", D, lt.LaserConfig(tau=tau, max_rank=32, min_width=1))
    for _ in range(3):
        A = torch.randn(N, k, generator=g) * torch.logspace(0, -1, k)
        X = (A @ B.t() + noise * torch.randn(N, D, generator=g) / D**0.5).to(dtype)
        d = tr.draft(X)
        passed = bool(d.err <= tau)
        tr.apply_pending()
        st_ = tr.finalize(d, passed)
        X_hat = X if st_.is_raw else ops.reconstruct(st_.C, st_.U, X.dtype)
        assert rel_err(X_hat, X) <= tau
        assert tr.U is None or torch.isfinite(tr.U).all()
