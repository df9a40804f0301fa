"""The D x r products of a decision batch (shrink grams, partial-view checks) are computed in
one set of batched ops per (width, rank), not per tensor (issue 13)."""

from __future__ import annotations

import math

import torch
from helpers import UnpackTap, rel_err
from models import GatedMLP, low_rank_tokens

import laser_triton as lt
from laser_triton import launches, magnitude
from laser_triton.partial_views import batch_products, column_view_parts
from laser_triton.storage import Entry, Packed, dense_region
from laser_triton.tracker import SiteTracker


def _entry(tr: SiteTracker, h: torch.Tensor) -> Entry:
    g, u = h.chunk(2, dim=-1)
    d = tr.draft(h[0])
    e = Entry(dense_region(g), h.dtype, g, tr.name, tr, d)
    e.views = [Packed(e, g), Packed(e, u)]
    return e


def test_batched_products_equal_the_per_entry_ones():
    """Three entries at two (width, rank) shapes, one with a shrink check due: the batched
    view parts match `column_view_parts` of each entry, and the due draft's gram is U^T Y."""
    cfg = lt.LaserConfig(tau=0.05, max_rank=48, rank=8, shrink_every=1)
    trackers = []
    for name, D, seed in [("a", 320, 1), ("b", 320, 2), ("c", 224, 3)]:
        tr = SiteTracker(name, D, cfg)
        tr.batched = True
        tr.reset(low_rank_tokens(1, 301, D, rank=10, seed=seed, noise=0.02)[0])
        trackers.append(tr)
    # a and b share a rank only if their resets chose the same one: force it
    trackers[1].U = torch.linalg.qr(torch.randn(320, trackers[0].rank, dtype=torch.float64)
                                    )[0].float()
    batch = [_entry(tr, low_rank_tokens(1, 257, tr.width, rank=10, seed=9 + i, noise=0.02))
             for i, tr in enumerate(trackers)]
    assert all(e.draft.shrink_due and e.draft.shrink_gram is None for e in batch)
    parts = batch_products(batch, [0, 1, 2])
    assert sorted(parts) == [0, 1, 2]
    for i, e in enumerate(batch):
        d = e.draft
        G = d.U.double().t() @ d.Y.double()
        assert rel_err(d.shrink_gram, G) < 1e-6
        norms, c = column_view_parts(e)  # per entry (reuses the gram just set)
        bn, bc = parts[i]
        assert torch.allclose(bn, norms, rtol=1e-12)
        assert torch.allclose(bc.double(), c.double(), rtol=1e-5, atol=1e-5 * float(norms.max()) ** 2)
        # and what they bound: ||X_S - X U U_S^T||^2 = ||X_S||^2 + c_S, checked in fp64
        X, U = d.X.double(), d.U.double()
        for S, (n, cs) in enumerate(zip(bn.tolist(), bc.tolist())):
            w = X.shape[1] // 2
            R = X[:, S * w:(S + 1) * w] - X @ U @ U[S * w:(S + 1) * w].t()
            assert abs(float(R.square().sum()) - (n * n + cs)) <= 1e-5 * n * n


def _counted_gated_step(laser: lt.Laser, layers: list, monkeypatch) -> tuple:
    """Three warm-up steps of `layers` (summed, on one low-rank input) under `laser`, then a
    fourth counted by a LaunchCounter with its unpacks tapped; returns (tap, counter)."""

    def step(seed: int) -> torch.Tensor:
        x = low_rank_tokens(2, 150, 160, rank=6, seed=10 + seed).requires_grad_()
        with laser.compress():
            with laser.role("z"):
                h = sum(m(x) for m in layers)
            return h.square().mean()

    for s in range(3):
        step(s).backward()
    tap = UnpackTap(laser, monkeypatch)
    with launches.LaunchCounter() as c:
        loss = step(5)
    loss.backward()
    return tap, c


