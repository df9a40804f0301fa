"""The pure-torch twins against float64 computations (docs/design.md §6, I3's reference side)."""

import pytest
import torch
from helpers import matrix_with_spectrum, random_orthonormal

from laser_triton import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,r", [(1, 64, 1), (37, 96, 5), (1000, 520, 33)])
def test_compress_pass_matches_fp64(N, D, r, dtype):
    X = torch.randn(N, D).to(dtype)
    U = random_orthonormal(D, r, seed=N + D).float()
    out = reference.compress_pass(X, U, need_y=True, coeff_dtype=torch.float32)
    C, e_X, e_C, Y = out
    Xd, Ud = X.double(), U.double()
    Cd = Xd @ Ud
    tol = 1e-5
    assert torch.allclose(C.double(), Cd, rtol=tol, atol=tol * Cd.abs().max())
    assert abs(float(e_X) - float(Xd.square().sum())) <= tol * float(Xd.square().sum())
    assert abs(float(e_C) - float(Cd.square().sum())) <= tol * float(Xd.square().sum())
    Yd = Xd.t() @ Cd
    assert torch.allclose(Y.double(), Yd, rtol=1e-4, atol=1e-4 * Yd.abs().max())
    rows = (1 - Cd.square().sum(1) / Xd.square().sum(1)).clamp_min(0).sqrt()
    assert float(out.row_err_max) == pytest.approx(float(rows.max()), abs=1e-3)
    assert float(out.c_amax) == pytest.approx(float(Cd.abs().max()), rel=1e-5)


def test_compress_pass_coeff_dtype_and_no_y():
    X = torch.randn(50, 128)
    U = random_orthonormal(128, 8).float()
    C, e_X, e_C, Y = reference.compress_pass(X, U, need_y=False, coeff_dtype=torch.bfloat16)
    assert C.dtype == torch.bfloat16 and Y is None
    assert e_X.dtype == torch.float32 and e_C.dtype == torch.float32


def test_reconstruct_matches_fp64():
    C = torch.randn(77, 9)
    U = random_orthonormal(130, 9).float()
    ref = C.double() @ U.double().t()
    for dtype, tol in [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)]:
        out = reference.reconstruct(C, U, dtype)
        assert out.dtype == dtype and out.shape == (77, 130)
        assert float((out.double() - ref).norm() / ref.norm()) < tol


def _orth_err(Q):
    Qd = Q.double()
    return float((Qd.t() @ Qd - torch.eye(Q.shape[1], dtype=torch.float64)).abs().max())


def _span_residual(Q, Y):
    Yd, Qd = Y.double(), Q.double()
    return float((Yd - Qd @ (Qd.t() @ Yd)).norm() / Yd.norm())


@pytest.mark.parametrize("kappa", [1.0, 1e3, 1e6, 1e8])
def test_orthonormalize_ill_conditioned(kappa):
    D, r = 300, 24
    sigma = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), r, dtype=torch.float64)
    Y = matrix_with_spectrum(D, r, sigma, seed=3).float()  # D x r with condition number kappa
    Q, ok = reference.orthonormalize(Y)
    assert bool(ok) and Q.dtype == torch.float32 and Q.shape == (D, r)
    assert _orth_err(Q) <= 1e-5
    assert _span_residual(Q, Y) <= 1e-5


def test_orthonormalize_power_iteration_columns():
    # Y = X^T X U: column norms ~ sigma_j^2 spanning 1e8; scaling must rescue this.
    D, r = 256, 16
    V = random_orthonormal(D, r, seed=5)
    sig2 = torch.logspace(4, -4, r, dtype=torch.float64)
    Y = (V * sig2).float()
    Q, ok = reference.orthonormalize(Y)
    assert bool(ok) and _orth_err(Q) <= 1e-5 and _span_residual(Q, Y) <= 1e-5


def test_orthonormalize_rank_deficient_and_zero_columns():
    D, r = 200, 12
    B = torch.randn(D, 5)
    Y = B @ torch.randn(5, r)  # exact rank 5
    Y[:, 7] = 0.0
    Q, ok = reference.orthonormalize(Y)
    assert torch.isfinite(Q).all() and bool(ok)
    assert _orth_err(Q) <= 1e-5
    assert _span_residual(Q, Y) <= 1e-5  # span of Y preserved, the rest completed


def test_orthonormalize_nonfinite_column_is_replaced_not_propagated():
    Y = torch.randn(150, 6)
    Y[3, 2] = float("nan")
    Q, ok = reference.orthonormalize(Y)
    assert torch.isfinite(Q).all() and _orth_err(Q) <= 1e-5


def test_orthonormalize_batched_mixed_shapes_matches_single():
    Ys = [torch.randn(128, 8), torch.randn(200, 16), torch.randn(128, 8), torch.randn(64, 64)]
    Qs, ok = reference.orthonormalize_batched(Ys)
    assert ok.shape == (4,) and bool(ok.all())
    for Y, Q in zip(Ys, Qs):
        Q1, _ = reference.orthonormalize(Y)
        assert torch.allclose(Q, Q1, atol=1e-5)


def test_range_finder_ritz_and_rank_selection_on_known_spectrum():
    N, D = 2000, 256
    sigma = torch.tensor([10.0, 8, 6, 5, 4, 3, 2, 1, 0.5, 0.25], dtype=torch.float64)
    X = matrix_with_spectrum(N, D, sigma, seed=7).float()
    e_X = float(X.double().square().sum())
    Q, Y = reference.range_finder(X, 16, power_iters=2, generator=torch.Generator().manual_seed(0))
    theta, V = reference.ritz(Q, Y)
    assert torch.allclose(theta[:10], sigma.square(), rtol=1e-4)
    # energy beyond rank j is sum_{i>j} sigma_i^2: the smallest j with tail <= target^2 e_X
    tail = sigma.square().flip(0).cumsum(0).flip(0)  # tail[j] = sum_{i>=j}
    for target in (0.3, 0.1, 0.05, 0.02):
        expected = next(j for j in range(11) if j == 10 or float(tail[j]) <= target**2 * e_X)
        assert reference.select_rank(theta, e_X, target) == expected
    # Ritz energies are exact: ||X V_j||^2 == theta[:j].sum()
    j = 6
    assert float((X.double() @ V[:, :j].double()).square().sum()) == pytest.approx(
        float(theta[:j].sum()), rel=1e-5)
    assert reference.select_rank(theta[:3], e_X, 0.01) is None
