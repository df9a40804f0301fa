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
    nf = torch.zeros(1, 1, R_PAD, device=dev)
    _orth_factor_kernel[(1,)](parts, parts, parts[0], nf, meta, linv, scale, info, gs, rs, dg,
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
    per call whatever the mix of ranks (5, or 7 with a padded rank above 64, +1 to pack)."""
    from laser_triton import kernels

    Ys = [torch.zeros(512, r) for r in (8, 64, 128)]
    assert kernels.supports("orthonormalize", *Ys)
    assert not kernels.supports("orthonormalize", torch.zeros(512, 129))
    assert kernels.launch_count("orthonormalize", Ys[2]) == 7
    assert kernels.launch_count("orthonormalize", Ys[1]) == 5
    assert kernels.launch_count("orthonormalize", *Ys) == kernels.launch_count(
        "orthonormalize", Ys[2], Ys[0]) == 8


# ----------------------------------------------------------------------------- ok, decided in place

def _final_ok(Qs: list[torch.Tensor], gains: list[float], failed: list[int], R_PAD: int):
    """ok per site from the kernel that forms the final Q's Gram: the apply (dst = Q gain, its
    Gram summed by the last of 3 row-chunk programs) up to R_PAD 64, the Gram kernel with 16
    tiles at 128. `failed` marks a site's second factor as failed."""
    from laser_triton.kernels._common import new_buffer
    from laser_triton.kernels._orth_kernels import _orth_apply_kernel, _orth_gram_kernel

    f64, S = torch.float64, len(Qs)
    offs = [0]
    for Q in Qs:
        offs.append(offs[-1] + Q.numel())
    meta = torch.tensor([[o, Q.shape[0], Q.shape[1]] for o, Q in zip(offs, Qs)], device=DEV)
    src = torch.cat([Q.reshape(-1) for Q in Qs]).float().to(DEV)
    rows = 48
    n_chunk = -(-max(Q.shape[0] for Q in Qs) // rows)
    g_part = new_buffer((S, n_chunk, R_PAD, R_PAD), f64, DEV)
    info = torch.zeros(S, 2, dtype=torch.int32, device=DEV)
    info[:, 1] = torch.tensor(failed, dtype=torch.int32)
    ok = new_buffer((S,), torch.bool, DEV)
    counts = torch.zeros(S * 17, dtype=torch.int32, device=DEV)
    if R_PAD <= 64:
        linv = torch.stack([g * torch.eye(R_PAD, dtype=f64) for g in gains]).to(DEV)
        dst = new_buffer(src.shape, torch.float32, DEV)
        _orth_apply_kernel[(S, n_chunk)](src, src, meta, linv, linv, dst, g_part, counts, info,
                                         ok, rows, REPAIR=False, R_PAD=R_PAD, BLOCK_D=16,
                                         BLOCK_K=min(R_PAD, 32), WITH_GRAM=True, CHECK=True)
    else:
        src = torch.cat([(g * Q).reshape(-1) for g, Q in zip(gains, Qs)]).float().to(DEV)
        err = new_buffer((S, 16), f64, DEV)
        nf = new_buffer((S, n_chunk, R_PAD), torch.float32, DEV)
        _orth_gram_kernel[(S, n_chunk, 16)](src, src, meta, g_part, g_part, nf, counts, info, ok,
                                            err, rows, WITH_Z=False, R_PAD=R_PAD, GT=32,
                                            BLOCK_D=16, CHECK=True)
    assert not counts.any()  # every counter is reset for the next launch
    return ok.tolist()


@pytest.mark.parametrize("R_PAD", [32, 128])
def test_ok_is_decided_where_the_final_gram_is_summed(R_PAD):
    """ok = the factors succeeded and max |Q^T Q - I| <= 1e-4 over the leading r x r block,
    NaN not ok, decided per site by the last program summing the final Gram (no launch of its
    own): an orthonormal site passes, a 1.0001-scaled one (error 2e-4) fails, as do a failed
    factor and a NaN entry."""
    from helpers import random_orthonormal

    r0, r1 = (20, 9) if R_PAD == 32 else (100, 5)
    Qs = [random_orthonormal(130, r0, seed=1), random_orthonormal(70, r1, seed=2)]
    assert _final_ok(Qs, [1.0, 1.0], [0, 0], R_PAD) == [True, True]
    assert _final_ok(Qs, [1.0001, 1.0], [0, 0], R_PAD) == [False, True]
    assert _final_ok(Qs, [1.0, 1.0], [0, 1], R_PAD) == [True, False]
    Qs[1][33, 4] = float("nan")
    assert _final_ok(Qs, [1.0, 1.0], [0, 0], R_PAD) == [True, False]


def test_one_site_is_split_into_eight_row_chunks():
    """A single site's rows go to about 8 programs of the Gram and apply kernels (64 rows at
    D = 512, where 256-row chunks made two long programs); beyond 16 sites fewer chunks per
    site (about 128 programs in all: fewer partial Grams), ROWS_PER_CHUNK caps a chunk,
    chunks are multiples of 64 rows."""
    from laser_triton.kernels.orthonormalize import SPEC_GRAM, chunk_rows

    cfg = SPEC_GRAM.defaults
    assert cfg["ROWS_PER_CHUNK"] == 256
    assert chunk_rows(cfg, 512) == 64 and chunk_rows(cfg, 97) == 64
    assert chunk_rows(cfg, 1536) == 192 and chunk_rows(cfg, 3072) == 256
    assert chunk_rows(cfg, 512, sites=16) == 64 and chunk_rows(cfg, 512, sites=32) == 128
    assert chunk_rows(cfg, 512, sites=128) == 256
    assert chunk_rows({**cfg, "ROWS_PER_CHUNK": 32}, 70) == 32


def test_gram_tile_shrink_keeps_the_check_buffers_in_bounds(monkeypatch):
    """An out-of-resources fallback may halve GRAM_TILE after the buffers are allocated: the
    padded-rank-128 CHECK Gram then runs 4x the tiles, and each writes a per-tile error slot and
    takes a per-site ticket. Both buffers must hold the tiles of the launch that runs (the old
    sizing, from the store's tile, was written past on a GPU), and the result stays right."""
    import importlib

    from triton.runtime.errors import OutOfResources

    orth = importlib.import_module("laser_triton.kernels.orthonormalize")
    real_launch, real_kernel, launched = orth.launch, orth._orth_gram_kernel, []

    def failing_once(name, run, config, shrink=None):
        if name != "orth_gram":
            return real_launch(name, run, config, shrink)

        def run_once_the_tile_shrank(cfg):
            if cfg["GRAM_TILE"] == config["GRAM_TILE"]:
                raise OutOfResources(300_000, 232_448, "shared memory")
            return run(cfg)
        return real_launch(name, run_once_the_tile_shrank, config, shrink)

    class Spy:
        def __getitem__(self, grid):
            def call(*args, **kwargs):
                S, n_tiles = grid[0], grid[2]
                counts, err = args[6], args[9]
                launched.append((n_tiles, kwargs["CHECK"]))
                assert err.numel() >= S * n_tiles and counts.numel() >= S * (n_tiles + 1)
                return real_kernel[grid](*args, **kwargs)
            return call

    monkeypatch.setattr(orth, "launch", failing_once)
    monkeypatch.setattr(orth, "_orth_gram_kernel", Spy())
    Y = conditioned(150, 100, 1e3, seed=5)
    Q, ok = orthonormalize(Y)
    assert bool(ok) and orth_err(Q) <= 1e-5 and span_residual(Q, Y) <= 1e-5
    check_tiles = [n for n, check in launched if check]
    assert check_tiles and min(check_tiles) > 1  # the shrunk tile ran the checked Gram
