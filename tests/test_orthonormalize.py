"""orthonormalize kernels (single and batched) and the completion directions they share with
the torch reference (I3; docs/design.md §6.2)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from kernel_checks import KERNEL_MARKS, conditioned, orth_err, span_residual

pytest.importorskip("triton")
from laser_triton.kernels import orthonormalize, orthonormalize_batched  # noqa: E402

from laser_triton import reference  # noqa: E402

pytestmark = KERNEL_MARKS


@pytest.mark.parametrize("D,r,kappa", [(96, 5, 1.0), (520, 33, 1e4), (130, 16, 1e8)])
def test_orthonormalize_conditioning(D, r, kappa):
    Y = conditioned(D, r, kappa, seed=r)
    Q, ok = orthonormalize(Y)
    assert Q.dtype == torch.float32 and Q.shape == (D, r) and ok.dtype == torch.bool
    assert bool(ok) and orth_err(Q) <= 1e-5 and span_residual(Q, Y) <= 1e-5
    Qr, okr = reference.orthonormalize(Y)
    assert bool(okr)
    assert_close(Q, Qr, atol=1e-5, msg="same R > 0 QR, same Q:")


@pytest.mark.slow
@pytest.mark.parametrize("kappa", [1.0, 1e2, 1e4, 1e6, 1e7, 1e8])
@pytest.mark.parametrize("D,r", [(64, 1), (64, 16), (96, 5), (520, 33), (520, 64), (200, 128)])
def test_orthonormalize_conditioning_grid(D, r, kappa):
    Y = conditioned(D, r, kappa, seed=D + r)
    Q, ok = orthonormalize(Y)
    assert bool(ok) and orth_err(Q) <= 1e-5 and span_residual(Q, Y) <= 1e-5


def test_orthonormalize_rank_deficient_zero_and_nonfinite_columns():
    Y = conditioned(130, 12, 10.0, seed=1)
    Y[:, 9] = 2.0 * Y[:, 0] - Y[:, 3]  # exactly dependent
    Y[:, 10] = 0.0  # dead
    Y[5, 11] = float("nan")  # non-finite
    Q, ok = orthonormalize(Y)
    assert bool(ok) and torch.isfinite(Q).all() and orth_err(Q) <= 1e-5
    live = Y[:, :10]
    assert span_residual(Q, live) <= 1e-5  # the span of the good columns is kept
    Qr, okr = reference.orthonormalize(Y)  # completed with the same fixed directions
    assert bool(okr)
    assert_close(Q, Qr, atol=1e-4)


def test_orthonormalize_batched_mixed_shapes():
    Ys = [conditioned(96, 5, 10.0, 1), conditioned(520, 33, 1e5, 2),
          conditioned(64, 16, 1e3, 3).to(torch.bfloat16), conditioned(200, 1, 1.0, 4)]
    Qs, ok = orthonormalize_batched(Ys)
    assert ok.shape == (4,) and bool(ok.all())
    for Y, Q in zip(Ys, Qs):
        assert Q.shape == Y.shape and orth_err(Q) <= 1e-5
        Qr, _ = reference.orthonormalize(Y)
        assert_close(Q, Qr, atol=1e-5)
    Qs, ok = orthonormalize_batched([])
    assert Qs == [] and ok.numel() == 0


def test_completion_directions_are_one_shared_definition():
    """Kernels and reference complete degenerate columns with the same directions: one
    definition (laser_triton.numerics), unit columns, independent of the global RNG."""
    from laser_triton.kernels import completion_matrix

    from laser_triton import numerics

    assert completion_matrix is numerics.completion_matrix is reference.completion_matrix
    torch.manual_seed(99)
    Z = completion_matrix(520, 33, torch.device("cpu"))
    torch.manual_seed(7)
    numerics._COMPLETION_CACHE.clear()
    assert torch.equal(Z, completion_matrix(520, 33, torch.device("cpu")))
    assert Z.dtype == torch.float64 and Z.shape == (520, 33)
    assert_close(Z.norm(dim=0), torch.ones(33, dtype=torch.float64), atol=1e-12)
