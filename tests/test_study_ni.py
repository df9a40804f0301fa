"""The pre-declared non-inferiority study (issue 15): the protocol file, the code check, forks
from a trunk, the gradient probe, the fixed-sequence decision, and a smoke run end to end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from laser_triton.tools.study import ni as study_ni
from laser_triton.tools.study import ni_measure
from laser_triton.tools.study.ni_report import decide

PROTOCOL = Path(__file__).resolve().parents[1] / "perf" / "results" / "study_ni_protocol.json"
# A model and data small enough for tests; everything else as declared.
SMALL = {"trunk_steps": 2, "fork_steps": 2, "fork_seeds": [1, 2], "taus": [0.05, 0.3],
         "probe_every": 1, "memory_every": 1, "peak_every": 1,
         "train": {"batch_size": 8, "train_puzzles": 16, "test_puzzles": 8,
                   "eval_batch_size": 8,
                   "model": {"L_cycles": 2, "H_cycles": 1, "halt_max_steps": 2,
                             "num_layers": 1}}}


def test_the_declared_protocol_is_what_the_issue_asks_for():
    p = study_ni.load_protocol(str(PROTOCOL))
    t = p["trunk"]["train"]
    assert not p["smoke"] and len(p["code_commit"]) == 40
    assert t["preset"] == "tiny" and t["model"]["lean_saves"] and not t["use_laser"]
    assert t["steps"] >= 500 and t["test_puzzles"] >= 512 and t["ema"]
    assert len(p["fork"]["seeds"]) >= 5 and p["fork"]["steps"] >= 150
    arms = p["fork"]["arms"]
    assert not arms["plain"]["use_laser"] and arms["laser_default"]["laser"]["tau"] == 0.05
    assert arms["laser_tau60"]["laser"]["tau"] == "tau60"
    prim = p["primary"]
    assert prim["endpoint"] == "blank_acc" and prim["margin"] == -0.01 and prim["alpha"] == 0.05
    assert prim["order"] == ["laser_default", "laser_tau60"]
    assert study_ni.pareto_taus(p) == [0.02, 0.05, 0.1, 0.2, 0.3]
    assert study_ni.arm_laser(p, "plain", 0.2) is None
    assert study_ni.arm_laser(p, "laser_tau60", 0.2)["tau"] == 0.2
    assert study_ni.arm_laser(p, "pareto_0.1", None)["tau"] == 0.1
    with pytest.raises(RuntimeError, match="tau60"):
        study_ni.arm_laser(p, "laser_tau60", None)


def test_smoke_overrides_are_labelled_and_checked():
    p = study_ni.load_protocol(str(PROTOCOL), SMALL)
    assert p["smoke"] and p["trunk"]["train"]["steps"] == 2
    assert p["trunk"]["train"]["model"]["lean_saves"]  # merged, not replaced
    with pytest.raises(ValueError, match="unknown"):
        study_ni.load_protocol(str(PROTOCOL), {"margin": -0.5})


def test_code_check_refuses_drift_from_the_declared_commit(tmp_path):
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *a], check=True, text=True,
                              capture_output=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "laser_triton").mkdir()
    (tmp_path / "laser_triton" / "tracker.py").write_text("a = 1\n")
    (tmp_path / "laser_triton" / "study_ni.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "declared")
    p = {"code_commit": git("rev-parse", "HEAD"), "code_paths": ["laser_triton"],
         "code_paths_exempt": ["laser_triton/study_ni.py"], "smoke": False}
    assert study_ni.check_code(p, str(tmp_path))["code_changed"] == []
    (tmp_path / "laser_triton" / "study_ni.py").write_text("x = 2\n")  # exempt: reporting
    assert study_ni.check_code(p, str(tmp_path))["code_changed"] == []
    (tmp_path / "laser_triton" / "tracker.py").write_text("a = 2\n")  # uncommitted LASER change
    with pytest.raises(RuntimeError, match="differs from the protocol's commit"):
        study_ni.check_code(p, str(tmp_path))
    (tmp_path / "laser_triton" / "tracker.py").write_text("a = 1\n")
    (tmp_path / "laser_triton" / "new.py").write_text("")  # untracked counts too
    with pytest.raises(RuntimeError, match="new.py"):
        study_ni.check_code(p, str(tmp_path))
    assert study_ni.check_code({**p, "smoke": True}, str(tmp_path))["code_changed"] == [
        "laser_triton/new.py"]


def _runs(diffs: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for s in range(5):
        base = 0.5 + 0.01 * s
        rows.append({"seed": s, "arm": "plain", "tau": 0.0, "blank_acc": base})
        for arm, d in diffs.items():
            rows.append({"seed": s, "arm": arm, "tau": 0.1, "blank_acc": base + d[s]})
    df = pd.DataFrame(rows)
    for c in ("exact_acc", "cell_acc", "loss", "held_bytes", "peak_bytes", "grad_cos",
              "grad_cos_min", "grad_cos_noise"):
        df[c] = 1.0 + 0.001 * df.index
    return df


def test_decision_is_one_sided_with_a_fixed_sequence():
    p = study_ni.load_protocol(str(PROTOCOL))
    good = [0.02, 0.03, 0.025, 0.035, 0.03]  # LASER better: passes (a TOST would penalize it)
    bad = [-0.02, -0.01, -0.03, -0.015, -0.02]
    out = decide(p, _runs({"laser_default": good, "laser_tau60": bad}))
    first, second = out["arms"]["laser_default"], out["arms"]["laser_tau60"]
    assert first["verdict"] == "non-inferior" and first["primary"]["lower_bound"] > -0.01
    assert second["confirmatory"] and second["verdict"] == "non-inferiority NOT shown"
    out = decide(p, _runs({"laser_default": bad, "laser_tau60": good}))
    second = out["arms"]["laser_tau60"]
    assert not second["confirmatory"] and "exploratory" in second["verdict"]
    assert decide(p, _runs({"laser_default": good}))["arms"]["laser_tau60"]["verdict"] == "not run"


def test_forks_reseed_and_the_gradient_probe_leaves_training_unchanged(tmp_path):
    p = study_ni.load_protocol(str(PROTOCOL), SMALL)
    trunk = study_ni.run_trunk(p, str(tmp_path), log=lambda s: None)
    laser = study_ni.arm_laser(p, "laser_default", None)
    total = p["trunk"]["train"]["steps"] + 2
    a = study_ni.fork_trainer(trunk, 1, laser, total)
    b = study_ni.fork_trainer(trunk, 1, laser, total)
    plain = study_ni.fork_trainer(trunk, 1, None, total)
    other = study_ni.fork_trainer(trunk, 2, None, total)
    state = torch.load(trunk, weights_only=False)["model"]
    assert all(torch.equal(v, a.model.state_dict()[k]) for k, v in state.items())
    first = [next(t.stream)["inputs"] for t in (a, b, plain, other)]
    assert torch.equal(first[0], first[2]) and not torch.equal(first[0], first[3])
    for t in (a, b):  # put the streams back in step
        t.stream = study_ni.fork_trainer(trunk, 1, None, total).stream
    rows = ni_measure.measure_steps(a, 2, probe_every=1,
                                    probe_stream=ni_measure.probe_batches(a, 1),
                                    fork_step0=a.step)
    ni_measure.measure_steps(b, 2, fork_step0=b.step)
    assert all(0.0 < r["grad_cos"] <= 1.0 + 1e-9 and "grad_cos_noise" in r for r in rows)
    assert all("held_bytes" in r and r["peak_bytes"] > 0 for r in rows)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name  # the probe changed nothing the arm trains with


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path):
    work, res = tmp_path / "w", tmp_path / "r"
    paths = study_ni.run_protocol(str(PROTOCOL), str(work), str(res), "ni",
                                  ["trunk", "select", "forks", "report"], SMALL,
                                  log=lambda s: None)
    assert all(os.path.getsize(x) > 0 for x in paths)
    runs = pd.read_csv(res / "ni.csv")
    assert len(runs) == 2 * 3 and set(runs.arm) == {"plain", "laser_default", "laser_tau60"}
    assert runs.held_bytes.notna().all() and runs.peak_bytes.notna().all()
    decision = json.loads((res / "ni_decision.json").read_text())
    assert decision["smoke"] and set(decision["arms"]) == {"laser_default", "laser_tau60"}
    assert "SMOKE" in (res / "ni.md").read_text()
    pareto = pd.read_csv(res / "ni_pareto.csv")
    assert list(pareto.tau) == [0.05, 0.3] and pareto.blank_acc.notna().all()
