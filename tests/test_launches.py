"""The launch counter of issue 13 (laser_triton.launches) and the budget it checks."""

from __future__ import annotations

import pytest
import torch

from laser_triton import launches, ops
from laser_triton.storage import Packed

kernels = pytest.importorskip("laser_triton.kernels")


@pytest.fixture
def triton_runs(monkeypatch):
    """Counts real Triton kernel launches (under the interpreter, or compiled on a GPU) and
    the torch ops the launchers issue besides (a counted section around each launcher)."""
    seen = _Runs()
    if torch.cuda.is_available():
        from triton.runtime.jit import JITFunction as cls
    else:
        from triton.runtime.interpreter import InterpretedFunction as cls
    real = cls.run

    def run(self, *args, **kwargs):
        c = launches.active()
        if c is not None:
            c.booking += 1  # the interpreter's own tensor handling is no device launch
        try:
            if not kwargs.get("warmup", False):
                seen.append(self.__name__ if hasattr(self, "__name__") else self.fn.__name__)
            return real(self, *args, **kwargs)
        finally:
            if c is not None:
                c.booking -= 1

    monkeypatch.setattr(cls, "run", run)
    return seen


class _Runs(list):
    def around(self, fn, *args):
        """Run a launcher; returns its device launches (kernels + torch ops), once its plan for
        these shapes is cached (the first call for a shape set builds and uploads it)."""
        fn(*args)
        self.clear()
        with launches.LaunchCounter() as c:
            launches.counted("x")(fn)(*args)
        return len(self) + c.launches["x"]


@pytest.mark.parametrize("D,r,need_y", [(40, 5, True), (40, 5, False), (300, 70, True),
                                        (300, 70, False)])
def test_launch_count_of_compress_pass_is_what_its_launcher_launches(triton_runs, D, r, need_y):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    X = torch.randn(67, D, device=dev)
    U = torch.linalg.qr(torch.randn(D, r, dtype=torch.float64))[0].float().to(dev)
    n = triton_runs.around(kernels.compress_pass, X, U, need_y, torch.bfloat16)
    assert n == kernels.launch_count("compress_pass", X, U, need_y=need_y)


@pytest.mark.parametrize("strided", [False, True])
def test_launch_count_follows_the_tma_design_and_its_fallback(triton_runs, strided, monkeypatch):
    """Where the store picks the TMA design, a contiguous bf16 X launches it (+ finish); a
    strided X cannot be read by TMA and takes the size rule's design (here split: 3)."""
    import importlib

    cp = importlib.import_module("laser_triton.kernels.compress_pass")
    monkeypatch.setattr(cp, "choose_path", lambda *args, **kwargs: "tma")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = torch.randn(67, 2 * 264, device=dev).bfloat16()
    X = base[:, ::2] if strided else base[:, :264].contiguous()
    U = torch.linalg.qr(torch.randn(264, 40, dtype=torch.float64))[0].float().to(dev)
    n = triton_runs.around(kernels.compress_pass, X, U, True, torch.bfloat16)
    assert n == kernels.launch_count("compress_pass", X, U) == (3 if strided else 2)


def test_launch_count_of_orthonormalize_and_reconstruct(triton_runs):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    Ys = [torch.randn(50, 3, device=dev), torch.randn(37, 9, device=dev)]
    assert triton_runs.around(kernels.orthonormalize_batched, Ys) == \
        kernels.launch_count("orthonormalize", *Ys)
    assert triton_runs.around(kernels.orthonormalize, Ys[1]) == \
        kernels.launch_count("orthonormalize", Ys[1])
    C, U = torch.randn(20, 9, device=dev), torch.randn(37, 9, device=dev)
    assert triton_runs.around(kernels.reconstruct, C, U) == \
        kernels.launch_count("reconstruct", C, U) == 1  # the basis split once per basis
    for n in (30, 3000):  # one row split, then several (their partial sums add one launch)
        G, Cg = torch.randn(1, n, 9, device=dev), torch.randn(1, n, 4, device=dev)
        assert triton_runs.around(kernels.grad_coeff, G, Cg) == \
            kernels.launch_count("grad_coeff", G, Cg) == (1 if n == 30 else 2)


