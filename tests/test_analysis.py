"""Analysis math on synthetic matrices with known spectra and angles; capture on a tiny TRM."""

from __future__ import annotations

import math
import os

import pytest
import torch

import laser_triton as lt
from laser_triton.tools.analysis import spectra


def _orth(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q


def _matrix(sigma, N=200, D=64, seed=0, V=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(sigma, dtype=torch.float64)
    A = _orth(N, len(s), gen)
    V = _orth(D, len(s), gen) if V is None else V
    return A @ torch.diag(s) @ V.t()


def test_spectrum_recovers_known_singular_values():
    X = _matrix([10.0, 5.0, 2.0, 1.0])
    s = spectra.spectrum(X)
    assert s.sigma[:4] == pytest.approx(torch.tensor([10.0, 5.0, 2.0, 1.0], dtype=torch.float64),
                                        abs=1e-9)
    assert float(s.sigma[4:].max()) < 1e-6
    # energies 100, 25, 4, 1 of 130: cumulative 0.769, 0.962, 0.992, 1
    assert spectra.energy_rank(s, 0.90) == 2
    assert spectra.energy_rank(s, 0.95) == 2
    assert spectra.energy_rank(s, 0.99) == 3
    assert spectra.energy_rank(s, 1.0) == 4
    assert spectra.energy_rank(torch.zeros(5), 0.9) == 0


def test_effective_rank_and_participation_ratio():
    assert spectra.effective_rank([3.0] * 7 + [0.0] * 5) == pytest.approx(7.0)
    assert spectra.participation_ratio([3.0] * 7 + [0.0] * 5) == pytest.approx(7.0)
    p = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert spectra.effective_rank([2.0, 1.0]) == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert spectra.participation_ratio([2.0, 1.0]) == pytest.approx(25 / 17)
    assert spectra.effective_rank([0.0, 0.0]) == 0.0


def test_mean_profile_separates_the_mean_from_the_spread():
    # X = a large common row (the mean) + a rank-3 spread with known singular values.
    gen = torch.Generator().manual_seed(3)
    N, D = 300, 48
    spread = _matrix([3.0, 2.0, 1.0], N=N, D=D, seed=4)
    spread = spread - spread.mean(dim=0)  # exactly centred
    mu = 5.0 * torch.randn(D, generator=gen, dtype=torch.float64)
    X = spread + mu
    prof = spectra.mean_profile(X)
    centred_sigma = torch.linalg.svdvals(spread)
    assert prof["participation_centred"] == pytest.approx(
        spectra.participation_ratio(centred_sigma), rel=1e-9)
    assert prof["mean_energy"] == pytest.approx(
        N * float(mu.square().sum()) / float(X.square().sum()), rel=1e-12)
    # The mean dominates: the uncentred ratio is near 1, the centred one near the spread's.
    assert spectra.participation_ratio(spectra.spectrum(X)) < 1.1
    assert prof["participation_centred"] > 2.0 and prof["top_mean_cos"] > 0.99
    zero = spectra.mean_profile(torch.zeros(5, 4))
    assert zero == {"participation_centred": 0.0, "mean_energy": 0.0, "top_mean_cos": 0.0}


def test_optimal_error_is_attained_by_the_top_subspace_only():
    sigma = [8.0, 4.0, 2.0, 1.0, 0.5]
    X = _matrix(sigma, seed=1)
    s = spectra.spectrum(X)
    for r in range(1, 5):
        expected = math.sqrt(sum(v * v for v in sigma[r:]) / sum(v * v for v in sigma))
        assert spectra.optimal_error(s, r) == pytest.approx(expected, rel=1e-9)
        assert spectra.basis_error(X, s.top(r)) == pytest.approx(expected, rel=1e-6)
        rand = _orth(64, r, torch.Generator().manual_seed(r))
        assert spectra.basis_error(X, rand) > expected
    for tau in (0.05, 0.1, 0.3):
        r = spectra.rank_for_error(s, tau)
        assert spectra.optimal_error(s, r) <= tau < spectra.optimal_error(s, r - 1)


def test_principal_angles_known_rotations_including_tiny_ones():
    D, thetas = 10, torch.tensor([1e-7, 0.3, 1.2], dtype=torch.float64)
    eye = torch.eye(D, dtype=torch.float64)
    U1 = eye[:, :3]
    U2 = torch.stack([math.cos(t) * eye[:, i] + math.sin(t) * eye[:, 3 + i]
                      for i, t in enumerate(thetas.tolist())], 1)
    ang = spectra.principal_angles(U1, U2)
    assert ang == pytest.approx(thetas, rel=1e-6)
    assert spectra.principal_angles(U1, U1) == pytest.approx(torch.zeros(3, dtype=torch.float64), abs=1e-7)
    assert spectra.principal_angles(U1, eye[:, 3:5]) == pytest.approx(
        torch.full((2,), math.pi / 2, dtype=torch.float64))


def _drifting(steps: int, angle: float, sigma, noise: float = 0.0, seed: int = 0):
    """Matrices whose right subspace rotates by `angle` per step (plus isotropic noise)."""
    gen = torch.Generator().manual_seed(seed)
    D, k = 48, len(sigma)
    V0, W = _orth(D, 2 * k, gen).split(k, 1)
    out = []
    for t in range(steps):
        V = math.cos(angle * t) * V0 + math.sin(angle * t) * W
        X = _matrix(sigma, N=160, D=D, seed=100 + t, V=V)
        out.append(X + noise * torch.randn(X.shape, generator=gen, dtype=torch.float64))
    return out


def test_fixed_rank_tracking_exact_on_a_static_subspace():
    Xs = _drifting(6, 0.0, [5.0, 3.0, 2.0])
    for mode in ("lagged", "refresh"):
        tr = spectra.FixedRankTracker(3, mode)
        assert max(tr.step(X)[0] for X in Xs) < 1e-9


def test_fixed_rank_tracking_lagged_vs_refresh_under_drift():
    Xs = _drifting(12, 0.02, [5.0, 4.0, 3.0, 2.0], noise=0.001)
    lag, ref = spectra.FixedRankTracker(4, "lagged"), spectra.FixedRankTracker(4, "refresh")
    lag_e = [lag.step(X)[0] for X in Xs]
    ref_e = [ref.step(X)[0] for X in Xs]
    opt_e = [spectra.optimal_error(spectra.spectrum(X), 4) for X in Xs]
    for t in range(2, 12):
        assert opt_e[t] <= ref_e[t] * (1 + 1e-9)
        assert ref_e[t] < lag_e[t]  # refreshing on X itself removes the lag
        assert ref_e[t] < 1.1 * opt_e[t]
    # The lag costs about the drift angle times the signal, far above the noise floor.
    assert sum(lag_e[2:]) / 10 > 2 * sum(opt_e[2:]) / 10


def test_laser_tracker_probe_meets_tau_and_reports_rows():
    cfg = lt.LaserConfig(rank=4, max_rank=16, tau=0.05, min_width=1, coeff_dtype=torch.float32)
    probe = spectra.LaserTrackerProbe("site", 48, cfg)
    rows = [probe.step(X.float(), period=16) for X in _drifting(10, 0.003, [5.0, 4.0, 3.0, 2.0], 0.0005)]
    assert rows[0]["reset"] == 1.0  # the first tensor builds the basis
    assert all(r["err"] <= 0.05 for r in rows)
    assert sum(r["reset"] for r in rows[1:]) <= 1
    assert all(1 <= r["rank"] <= 16 and r["raw"] == 0.0 for r in rows)
    assert all(r["row_err_max"] >= r["pos0_row_err_max"] and r["row_err_max"] >= r["row0_err"]
               for r in rows)
    assert rows[-1]["stored_bytes"] == 160 * rows[-1]["rank"] * 4 + 48 * rows[-1]["rank"] * 4


_SMALL = {"batch_size": 8, "train_puzzles": 16, "test_puzzles": 8, "eval_batch_size": 8,
          "model": {"L_cycles": 2, "H_cycles": 1, "halt_max_steps": 2, "num_layers": 1}}


def _small_trainer(use_laser: bool):
    from laser_triton.tools.trainer import Trainer
    from laser_triton.tools.training import TrainConfig

    cfg = TrainConfig.for_preset("tiny", **_SMALL, use_laser=use_laser,
                                 laser={"tau": 0.3, "rank": 8, "max_rank": 64})
    return Trainer(cfg)


def test_recorder_sees_the_sites_and_matrices_laser_compresses():
    from laser_triton.tools.analysis.capture import ActivationRecorder

    las = _small_trainer(True)
    las.train_step()
    report = las.laser.report()
    laser_sites = {(r.site, r.width) for r in report.itertuples() if r.width > 0}

    seen = []
    tr = _small_trainer(False)
    rec = ActivationRecorder(lambda site, role, call, X: seen.append((site, role, call, X)),
                             min_width=128, min_rows=64)
    handles = rec.watch(tr.model.net)
    tr.model.laser = rec
    tr.train_step()
    for h in handles:
        h.remove()
    assert {(s, X.shape[1]) for s, _, _, X in seen} == laser_sites
    # One matrix per site per call: z sites twice (n = 2), y sites once.
    calls = {}
    for site, role, call, X in seen:
        calls.setdefault(site, []).append(call)
        assert X.shape[0] * X.shape[1] > 0 and site.startswith(role + "/")
    assert all(c == ([0, 1] if s.startswith("z/") else [0]) for s, c in calls.items())
    assert rec.skipped.get("narrow", 0) > 0


def test_analyze_command_end_to_end(tmp_path):
    import json

    import pandas as pd

    from laser_triton.tools.analysis.analyze import cli_main
    from laser_triton.tools.analysis.plots import plot_all

    out = tmp_path / "a"
    rc = cli_main(["--out", str(out), "--controls", "baseline", "--train-steps", "1",
                   "--capture-steps", "2", "--train", json.dumps(_SMALL), "--no-progress",
                   "--laser", json.dumps({"max_rank": 64, "coeff_dtype": "float32"}),
                   "--tau", "0.3", "--no-plots"])
    assert rc == 0
    steps = pd.read_csv(out / "steps.csv")
    assert set(steps.model) == {"baseline"} and set(steps.train_step) == {2, 3}
    assert {"rank90", "rank95", "rank99", "rank_tau", "eff_rank", "participation",
            "drift_max_deg", "fixed_lagged_ratio", "refresh_ratio", "lagged_reset",
            "lagged_pos0_row_err_max", "lagged_row0_err"} <= set(steps.columns)
    assert (steps.rank90 <= steps.rank95).all() and (steps.rank95 <= steps.rank99).all()
    assert (steps.lagged_err <= 0.3 + 1e-6).all() and (steps.refresh_err <= 0.3 + 1e-6).all()
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 and summary.reset_rate.between(0, 1).all()
    assert (out / "analysis.md").exists()
    assert {"participation_centred", "mean_energy", "top_mean_cos"} <= set(steps.columns)
    text = (out / "analysis.md").read_text()
    med = steps.participation_centred.median()
    assert "Spectra: uncentred vs centred" in text and f"{med:.3g} [" in text
    roles = pd.read_csv(out / "summary_roles.csv")
    assert set(roles.role) == {"z", "y"} and len(roles) == 4
    # Plots on two sites only (drawing all 18 panels is slow on a busy CPU).
    spec = pd.read_csv(out / "spectra.csv")
    # The full spectrum of every site, not the first 128 values: e1..e_k, k = min(rows, width).
    k = steps.groupby("site").apply(lambda d: min(d.rows.iloc[0], d.width.iloc[0]))
    ecount = spec.set_index("site").filter(regex=r"^e\d+$").notna().sum(axis=1)
    assert (ecount.reindex(k.index) == k).all() and k.max() > 128
    keep = set(list(dict.fromkeys(steps.stem))[:2])
    paths = plot_all(str(out), steps[steps.stem.isin(keep)],
                     spec[spec.site.str.split("/", n=1).str[1].isin(keep)], 0.3)
    assert all(os.path.getsize(p) > 0 for p in paths) and len(paths) == 3
