"""Training: the loss falls, resume continues identically, runs are reproducible, and the
train/eval/demo commands work end to end with every LASER option reachable."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import laser_triton as lt
from laser_triton.tools import demo, evaluate, train
from laser_triton.tools.trainer import Trainer
from laser_triton.tools.training import TrainConfig, lr_at, make_laser

FAST_MODEL = {"hidden_size": 32, "num_heads": 2, "expansion": 2.0, "H_cycles": 2,
              "L_cycles": 2, "halt_max_steps": 3}


def fast_config(**kw) -> TrainConfig:
    base = dict(model=dict(FAST_MODEL), train_puzzles=24, test_puzzles=8, clues=50, batch_size=8,
                steps=6, lr=3e-3, lr_warmup_steps=2, eval_batch_size=8, ema_rate=0.9)
    base.update(kw)
    return TrainConfig.for_preset("tiny", **base)


def test_lr_schedule_matches_the_reference():
    assert lr_at(1, 1e-4, 2000, 10_000, 1.0) == pytest.approx(5e-8)
    assert lr_at(1000, 1e-4, 2000, 10_000, 1.0) == pytest.approx(5e-5)
    assert lr_at(5000, 1e-4, 2000, 10_000, 1.0) == pytest.approx(1e-4)  # constant after
    assert lr_at(10_000, 1e-4, 2000, 10_000, 0.1) == pytest.approx(1e-5)  # cosine floor


def test_paper_training_hyperparameters():
    cfg = TrainConfig.for_preset("paper_sudoku")
    assert (cfg.batch_size, cfg.lr, cfg.lr_warmup_steps, cfg.weight_decay) == (768, 1e-4, 2000, 1.0)
    assert (cfg.beta1, cfg.beta2, cfg.ema, cfg.ema_rate) == (0.9, 0.95, True, 0.999)
    assert (cfg.puzzle_emb_lr, cfg.puzzle_emb_weight_decay) == (1e-4, 1.0)
    assert not cfg.use_laser


def test_a_short_run_lowers_the_loss():
    trainer = Trainer(fast_config(steps=40, lr=3e-3, ema=False))
    losses = [trainer.train_step()["lm_loss"] for _ in range(40)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.15, (first, last)  # about 2.45 -> 2.2 (seeded, deterministic)
    ev = trainer.evaluate()
    assert 0 <= ev["cell_acc"] <= 1 and ev["puzzles"] == 8


def test_training_accuracy_is_missing_not_zero_when_no_sample_halted():
    trainer = Trainer(fast_config(steps=2))
    row = trainer.train_step()  # halt_max_steps 3: nothing halts on the first step
    assert row["halted"] == 0
    assert all(math.isnan(row[k]) for k in ("cell_acc", "exact_acc", "q_halt_acc", "steps"))
    assert row["loss"] > 0


def test_training_is_reproducible():
    a = [Trainer(fast_config()).train_step()["loss"] for _ in range(1)]
    b = [Trainer(fast_config()).train_step()["loss"] for _ in range(1)]
    assert a == b


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


# Untrained 32-wide activations are nearly isotropic: a loose tau lets some sites compress.
LASER_SMALL = {"tau": 0.5, "min_width": 16, "rank": 4, "max_rank": 24}


@pytest.mark.parametrize("use_laser", [False, True], ids=["plain", "laser"])
def test_resume_continues_identically(tmp_path, use_laser):
    cfg = fast_config(steps=6, use_laser=use_laser, laser=dict(LASER_SMALL) if use_laser else {})
    straight = Trainer(cfg)
    for _ in range(6):
        straight.train_step()

    first = Trainer(cfg)
    for _ in range(3):
        first.train_step()
    path = str(tmp_path / "ckpt.pt")
    first.save(path)
    torch.manual_seed(999)  # disturb the global RNG: resume must not depend on it
    resumed = Trainer.from_checkpoint(path)
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()

    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for k, v in _params(straight).items():
        assert torch.equal(v, _params(resumed)[k]), k
    for k, v in straight.ema.shadow.items():
        assert torch.equal(v, resumed.ema.shadow[k]), k
    assert torch.equal(straight.carry.y, resumed.carry.y)
    assert torch.equal(straight.carry.steps, resumed.carry.steps)
    assert straight.stream.pos == resumed.stream.pos
    if use_laser:  # the LASER trajectory continues too: same bases, same decisions
        a, b = straight.laser.trackers, resumed.laser.trackers
        assert list(a) == list(b)
        assert straight.laser.summary()["ratio"] < 0.9  # compressed tensors did shape the grads
        for name, tr in a.items():
            assert (tr.tensors, tr.resets, tr.raw_fallbacks, tr.shrinks) == (
                b[name].tensors, b[name].resets, b[name].raw_fallbacks, b[name].shrinks), name
            assert (tr.U is None) == (b[name].U is None) and (
                tr.U is None or torch.equal(tr.U, b[name].U)), name


def test_every_laser_option_is_reachable_from_the_command_line():
    args = train.build_parser().parse_args([
        "--use-laser", "--laser-tau", "0.1", "--laser-rank", "8", "--laser-max-rank", "64",
        "--laser-mode", "refresh", "--laser-coeff-dtype", "float32",
        "--laser-exclude", "y/*", "*mlp#2", "--laser-site-overrides", '{"z/*": {"tau": 0.2}}',
        "--laser-min-width", "64", "--laser-power-iters", "2", "--laser-seed", "3",
        "--model", "L_cycles=4", "mlp_t=false", "pos_encodings=rope"])
    cfg = train.config_from_args(args)
    assert cfg.use_laser and cfg.model == {"L_cycles": 4, "mlp_t": False, "pos_encodings": "rope"}
    laser = make_laser(cfg)
    assert isinstance(laser, lt.Laser)
    c = laser.cfg
    assert (c.tau, c.rank, c.max_rank, c.mode, c.min_width, c.power_iters, c.seed) == (
        0.1, 8, 64, "refresh", 64, 2, 3)
    assert c.coeff_dtype == torch.float32 and c.exclude == ("y/*", "*mlp#2")
    assert c.site_overrides == {"z/*": {"tau": 0.2}}
    import dataclasses

    flags = {a.dest for a in train.build_parser()._actions}
    for f in dataclasses.fields(lt.LaserConfig):
        assert f"laser_{f.name}" in flags, f.name
    assert make_laser(TrainConfig()) is None  # the one switch


def test_train_and_eval_commands(tmp_path, capsys):
    out = tmp_path / "run"
    model = [f"{k}={v}" for k, v in FAST_MODEL.items()]
    rc = train.cli_main(["--steps", "2", "--batch-size", "4", "--train-puzzles", "8",
                         "--test-puzzles", "4", "--clues", "50", "--eval-batch-size", "4",
                         "--out", str(out), "--no-progress", "--use-laser",
                         "--laser-min-width", "16", "--laser-rank", "8", "--laser-max-rank", "16",
                         "--model", *model])
    assert rc == 0
    for name in ("last.pt", "config.json", "train_metrics.csv", "eval_metrics.csv",
                 "laser_report.csv"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["use_laser"] is True
    capsys.readouterr()
    assert evaluate.cli_main([str(out / "last.pt"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 2 and metrics["puzzles"] == 4
    assert evaluate.cli_main([str(out / "last.pt"), "--generate", "3", "--clues", "60"]) == 0
    # Resume from the checkpoint for two more steps.
    # Resume for two more steps: without --out, outputs go next to the checkpoint.
    assert train.cli_main(["--resume", str(out / "last.pt"), "--steps", "4", "--no-progress"]) == 0
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 4
    # The metrics history survives the resume: both runs' evaluations and all training steps.
    assert list(pd.read_csv(out / "eval_metrics.csv").step) == [2, 4]
    assert list(pd.read_csv(out / "train_metrics.csv").step) == [1, 2, 3, 4]
    # Configuration options cannot ride along with --resume (they used to be ignored silently).
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.cli_main(["--resume", str(out / "last.pt"), "--steps", "6", "--laser-tau", "0.2",
                        "--lr", "1e-3", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--lr, --laser-tau would be ignored" in err


@pytest.mark.slow
@pytest.mark.parametrize("lean", [False, True], ids=["reference", "lean"])
def test_demo_command(tmp_path, capsys, lean):
    out = tmp_path / "demo"
    argv = ["--steps", "3", "--out", str(out), "--no-progress"] + (["--lean"] if lean else [])
    assert demo.cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "TOTAL" in text and "LASER" in text and ("(lean_saves)" in text) == lean
    for name in ("sites.csv", "summary.csv", "demo.png", "laser_report.csv"):
        assert (out / name).exists(), name
    sites = pd.read_csv(out / "sites.csv").set_index("site")
    assert "(unattributed)" not in sites.index  # every byte the plain arm saved is attributed
    # lean: the SwiGLU products are no longer saved at all (no '...mlp#2' site)
    plain_sites = pd.read_csv(out / "plain_saved.csv").site
    assert any(s.endswith(".mlp#2") for s in plain_sites) != lean


@pytest.mark.slow
def test_compiled_network_trains_like_eager():
    eager = Trainer(fast_config(steps=2))
    compiled = Trainer(fast_config(steps=2, compile=True))
    for _ in range(2):
        a, b = eager.train_step(), compiled.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert set(eager.model.state_dict()) == set(compiled.model.state_dict())


def test_training_from_a_sudoku_extreme_csv(tmp_path, capsys):
    from laser_triton.data import sudoku

    p, s = sudoku.generate(12, seed=5, clues=50)
    csv = tmp_path / "train.csv"
    sudoku.write_sudoku_csv(csv, p, s)
    out = tmp_path / "run"
    model = [f"{k}={v}" for k, v in FAST_MODEL.items()]
    assert train.cli_main(["--data", str(csv), "--test-puzzles", "4", "--steps", "1",
                           "--batch-size", "4", "--eval-batch-size", "4", "--out", str(out),
                           "--no-progress", "--model", *model]) == 0
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["data"] is None and state["config"]["data"] == str(csv)  # re-read on resume
    capsys.readouterr()
    assert evaluate.cli_main([str(out / "last.pt"), "--data", str(csv), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["puzzles"] == 12