@launches.counted("pack")
def _bookkeeping(X: torch.Tensor, U: torch.Tensor) -> float:
    out = ops.compress_pass(X, U, True, torch.bfloat16)  # booked as its kernels' launches
    v = X.view(-1)[:5]  # views launch nothing
    w = v + 1.0  # one launch
    return float(w.sum() + out.e_X)  # two launches, one host sync


def test_counter_books_ops_counts_aten_and_host_syncs():
    X, U = torch.randn(30, 40), torch.linalg.qr(torch.randn(40, 4))[0]
    with launches.LaunchCounter() as c:
        _bookkeeping(X, U)
        X + 1  # outside LASER's sections: the model's own work is not counted
    assert c.ops[("pack", "compress_pass")] == 1
    assert c.launches["pack"] == kernels.launch_count("compress_pass", X, U) + 3
    assert c.syncs["pack"] == 1
    assert launches.active() is None
    _bookkeeping(X, U)  # no counter: runs as usual


@launches.counted("decide")
def _linalg(A: torch.Tensor) -> None:
    torch.linalg.cholesky_ex(A)  # reports its status in a tensor: no host read
    torch.linalg.eigh(A)  # on CUDA: reads its status back ("synchronizes" in torch's docs)
    torch.linalg.cholesky(A)  # cholesky_ex, then _linalg_check_errors reads the status


def test_counter_books_linear_algebra_that_reads_its_status_as_a_host_sync():
    A = torch.randn(3, 6, 6, dtype=torch.float64)
    A = A @ A.mT + torch.eye(6, dtype=torch.float64)
    with launches.LaunchCounter() as c:
        _linalg(A)
    assert c.syncs["decide"] == 2, c.aten
    assert c.summary()["host_syncs_per_step"] == 2


# ----------------------------------------------------------------------------- the budget


def _gated_steps(laser, steps, seed=0, model=None):
    from models import GatedMLP, low_rank_tokens

    torch.manual_seed(seed)
    model = GatedMLP() if model is None else model
    for _ in range(steps):
        x = low_rank_tokens(2, 150, 160, rank=6, seed=10 + seed).requires_grad_()
        with laser.compress():
            loss = model(x).square().mean()
        loss.backward()
    return model


def test_partial_column_views_are_checked_without_a_forward_rebuild(monkeypatch):
    """gate/up halves of a fused gate_up must meet tau on their own: checked from the pass's
    small products, never by rebuilding the region in forward; unpack still meets tau."""
    from helpers import UnpackTap

    import laser_triton as lt

    laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=48, min_width=64))
    model = _gated_steps(laser, 3)  # bases exist: the next step is decided by the batch
    tap = UnpackTap(laser, monkeypatch)
    with launches.LaunchCounter() as c:
        _gated_steps(laser, 1, seed=1, model=model)
    assert c.events["drafted"] > c.events["reset"]  # some decided by the batch, not a reset
    # (a reset, the slow path, verifies the views against its new basis by a rebuild)
    forward = [k for k in c.ops if k[1] == "reconstruct"
               and k[0] not in (launches.BACKWARD, launches.RESET)]
    assert not forward, c.ops
    errs = tap.errors()
    assert len(errs) >= 3 and all(e <= 0.05 for e, _ in errs)


