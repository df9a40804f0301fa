"""orthonormalize kernels (single and batched) and the completion directions they share with
the torch reference (I3; docs/design.md §6.2)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from kernel_checks import DEV, KERNEL_MARKS, conditioned, orth_err, span_residual

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


# ----------------------------------------------------------------------------- blocked factor


def _factor_plain(G: torch.Tensor, r: int):
    """Run the factor kernel's "plain" step on one fp64 Gram (r x r), buffers NaN-poisoned.
    Returns (L^{-1} (R_PAD, R_PAD), diag(R) (r,), failed pivots)."""
    from laser_triton.kernels._cholesky import PANEL, _orth_factor_kernel
    from laser_triton.kernels._common import new_buffer, pow2

    R_PAD, f64, dev = pow2(r), torch.float64, G.device
    parts = torch.zeros(1, 1, R_PAD, R_PAD, dtype=f64, device=dev)
    parts[0, 0, :r, :r] = G
    meta = torch.tensor([[0, 4 * r, r]], device=dev)
    linv, gs, rs = (new_buffer((1, R_PAD, R_PAD), f64, dev) for _ in range(3))
    dg, scale = new_buffer((1, R_PAD), f64, dev), new_buffer((1, R_PAD), f64, dev)
    info = torch.zeros(1, 2, dtype=torch.int32, device=dev)
    ok = new_buffer((1,), torch.bool, dev)
    nf = torch.zeros(1, 1, R_PAD, device=dev)
    _orth_factor_kernel[(1,)](parts, parts, parts[0], nf, meta, linv, scale, info, ok, gs, rs, dg,
                              1, MODE="plain", R_PAD=R_PAD, PB=PANEL, KC=16, CB=16, num_warps=1)
    return linv[0], dg[0, :r], int(info[0, 1])


@pytest.mark.parametrize("r", [7, 40, 100])
def test_blocked_factor_matches_fp64_cholesky(r):
    """The panel-blocked factor (16-row panels, 4-column pivot blocks; r not a multiple of
    either) gives L^{-1} = R^{-T} and diag(R) of the fp64 Cholesky of the shifted Gram, the
    padding decoupled from the leading r x r block, every element written (finite)."""
    g = torch.Generator().manual_seed(r)
    A = torch.randn(3 * r, r, generator=g, dtype=torch.float64)
    A *= torch.logspace(0, -3, r, dtype=torch.float64)  # kappa(G) = 1e6
    G = (A.t() @ A).to(DEV)
    linv, diag, failed = _factor_plain(G, r)
    shifted = G + torch.finfo(torch.float64).eps * r * G.trace() * torch.eye(r, device=G.device,
                                                                             dtype=G.dtype)
    L = torch.linalg.cholesky(shifted)
    Li = torch.linalg.inv(L)
    assert failed == 0 and torch.isfinite(linv).all()
    assert_close(linv[:r, :r], Li, atol=1e-10 * float(Li.abs().max()))
    assert_close(diag, L.diagonal(), atol=1e-12 * float(L.abs().max()))
    assert not linv[r:, :r].any() and not linv[:r, r:].any()  # padding stays apart


def test_blocked_factor_counts_failed_pivots_without_nan():
    """A pivot <= 0 after the shift (an indefinite direction: what a numerically dependent
    column leaves) counts as failed and gets a zero row: never NaN. An exactly zero column
    is lifted by the shift eps * r * trace, as in the reference."""
    r = 37
    G = torch.eye(r, dtype=torch.float64, device=DEV)
    G[20, 20] = G[35, 35] = -1.0  # in the 2nd and 3rd panels
    G[33, 33] = 0.0
    linv, diag, failed = _factor_plain(G, r)
    assert failed == 2 and torch.isfinite(linv).all() and torch.isfinite(diag).all()
    assert float(diag[20]) == 0.0 and float(linv[20].abs().max()) == 0.0


def test_orthonormalize_rank_above_64_with_repairs():
    """Padded rank 128 (the Gram kernel runs on the applied bases): kappa 1e8, a dependent
    column in a later panel, a dead one, and a mixed batch with a small site."""
    Y = conditioned(110, 72, 1e8, seed=72)
    Y[:, 50] = Y[:, 3] - 0.5 * Y[:, 40]  # exactly dependent (4th panel)
    Y[:, 70] = 0.0  # dead
    Y2 = conditioned(96, 5, 10.0, seed=5)
    Qs, ok = orthonormalize_batched([Y, Y2])
    assert ok.shape == (2,) and bool(ok.all())
    for Yi, Q in zip((Y, Y2), Qs):
        assert torch.isfinite(Q).all() and orth_err(Q) <= 1e-5
        Qr, okr = reference.orthonormalize(Yi)
        assert bool(okr)
        assert_close(Q, Qr, atol=1e-4)
    live = torch.cat([Y[:, :50], Y[:, 51:70]], dim=1)
    assert span_residual(Qs[0], live) <= 1e-5


def test_auto_dispatch_covers_ranks_up_to_128():
    """`auto` sends every TRM rank (<= 128) to the kernels, in a constant number of launches
    per call whatever the mix of ranks (6, or 8 with a padded rank above 64, +1 to pack)."""
    from laser_triton import kernels

    Ys = [torch.zeros(512, r) for r in (8, 64, 128)]
    assert kernels.supports("orthonormalize", *Ys)
    assert not kernels.supports("orthonormalize", torch.zeros(512, 129))
    assert kernels.launch_count("orthonormalize", Ys[2]) == 8
    assert kernels.launch_count("orthonormalize", Ys[1]) == 6
    assert kernels.launch_count("orthonormalize", *Ys) == kernels.launch_count(
        "orthonormalize", Ys[2], Ys[0]) == 9
