"""Peak bytes of LASER's transient workspaces (issue 15: a step's peak, not only what it holds).

Measured with `LiveBytes` (storages allocated during the call and alive, per storage), never
with the package's own reports."""

from __future__ import annotations

import pytest
import torch
from helpers import random_orthonormal, rel_err

from laser_triton import reference
from laser_triton.tools.livebytes import LiveBytes


@pytest.mark.parametrize("ranks", [[45] * 7, [45, 13, 38, 45, 7, 29, 45]])
def test_torch_orthonormalization_holds_at_most_three_fp64_copies_of_the_batch(ranks):
    """One network call's bases are orthonormalized as one fp64 (B, D, R) batch at the decision
    point, while the call's raw activations are still held: this workspace set the step's peak
    on `tiny` (perf/results/cpu/peak_breakdown.csv). Repaired in place, with each factor pass
    freeing its input, it stays within 3 fp64 copies of the padded batch; it was ~6 (a bool
    mask, where/div copies, a second padded completion copy, three factor outputs at once)."""
    g = torch.Generator().manual_seed(11)
    D = 131
    Ys = [torch.randn(D, r, generator=g) for r in ranks]
    Ys[1][:, 2] = 0.0  # a degenerate column: the completion path runs
    reference.orthonormalize_batched(Ys)  # completion directions cached outside the count
    with LiveBytes() as live:
        Qs, ok = reference.orthonormalize_batched(Ys)
    one_copy = len(ranks) * D * max(ranks) * 8
    assert live.peak <= 3.0 * one_copy, live.peak / one_copy
    assert bool(ok.all())
    for Y, Q, r in zip(Ys, Qs, ranks):  # still an orthonormal basis of each input's span
        assert Q.shape == (D, r)
        eye = torch.eye(r, dtype=torch.float64)
        assert (Q.double().T @ Q.double() - eye).abs().max() <= 1e-5
        Yd = Y.double()
        live_cols = Yd.norm(dim=0) > 0
        resid = Yd[:, live_cols] - Q.double() @ (Q.double().T @ Yd[:, live_cols])
        assert rel_err(resid + Yd[:, live_cols], Yd[:, live_cols]) <= 1e-6


def test_torch_compress_pass_of_bf16_never_widens_the_whole_input():
    """The torch compress pass widened a whole bf16 X to fp32 (and squared that copy): a
    transient of 4x X's bytes, which set the step's peak in resets on `paper_sudoku`. Rows are
    now widened a block at a time, so the pass's peak stays below one fp32 copy of X; the
    results still match an fp64 computation."""
    g = torch.Generator().manual_seed(12)
    N, D, r = 3001, 700, 37
    X = torch.randn(N, D, generator=g).to(torch.bfloat16)
    U = random_orthonormal(D, r, seed=120).float()
    with LiveBytes() as live:
        out = reference.compress_pass(X, U, True, torch.bfloat16)
    assert live.peak < N * D * 4, live.peak / (N * D * 4)
    Xd, Ud = X.double(), U.double()
    Cd = Xd @ Ud
    assert out.C.dtype == torch.bfloat16 and out.C.shape == (N, r)
    assert rel_err(out.C, Cd) <= 8e-3  # bf16 rounding of C
    assert rel_err(out.e_X, Xd.square().sum()) <= 1e-5
    assert rel_err(out.e_C, Cd.square().sum()) <= 1e-5
    assert rel_err(out.Y, Xd.T @ Cd) <= 1e-5
    assert rel_err(out.c_amax, Cd.abs().max()) <= 1e-5
    rel = (1 - Cd.square().sum(1) / Xd.square().sum(1)).clamp_min(0).max().sqrt()
    assert rel_err(out.row_err_max, rel) <= 1e-4


def test_torch_reconstruct_to_bf16_never_builds_the_whole_fp32_product():
    """Backward's rebuild C U^T into bf16 built the whole fp32 product first (twice the rebuild,
    plus C widened): 3x the output's bytes. Rows are now filled a block at a time, so the
    peak stays below twice the output; the values match fp64 to bf16 rounding."""
    g = torch.Generator().manual_seed(13)
    N, D, r = 3001, 700, 37
    C = torch.randn(N, r, generator=g).to(torch.bfloat16)
    U = random_orthonormal(D, r, seed=130).float()
    with LiveBytes() as live:
        X = reference.reconstruct(C, U, torch.bfloat16)
    out_bytes = N * D * 2
    assert live.peak < 2 * out_bytes, live.peak / out_bytes
    assert X.dtype == torch.bfloat16 and X.shape == (N, D)
    ref = C.double() @ U.double().T
    assert rel_err(X, ref) <= 4e-3
    assert torch.equal(X[:5], (C[:5].float() @ U.T).to(torch.bfloat16))  # rows as one block


def test_peak_trace_books_each_storage_to_its_allocator():
    """perf.peak_breakdown's tracer: its peak is LiveBytes' peak, and the bytes live at the peak
    are booked to the LASER function that allocated them (here the compress pass's C and Y)."""
    pytest.importorskip("pandas")
    from perf.peak_breakdown import PeakTrace

    g = torch.Generator().manual_seed(14)
    X = torch.randn(300, 64, generator=g)
    U, _ = torch.linalg.qr(torch.randn(64, 8, generator=g))
    with PeakTrace(None) as trace:
        out = reference.compress_pass(X, U, True, torch.float32)
    with LiveBytes() as live:
        out2 = reference.compress_pass(X, U, True, torch.float32)
    assert trace.peak == live.peak > 0
    by = trace.at_peak["by"]
    assert trace.at_peak["phase"] == "forward" and sum(by.values()) == trace.peak
    booked = sum(n for who, n in by.items() if who.startswith("reference._compress_block_out"))
    assert booked >= out.C.untyped_storage().nbytes() + out.Y.untyped_storage().nbytes()
    assert out2.C.shape == out.C.shape
