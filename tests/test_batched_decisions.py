"""Decisions of a whole batch from the compress passes' scalars (issue 13): the host error
equals the per-tensor device estimate, shrink checks are planned on the device with the host
rule, and a Laser still shrinks and meets tau through what unpack returns."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_orthonormal, rel_err

import laser_triton as lt
from laser_triton import reference
from laser_triton.distributed import LocalSync
from laser_triton.tracker import (
    NO_BASIS,
    Draft,
    SiteTracker,
    batch_error,
    error_consts,
    host_error,
    plan_shrinks,
    relative_error,
)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_host_error_equals_the_device_estimate(x_dtype):
    cfg = lt.LaserConfig(tau=0.05)
    g = torch.Generator().manual_seed(3)
    for k, r in enumerate((3, 17, 40)):
        X = (torch.randn(211, 70, generator=g) @ torch.diag(torch.logspace(0, -3, 70))).to(x_dtype)
        U = random_orthonormal(70, r, seed=k).float()
        for scale in (None, 2.0 ** -20):
            Xs = X if scale is None else X * scale
            out = reference.compress_pass(Xs, U, True, cfg.coeff_dtype)
            dev = relative_error(out, cfg, Xs, U, x_dtype, scale)
            consts = error_consts(cfg, *X.shape, r, x_dtype, scale)
            host = host_error(out.stats.tolist(), consts, False)
            assert host == pytest.approx(float(dev), rel=1e-5, abs=1e-7)
    # Edge cases: zero X, NaN/inf energy, overflowing coefficients, no basis, measured error.
    rows = [[0.0, 0.0, 0.0, 0.0], [math.nan, 1.0, 0.0, 1.0], [math.inf, 1.0, 0.0, 1.0],
            [4.0, 3.0, 0.1, 1e39], [4.0, 3.0, 0.1, math.nan], [4.0, 3.9, 0.1, 2.0],
            [4.0, 4.2, 0.1, 2.0], [4.0, 0.01, 0.1, 2.0]]
    ok = error_consts(cfg, 100, 70, 8, x_dtype, None)
    consts = [ok] * len(rows) + [NO_BASIS]
    rows.append([4.0, 3.9, 0.1, 2.0])
    measured = [False] * len(rows)
    rows.append([4.0, 0.03, 0.1, 2.0])  # stats[1] holds a measured error
    consts.append(ok)
    measured.append(True)
    host = [host_error(s, c, m) for s, c, m in zip(rows, consts, measured)]
    dev = batch_error(torch.tensor(rows, dtype=torch.float64),
                      torch.tensor(consts, dtype=torch.float64), torch.tensor(measured)).tolist()
    assert host[0] == host[1] == host[2] == host[3] == host[4] == host[8] == math.inf
    assert host[9] == pytest.approx(0.03)
    for h, d in zip(host, dev):
        assert (h == d == math.inf) or h == pytest.approx(d, rel=1e-5, abs=1e-7)


def test_shrink_plan_on_the_device_matches_the_host_rule():
    cfg = lt.LaserConfig(tau=0.05, min_rank=2)
    checks, expect = [], []
    for i, (r, decay) in enumerate([(12, 0.5), (12, 0.9), (7, 0.2), (12, 1.0), (7, 0.6)]):
        theta = decay ** torch.arange(r, dtype=torch.float64)
        V = random_orthonormal(r, r, seed=i)
        G = (V * theta) @ V.t()
        e_X = float(theta.sum()) * (1.0 + 1e-3 * i)
        tr = SiteTracker(f"s{i}", 64, cfg)
        d = Draft(torch.zeros(3, 64), None, None, torch.tensor([e_X, 0.0, 0.0, 0.0]),
                  NO_BASIS, shrink_gram=G.float())
        checks.append((tr, d))
        host = SiteTracker(f"h{i}", 64, cfg)
        host._plan_shrink(G.float(), e_X, torch.device("cpu"), torch.float32)
        expect.append(host.pending_shrink)
    Ws, r_new, slot = plan_shrinks(checks, LocalSync())
    got = r_new.tolist()
    for i, (W, want) in enumerate(zip(Ws, expect)):
        r = got[slot[i]]
        if want is None:
            assert r == W.shape[1], i
        else:
            assert r == want.shape[1] < W.shape[1], i
            # Same Ritz subspace (eigenvectors up to sign): equal projectors.
            P, Q = W[:, :r].double(), want.double()
            assert torch.allclose(P @ P.t(), Q @ Q.t(), atol=1e-5), i
    assert any(w is not None for w in expect) and any(w is None for w in expect)


def test_laser_shrinks_in_its_batches_and_meets_tau_through_unpack():
    """A site's spectrum concentrates: the batched shrink checks drop columns, and every
    unpacked tensor stays within tau of the saved one."""
    torch.manual_seed(0)
    D, N, tau = 160, 600, 0.05
    B = random_orthonormal(D, 12, seed=4)
    laser = lt.Laser(lt.LaserConfig(tau=tau, max_rank=32, rank=8, min_width=64, shrink_every=2))
    g = torch.Generator().manual_seed(5)
    errs = []
    for step in range(8):
        sigma = torch.ones(12) if step == 0 else torch.tensor([1.0] * 3 + [1e-4] * 9)
        A = torch.randn(N, 12, generator=g, dtype=torch.float64)
        X = ((A * sigma.double()) @ B.t()).float().requires_grad_()
        w = torch.ones(1, requires_grad=True)
        with laser.compress():
            x = X * 1.0
            y = x * w
        errs.append(rel_err(y.grad_fn._saved_self.detach(), x.detach()))
    tr = next(iter(laser.trackers.values()))
    assert max(errs) <= tau
    assert tr.shrinks >= 1 and tr.rank <= 4
    assert isinstance(tr.max_err, float) and tr.max_err <= tau


def _orth_launches(Ys):
    from laser_triton import launches

    reference.orthonormalize_batched(Ys)  # completion directions are built once per shape
    with launches.LaunchCounter() as c:
        out = launches.counted("decide")(reference.orthonormalize_batched)(Ys)
    return c.launches["decide"], out


def test_torch_orthonormalization_is_constant_launch_for_any_mix_of_ranks():
    """Bases of one width are one batch whatever their ranks (zero-padded), and each comes out
    as it would alone, degenerate and non-finite columns included."""
    g = torch.Generator().manual_seed(11)
    mixes = [[8, 16, 5], [3, 30, 40, 7, 40], [1, 2]]
    counts = []
    for ranks in mixes:
        Ys = [torch.randn(130, r, generator=g) for r in ranks]
        Ys[0][:, 0] = 0.0  # a dead column: completed
        if ranks[1] > 2:
            Ys[1][:, 2] = Ys[1][:, 1]  # a dependent column: completed
        Ys[-1][4, -1] = float("nan")
        n, (Qs, ok) = _orth_launches(Ys)
        counts.append(n)
        assert ok.shape == (len(ranks),)
        for Y, Q, o in zip(Ys, Qs, ok.tolist()):
            Q1, ok1 = reference.orthonormalize(Y)
            assert Q.shape == Y.shape and o == bool(ok1)
            assert torch.allclose(Q, Q1, atol=1e-6), (ranks, Y.shape)
    assert len(set(counts)) == 1, counts
    # Two widths: two batches, each at most the cost of one padded batch, whatever the ranks.
    n2, _ = _orth_launches([torch.randn(130, 4), torch.randn(90, 6), torch.randn(130, 9)])
    n3, _ = _orth_launches([torch.randn(130, 7), torch.randn(90, 2), torch.randn(90, 3),
                            torch.randn(130, 1)] * 5)
    assert n2 <= 2 * counts[0] + 4 and n3 <= 2 * counts[0] + 4  # + merging the flags


class _OneRankSync(LocalSync):
    """A one-rank 'distributed' sync: takes the device-decision path of sync_basis."""

    active = True


def test_device_decisions_of_sync_basis_match_the_host_decisions():
    """Under sync_basis the batch's flags are decided on the device (to be all-reduced); on one
    rank they must equal the host's decisions: same resets, ranks, shrinks and bytes."""
    from models import GatedMLP, low_rank_tokens

    runs = []
    for active in (False, True):
        torch.manual_seed(0)
        model = GatedMLP()
        # decision_lag 0: under sync_basis only the count of pending batches says when they
        # finalize, so with a lag the two runs would decide at different times.
        laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=48, min_width=64, shrink_every=2,
                                        decision_lag=0))
        if active:
            laser._sync = _OneRankSync()
        for step in range(4):
            x = low_rank_tokens(2, 150, 160, rank=6, seed=step % 2).requires_grad_()
            with laser.compress():
                h = x * 1.0
                for role in ("z", "z", "y"):
                    with laser.role(role):
                        h = model(h)
            h.square().mean().backward()
        rep = laser.report()
        runs.append(rep[["site", "rank", "resets", "raw_fallbacks", "shrinks", "stored_bytes"]])
    assert runs[0].equals(runs[1])
    assert int(runs[0].resets.sum()) >= 1
