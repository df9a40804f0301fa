"""Peak bytes of LASER's transient workspaces (issue 15: a step's peak, not only what it holds).

Measured with `LiveBytes` (storages allocated during the call and alive, per storage), never
with the package's own reports."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

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