@pytest.mark.parametrize("coeff", [torch.float32, torch.bfloat16])
def test_column_view_bound_holds_for_what_unpack_returns(coeff):
    """The host bound for each half (from ||X_S||, U, Y) is above the measured error of the
    rebuilt half and close to it."""
    from helpers import rel_err
    from models import low_rank_tokens

    import laser_triton as lt
    from laser_triton.partial_views import column_view_parts, view_errors
    from laser_triton.storage import Entry, Packed, dense_region
    from laser_triton.tracker import SiteTracker

    cfg = lt.LaserConfig(tau=0.05, max_rank=48, rank=8, coeff_dtype=coeff)
    tr = SiteTracker("s", 320, cfg)
    scale = torch.cat([torch.ones(160), torch.full((160,), 0.2)])  # up: less energy
    tr.reset(low_rank_tokens(1, 301, 320, rank=10, seed=1, noise=0.02)[0] * scale)
    for seed, dtype in [(2, torch.float32), (3, torch.bfloat16)]:
        h = (low_rank_tokens(1, 301, 320, rank=10, seed=seed, noise=0.02) * scale).to(dtype)
        g, u = h.chunk(2, dim=-1)
        d = tr.draft(h[0])
        entry = Entry(dense_region(g), dtype, g, "s", tr, d)
        entry.views = [Packed(entry, g), Packed(entry, u)]
        norms, c = column_view_parts(entry)
        rho_c = d.consts[0]
        bound = view_errors(norms.tolist() + c.tolist(), float(d.stats[1]), d.consts, d.scale)
        X_hat = ops.reconstruct(d.C, d.U, dtype).view(h.shape)
        true = max(rel_err(a, b) for a, b in zip(X_hat.chunk(2, -1), (g, u)))
        assert true <= bound <= true + 0.01 + 3 * rho_c, (true, bound)
        tr.apply_pending()


def test_backward_rebuilds_a_region_once_for_all_its_saves():
    """x saved by two ops: backward reconstructs it once, not once per unpack."""
    from models import low_rank_tokens

    import laser_triton as lt

    laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=48, min_width=64))
    for step in range(3):
        base = low_rank_tokens(1, 300, 160, rank=6, seed=step).requires_grad_()
        w1, w2 = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
        with laser.compress():
            x = base * 1.0
            y = (x * w1).sum() + (x * w2).square().sum()
        with launches.LaunchCounter() as c:
            y.backward()
    # Regions: x (saved by both products) and x * w2 (saved by square).
    assert c.ops[(launches.BACKWARD, "reconstruct")] == len(c.regions) == 2


def test_backward_rebuilds_a_gate_up_region_once_for_both_halves(monkeypatch):
    """gate and up, two column views of one fused gate_up output, are unpacked separately in
    backward (silu saves gate, the product saves up): one reconstruct per region serves both,
    and each half as unpacked meets tau (measured against the saved values)."""
    from helpers import UnpackTap, rel_err
    from models import low_rank_tokens

    import laser_triton as lt

    laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=48, min_width=64))
    model = _gated_steps(laser, 3)
    tap = UnpackTap(laser, monkeypatch)
    x = low_rank_tokens(2, 150, 160, rank=6, seed=7).requires_grad_()
    with laser.compress():
        loss = model(model(x)).square().mean()  # two gate_up regions, halves of each saved
    halves = {}
    for _, p, _ in tap.records:  # saved views half as wide as their region: gate and up
        if isinstance(p, Packed) and p.size[-1] * 2 == p.entry.region.width:
            halves.setdefault(id(p.entry), []).append(p)
    compressed = [k for k, ps in halves.items()
                  if ps[0].entry.stored is not None and not ps[0].entry.stored.is_raw
                  and ps[0].entry.pinned is None]
    assert compressed and all(len(halves[k]) == 2 for k in compressed), halves
    with launches.LaunchCounter() as c:
        loss.backward()
    assert c.ops[(launches.BACKWARD, "reconstruct")] == len(c.regions)
    assert set(compressed) <= c.regions  # each gate_up region rebuilt, once
    for k in compressed:  # both halves were unpacked, each within tau
        for p in halves[k]:
            res = [r for r in tap.records if r[1] is p][0]
            assert len(res[2]) == 1 and rel_err(res[2][0], res[0]) <= 0.05
    assert all(e <= 0.05 for e, _ in tap.errors())