def test_view_checks_and_shrink_grams_launch_per_group_not_per_tensor(monkeypatch):
    """Four gate_up layers on the same input in one network call, a shrink check at every
    tensor: the batch's products are one baddbmm per (width, rank) group with views, no
    per-tensor mm/addmm in the pack hook or the decision; each half still meets tau as
    unpacked."""
    laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=48, min_width=64, shrink_every=1))
    torch.manual_seed(0)
    tap, c = _counted_gated_step(laser, [GatedMLP() for _ in range(4)], monkeypatch)
    views = [e for e in {id(p.entry): p.entry for _, p, _ in tap.records
                         if isinstance(p, Packed) and p.size[-1] * 2 == p.entry.region.width
                         }.values()]
    assert len(views) >= 4 and c.events["drafted"] > c.events["reset"]
    assert c.aten[("pack", "mm")] == 0, c.aten  # shrink grams: batched in the decision
    assert c.aten[("decide", "addmm")] == 0, c.aten
    norms = c.aten[("decide", "linalg_vector_norm")]
    assert 0 < c.aten[("decide", "baddbmm")] <= norms  # per group, at most one per entry
    assert c.aten[("decide", "baddbmm")] < len(views)
    # The README's guarantee: outside resets only the shrink eigensolve reads the device.
    assert {op for sec, op in c.sync_ops if sec != launches.RESET} <= {"_linalg_eigh"}
    assert c.sync_ops[("decide", "_linalg_eigh")] >= 1  # (shrink_every=1: checks were due)
    assert all(e <= 0.05 for e, _ in tap.errors())


def test_view_target_scale_is_booked_with_the_reset_it_prepares():
    """Only a failed decision reads the views' energy shares (a host read per view), to aim
    its reset lower: the counter books that with the reset (the slow path), not the batch."""
    from laser_triton.partial_views import view_target_scale

    tr = SiteTracker("s", 320, lt.LaserConfig(tau=0.05, max_rank=48, rank=8))
    tr.reset(low_rank_tokens(1, 301, 320, rank=10, seed=1, noise=0.02)[0])
    e = _entry(tr, low_rank_tokens(1, 257, 320, rank=10, seed=2, noise=0.02))

    @launches.counted("decide")
    def decide() -> float:
        return view_target_scale(e)

    with launches.LaunchCounter() as c:
        s = decide()
    assert 0 < s <= 1
    assert c.launches["decide"] == 0 and c.syncs["decide"] == 0
    assert c.launches[launches.RESET] > 0 and c.syncs[launches.RESET] >= 3


def test_a_failed_decision_books_its_host_reads_with_its_reset():
    """finalize(passed=False) resets, then folds the reset's device errors into the site's
    host maxima: those reads belong to the slow path, so the decision itself reads nothing."""
    tr = SiteTracker("s", 320, lt.LaserConfig(tau=0.05, max_rank=48, rank=8))
    tr.reset(low_rank_tokens(1, 301, 320, rank=10, seed=1, noise=0.02)[0])
    X = low_rank_tokens(1, 257, 320, rank=10, seed=2, noise=0.02)[0]
    d = tr.draft(X)

    @launches.counted("decide")
    def decide():
        return tr.finalize(d, False)

    with launches.LaunchCounter() as c:
        st = decide()
    assert c.syncs["decide"] == 0 and c.launches["decide"] == 0, c.sync_ops
    assert c.syncs[launches.RESET] > 0
    assert tr.max_err is not None and tr.max_err <= 0.05
    X_hat = st.raw if st.is_raw else magnitude.rebuild(st.C, st.U, X.dtype, st.scale)
    assert rel_err(X_hat, X) <= 0.05  # what unpack would rebuild, against X


