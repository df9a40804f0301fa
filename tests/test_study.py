"""Study orchestration with a fake run_one (pilot, decision, resume, analysis), plus a
2-seed smoke study on a very small TRM."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from laser_triton.tools.study import stats
from laser_triton.tools.study.report import write_outputs
from laser_triton.tools.study.runner import ARMS, RUN_COLUMNS, Study, StudyProtocol, analyze_runs

REQUIRED = ["seed", "arm", "loss", "exact_acc", "cell_acc", "activation_bytes"]


class FakeRuns:
    """Deterministic metrics: a per-seed level shared by both arms plus a small LASER effect."""

    def __init__(self, fail_at: int | None = None, effect: float = 0.001):
        self.calls: list[tuple[int, str]] = []
        self.fail_at = fail_at
        self.effect = effect

    def __call__(self, seed: int, arm: str, run_dir: str) -> dict:
        assert os.path.isdir(run_dir)
        self.calls.append((seed, arm))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        level = 0.6 + 0.03 * ((seed * 7919) % 11 - 5) / 5
        noise = 0.004 * ((seed * 104729) % 7 - 3) / 3
        acc = level + (self.effect + noise if arm == "laser" else 0.0)
        return {"loss": 1.0 - acc, "exact_acc": 0.0, "cell_acc": acc, "blank_acc": acc / 2,
                "activation_bytes": 100.0 if arm == "baseline" else 40.0,
                "raw_activation_bytes": 100.0, "steps": 3, "train_s": 0.1}


def _protocol(**kw) -> StudyProtocol:
    base = dict(steps=3, pilot_seeds=3, min_seeds=5, max_seeds=8, margin_fraction=0.02)
    base.update(kw)
    return StudyProtocol(**base)


def test_study_runs_pilot_then_fixed_number_of_paired_seeds(tmp_path):
    fake = FakeRuns()
    result = Study(str(tmp_path), _protocol(), fake, log=lambda s: None).run()
    d = result["decision"]
    assert d["pilot_seeds"] == [0, 1, 2]
    assert 5 <= d["seeds"] <= 8
    # The pilot runs first, in pairs; then the remaining main seeds, each in both arms.
    assert fake.calls[:6] == [(s, a) for s in (0, 1, 2) for a in ARMS]
    assert sorted(set(fake.calls)) == [(s, a) for s in range(d["seeds"]) for a in ARMS]
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert set(REQUIRED) <= set(runs.columns) and len(runs) == 2 * d["seeds"]
    # The margin is fixed from the pilot baseline's level before the main runs.
    pilot_base = runs[(runs.seed < 3) & (runs.arm == "baseline")].cell_acc.mean()
    assert d["margin"] == pytest.approx(0.02 * pilot_base)
    a = result["analysis"]
    assert a["n"] == d["seeds"]
    assert a["memory"]["saved_fraction"] == pytest.approx(0.6)
    prim = a["endpoints"]["cell_acc"]
    wide = runs.pivot_table(index="seed", columns="arm", values="cell_acc")
    direct = stats.paired_tost(wide.laser, wide.baseline, -d["margin"], d["margin"])
    assert prim["tost"]["p_value"] == pytest.approx(direct.p_value)
    assert prim["tost"]["equivalent"]  # effect 0.001 well inside a 0.012 margin
    assert prim["t_test"]["mean_diff"] == pytest.approx(wide.laser.sub(wide.baseline).mean())


def test_study_resumes_without_rerunning_finished_runs(tmp_path):
    proto = _protocol()
    first = FakeRuns(fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        Study(str(tmp_path), proto, first, log=lambda s: None).run()
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 4
    second = FakeRuns()
    result = Study(str(tmp_path), proto, second, log=lambda s: None).run()
    assert (2, "baseline") == second.calls[0]  # picks up at the interrupted run
    assert not set(second.calls) & set(first.calls[:4])
    again = FakeRuns()
    Study(str(tmp_path), proto, again, log=lambda s: None).run()
    assert again.calls == []  # everything recorded: nothing runs
    assert result["decision"] == json.loads((tmp_path / "decision.json").read_text())


def test_protocol_cannot_change_after_declaration(tmp_path):
    Study(str(tmp_path), _protocol(), FakeRuns(), log=lambda s: None).run()
    with pytest.raises(RuntimeError, match="different protocol"):
        Study(str(tmp_path), _protocol(margin_fraction=0.05), FakeRuns(), log=lambda s: None).run()


def test_separate_pilot_and_sample_size_cap(tmp_path):
    fake = FakeRuns(effect=0.0)
    proto = _protocol(separate_pilot=True, max_seeds=5, margin_fraction=0.0005)
    result = Study(str(tmp_path), proto, fake, log=lambda s: None).run()
    d = result["decision"]
    assert d["capped"] and d["seeds"] == 5 and d["seeds_needed"] > 5
    assert result["analysis"]["seeds"] == [3, 4, 5, 6, 7]  # the pilot seeds 0-2 are not analysed
    assert len(fake.calls) == 2 * (3 + 5)


def test_protocol_validation():
    with pytest.raises(ValueError):
        StudyProtocol(pilot_seeds=1)
    with pytest.raises(ValueError):
        StudyProtocol(min_seeds=6, max_seeds=5)


def test_outputs_have_required_columns_and_verdicts(tmp_path):
    proto = _protocol()
    result = Study(str(tmp_path / "w"), proto, FakeRuns(), log=lambda s: None).run()
    csv, md = write_outputs(str(tmp_path / "r"), "study", proto, result)
    df = pd.read_csv(csv)
    assert set(REQUIRED) <= set(df.columns) and df.analysed.all()
    text = open(md).read()
    assert "equivalent within" in text and "60.0% saved" in text
    assert "no equivalence test" in text  # exact_acc has a zero baseline level
    # How tight a margin the data would pass, and the power at the n used, are stated.
    assert "tighter than declared" in text and "Power of the TOST at the n used" in text


def test_analyze_runs_secondary_margins_are_relative():
    rows = []
    for s in range(5):
        for arm, v in (("baseline", 1.0 + 0.1 * s), ("laser", 1.01 + 0.1 * s + 0.001 * (s % 2))):
            rows.append({c: 0.0 for c in RUN_COLUMNS} | {"seed": s, "arm": arm, "loss": v,
                                                        "cell_acc": v, "activation_bytes": 1.0})
    proto = StudyProtocol(secondary=("loss",))
    out = analyze_runs(pd.DataFrame(rows), proto, {"margin": 0.05}, list(range(5)))
    assert out["endpoints"]["loss"]["margin"] == pytest.approx(0.05 * 1.2)
    assert out["endpoints"]["cell_acc"]["margin"] == 0.05


def test_smoke_study_on_a_tiny_trm(tmp_path):
    from laser_triton.tools.study.trm import trm_run_one

    proto = StudyProtocol(
        steps=2, pilot_seeds=2, min_seeds=2, max_seeds=2, checkpoint_every=1, memory_every=1,
        train={"batch_size": 8, "train_puzzles": 16, "test_puzzles": 8, "eval_batch_size": 8,
               "model": {"L_cycles": 2, "H_cycles": 1, "halt_max_steps": 2}},
        laser={"tau": 0.3, "rank": 8, "max_rank": 64, "coeff_dtype": "float32"})
    result = Study(str(tmp_path), proto, trm_run_one(proto, progress=False),
                   log=lambda s: None).run()
    runs = result["runs"]
    assert len(runs) == 4 and set(runs.arm) == set(ARMS)
    assert all(os.path.exists(tmp_path / "runs" / f"seed{s}_{a}" / "last.pt")
               for s in (0, 1) for a in ARMS)
    wide = runs.pivot_table(index="seed", columns="arm",
                            values=["raw_activation_bytes", "activation_bytes"])
    # Same shapes in both arms: the LASER hooks' raw bytes equal the baseline's counted bytes.
    assert (wide[("raw_activation_bytes", "laser")] == wide[("activation_bytes", "baseline")]).all()
    assert (wide[("activation_bytes", "laser")] < wide[("activation_bytes", "baseline")]).all()
    assert runs.cell_acc.between(0, 1).all() and (runs.steps == 2).all()


def test_both_arms_share_initialization_and_data_order():
    import torch

    from laser_triton.tools.study.trm import make_trainer

    proto = StudyProtocol(train={"batch_size": 4, "train_puzzles": 8, "test_puzzles": 4,
                                 "model": {"L_cycles": 1, "H_cycles": 1}},
                          laser={"tau": 0.2, "max_rank": 64})
    base = make_trainer(proto, 3, "baseline")
    las = make_trainer(proto, 3, "laser", data=base.data)
    assert base.laser is None and las.laser is not None and las.laser.cfg.tau == 0.2
    for (n, p), (_, q) in zip(base.model.state_dict().items(), las.model.state_dict().items()):
        assert torch.equal(p, q), n
    for _ in range(3):
        b, c = next(base.stream), next(las.stream)
        assert all(torch.equal(b[k], c[k]) for k in b)


def test_train_config_is_pinned_and_drift_refused(tmp_path):
    from laser_triton.tools.study.trm import pin_train_config

    proto = StudyProtocol(laser={"tau": 0.2})
    pin_train_config(str(tmp_path), proto)
    pinned = json.loads((tmp_path / "train_config.json").read_text())
    assert pinned["laser"]["use_laser"] and not pinned["baseline"]["use_laser"]
    assert pinned["laser"]["laser"]["tau"] == 0.2 and "seed" not in pinned["baseline"]
    pin_train_config(str(tmp_path), proto)  # unchanged: fine
    pinned["baseline"]["lr"] = 123.0
    (tmp_path / "train_config.json").write_text(json.dumps(pinned))
    with pytest.raises(RuntimeError, match="lr"):
        pin_train_config(str(tmp_path), proto)