def test_failed_orthonormalization_keeps_the_old_basis_and_fails_its_drafts(monkeypatch):
    """New bases are used before their ok flags arrive: a failed one is replaced by the old
    basis when its flags are read, and drafts made with it are reset, never stored."""
    from helpers import UnpackTap

    import laser_triton as lt
    from laser_triton import decisions

    laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=48, min_width=64))
    _gated_steps(laser, 2)
    real = ops.orthonormalize_batched

    def broken(Ys):
        Qs, ok = real(Ys)
        return [2.0 * Q for Q in Qs], torch.zeros_like(ok)  # not orthonormal, flagged

    monkeypatch.setattr(decisions.ops, "orthonormalize_batched", broken)
    before = {n: (tr.U, tr.resets) for n, tr in laser.trackers.items()}
    tap = UnpackTap(laser, monkeypatch)
    from models import GatedMLP, low_rank_tokens

    model = GatedMLP()
    for role_calls in (2,):
        x = low_rank_tokens(2, 150, 160, rank=6, seed=40).requires_grad_()
        with laser.compress():
            h = x
            for _ in range(role_calls):
                with laser.role("z"):
                    h = model(h)
            h.square().mean().backward()
    errs = tap.errors()
    assert errs and all(e <= 0.05 for e, _ in errs)
    for tr in laser.trackers.values():
        assert tr.U is None or torch.allclose(tr.U.t() @ tr.U, torch.eye(tr.rank), atol=1e-4)
    assert before  # the broken bases never reached a stored tensor (checked through unpack)


def _trm_budget(monkeypatch, cfg, batch: int) -> tuple[dict, launches.LaunchCounter]:
    from helpers import sudoku_batch, trm_steps

    import laser_triton as lt
    from laser_triton.trm import TRM

    torch.manual_seed(0)
    model = TRM(cfg)
    model.laser = lt.Laser(lt.LaserConfig())
    model.laser.watch(model.net)
    b = sudoku_batch(batch, seed=3)
    trm_steps(model, b, steps=3)  # first bases (resets)
    with launches.LaunchCounter() as c:
        trm_steps(model, b, steps=1)
    return c.summary(), c


@pytest.mark.slow
def test_paper_sudoku_meets_the_launch_budget(monkeypatch):
    """The same budget on the paper_sudoku architecture at batch 8 (CPU; ~2 min)."""
    from laser_triton.trm import TRMConfig

    s, c = _trm_budget(monkeypatch, TRMConfig.paper_sudoku(), 8)
    assert c.events["saved"] >= 100
    assert s["launches_fwd_per_saved"] <= 4.0, s
    assert s["reconstructs_per_region"] == 1.0, s


def test_tiny_trm_meets_the_launch_budget(monkeypatch):
    """Issue 13's budget on the tiny TRM (CPU, untrained, batch 8): forward <= 4 device
    launches per saved tensor at a tracked site (decisions, error estimates and the per-call
    orthonormalization included; resets, the slow path, booked apart), 1 reconstruct per
    region in backward. Orthonormalization is booked as the Triton launcher for every rank
    <= 128 (the batched kernel for r <= 128 replaces the torch path there); the torch path is
    checked to be constant per call in test_batched_decisions."""
    from laser_triton.trm import TRMConfig

    s, c = _trm_budget(monkeypatch, TRMConfig.tiny(), 8)
    assert c.events["saved"] >= 36 and c.events["drafted"] > c.events["reset"]
    assert s["launches_fwd_per_saved"] <= 4.0, s
    assert s["reconstructs_per_region"] == 1.0, s
    forward = [k for k in c.ops if k[1] == "reconstruct"
               and k[0] not in (launches.BACKWARD, launches.RESET)]
    assert not forward, c.ops