def test_device_view_errors_equal_the_host_ones():
    """sync_basis decides on the device: the column views' bounds there equal `view_errors`
    on the host (same terms), and NaN or an all-zero view with a nonzero rebuild gives inf."""
    from laser_triton.partial_views import device_view_errors, view_errors

    cfg = lt.LaserConfig(tau=0.05, max_rank=48, rank=8)
    batch = []
    for i, D in enumerate((320, 224)):
        tr = SiteTracker(f"s{i}", D, cfg)
        tr.batched = True
        tr.reset(low_rank_tokens(1, 301, D, rank=10, seed=i, noise=0.02)[0])
        batch.append(_entry(tr, low_rank_tokens(1, 257, D, rank=10, seed=5 + i, noise=0.02)))
    batch[1].draft.scale = 0.25  # a scaled site: norms were read unscaled
    parts = batch_products(batch, [0, 1])
    parts[2] = (torch.tensor([0.0, float("nan")], dtype=torch.float64),
                torch.tensor([1.0, 0.0]))
    batch.append(batch[0])
    got = device_view_errors(batch, parts).tolist()
    for j, i in enumerate(sorted(parts)):
        d = batch[i].draft
        want = view_errors(parts[i][0].tolist() + parts[i][1].tolist(), float(d.stats[1]),
                           d.consts, d.scale if i != 2 else batch[0].draft.scale)
        assert math.isclose(got[j], want, rel_tol=1e-12), (i, got[j], want)
    assert got[2] == float("inf") and 0 < got[0] < 0.05


def test_sync_basis_checks_column_views_without_a_forward_rebuild(monkeypatch):
    """Under sync_basis (decisions on the device, here one rank) gate/up halves are bounded
    from the batch's products, never by a rebuild in forward; unpack still meets tau."""
    from laser_triton.distributed import LocalSync

    class OneRank(LocalSync):
        active = True

    laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=48, min_width=64, decision_lag=0))
    laser._sync = OneRank()
    torch.manual_seed(0)
    tap, c = _counted_gated_step(laser, [GatedMLP()], monkeypatch)
    assert c.events["drafted"] > c.events["reset"]
    forward = [k for k in c.ops if k[1] == "reconstruct"
               and k[0] not in (launches.BACKWARD, launches.RESET)]
    assert not forward, c.ops
    halves = [p for _, p, res in tap.records
              if isinstance(p, Packed) and p.size[-1] * 2 == p.entry.region.width and res]
    assert halves and all(e <= 0.05 for e, _ in tap.errors())


def _shrink_checks(ranks: list[int]) -> list:
    from helpers import random_orthonormal

    from laser_triton.drafts import Draft
    from laser_triton.estimates import NO_BASIS

    cfg = lt.LaserConfig(tau=0.05, min_rank=2)
    checks = []
    for i, r in enumerate(ranks):
        theta = (0.3 + 0.1 * (i % 5)) ** torch.arange(r, dtype=torch.float64)
        V = random_orthonormal(r, r, seed=i)
        G = (V * theta) @ V.t()
        d = Draft(torch.zeros(3, 64), None, None,
                  torch.tensor([float(theta.sum()), 0.0, 0.0, 0.0]), NO_BASIS,
                  shrink_gram=G.float(), shrink_due=True)
        checks.append((SiteTracker(f"s{i}", 64, cfg), d))
    return checks


def test_shrink_plans_take_one_eigensolve_per_batch_whatever_the_ranks():
    """Checks at five distinct ranks cost one eigh (one host synchronization on CUDA) and
    about the launches of a single rank, and choose what each would alone."""
    from laser_triton.distributed import LocalSync
    from laser_triton.estimates import plan_shrinks

    counted = launches.counted("decide")(plan_shrinks)
    runs = {}
    for ranks in ([12, 12, 12, 12, 12], [12, 7, 5, 9, 3]):
        with launches.LaunchCounter() as c:
            Ws, r_new, slot = counted(_shrink_checks(ranks), LocalSync())
        runs[tuple(ranks)] = c.launches["decide"]
        assert c.sync_ops[("decide", "_linalg_eigh")] == 1, c.sync_ops
        for i, r in enumerate(ranks):  # each check as it would be planned alone
            W1, r1, _ = plan_shrinks(_shrink_checks(ranks)[i:i + 1], LocalSync())
            assert int(r_new[slot[i]]) == int(r1[0]) <= r and Ws[i].shape == (r, r)
            k = int(r1[0])
            P, Q = Ws[i][:, :k].double(), W1[0][:, :k].double()
            assert torch.allclose(P @ P.t(), Q @ Q.t(), atol=1e-5), (ranks, i)
        assert any(int(r_new[slot[i]]) < r for i, r in enumerate(ranks))  # some shrink
    one, mixed = runs.values()
    assert mixed <= one + 2 * 4, runs  # a stack and a pad per extra rank, nothing more
