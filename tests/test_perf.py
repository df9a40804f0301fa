"""CPU smoke tests of the benchmarks, the report and the GPU check script (perf/).

They prove the scripts run end to end and that their byte accounting is consistent; they
time nothing (benchmarks report ratios measured side by side on a GPU, never timed tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from laser_triton.tools import bench

PERF = Path(__file__).resolve().parents[1] / "perf"
ISSUE_KERNEL_COLUMNS = ["kernel", "provider", "gpu", "N", "D", "r", "dtype", "ms_median", "ms_p20",
                        "ms_p80", "gbps", "frac_of_copy_bw", "frac_of_roofline",
                        "speedup_vs_torch", "torch_version", "triton_version", "date"]
ISSUE_TRM_COLUMNS = ["preset", "scope", "variant", "gpu", "batch", "peak_mem_mib",
                     "activation_mib", "step_ms", "mem_ratio_vs_plain", "time_ratio_vs_plain"]


@pytest.fixture(scope="module")
def scripts():
    mods = {name: bench.load_script(PERF, name) for name in ("kernels", "trm", "report")}
    mods["variants"] = bench.load_module(PERF, "trm_variants")
    mods["report_plots"] = bench.load_module(PERF, "report_plots")
    return mods


def test_bench_cli_finds_perf_and_explains_when_missing(monkeypatch, capsys):
    assert bench.find_perf_dir() == PERF
    monkeypatch.setattr(bench, "find_perf_dir", lambda: None)
    assert bench.cli_main(["report"]) == 2
    assert "source checkout" in capsys.readouterr().err
    assert bench.cli_main(["nonsense"]) == 2


def test_bench_kernels_quick(scripts, tmp_path):
    out = tmp_path / "kernels.csv"
    # One tiny shape through all three providers (Triton under the interpreter), and the
    # orthonormalize cases through the torch providers.
    assert scripts["kernels"].main(["--out", str(out), "--quick", "--rows", "100", "--hidden", "64",
                                    "--rank", "4", "--no-orth"]) == 0
    assert scripts["kernels"].main(["--out", str(tmp_path / "orth.csv"), "--quick", "--rows",
                                    "50", "--hidden", "32", "--rank", "2", "--providers", "torch",
                                    "reference"]) == 0
    df = pd.concat([pd.read_csv(out), pd.read_csv(tmp_path / "orth.csv")])
    assert set(ISSUE_KERNEL_COLUMNS) <= set(df.columns)
    assert (df.gpu == "cpu").all() and not df.valid_timing.any()
    assert df.error.isna().all(), df.error.dropna().tolist()
    cp = df[df.kernel == "compress_pass"]
    assert set(cp.provider) == {"torch", "reference", "triton"}
    assert (df.rel_err < 1e-5).all()  # every provider computes the same function
    orth = df[df.kernel.str.startswith("orthonormalize")]
    assert {"orthonormalize", "orthonormalize_x2"} <= set(orth.kernel)
    assert orth.target_ms.notna().any()


def test_bench_trm_tiny_byte_accounting(scripts, tmp_path):
    out = tmp_path / "trm.csv"
    rc = scripts["trm"].main(["--out", str(out), "--presets", "tiny", "--batch", "tiny=2",
                              "--scopes", "cycle", "--variants", "plain", "ckpt", "sac",
                              "laser_torch", "plain+compile"])
    assert rc == 0
    df = pd.read_csv(out).set_index("variant")
    assert set(ISSUE_TRM_COLUMNS) <= set(df.reset_index().columns)
    assert df.loc["plain+compile", "status"].startswith("skipped")
    ran = df.drop(index="plain+compile")
    assert (ran.status == "ok").all(), ran.status.to_dict()
    assert ran.step_ms.isna().all() and not ran.valid_timing.any()  # no timing claims on CPU
    assert (df.forward_dtype == "bfloat16").all()  # the GPU's forward dtype, also on CPU
    act = ran.activation_mib
    # Checkpointing holds only the calls' inputs, SAC adds the matmul outputs.
    assert act["ckpt"] < act["sac"] < act["plain"]
    # Two independent counts of plain's saved bytes agree: allocations alive after the
    # forward (LiveBytes) and the saved-tensor hooks (SavedTensorCounter), per storage.
    assert 0.9 <= act["plain"] / ran.loc["plain", "saved_mib"] <= 1.15
    assert ran.loc["laser_torch", "saved_mib"] == ran.loc["laser_torch", "laser_stored_mib"]
    # The launch budget columns (issue 13): counted for LASER, absent for the others.
    budget = ["launches_fwd_per_saved", "launches_fwd_per_tensor", "launches_per_step",
              "reconstructs_per_region", "host_syncs_per_step", "host_syncs_reset", "laser_tensors",
              "decision_waits_behind", "final_waits_behind", "held_peak_mib",
              "held_peak_behind_mib"]
    assert ran.loc["laser_torch", budget].notna().all() and ran.loc["laser_torch",
                                                                    "laser_tensors"] > 0
    # With the GPU never catching up, every batch is waited on once: mid-forward or at exit.
    assert ran.loc["laser_torch", "final_waits_behind"] >= 1
    assert ran.loc["plain", budget].isna().all()
    assert abs(ran.loc["sac", "act_ratio_vs_plain"] - act["sac"] / act["plain"]) < 1e-9
    sites = pd.read_csv(tmp_path / "trm_sites.csv")
    assert {"plain", "laser_torch"} <= set(sites.variant)
    plain_sites = sites[sites.variant == "plain"]
    assert abs(plain_sites.raw_bytes.sum() / 2**20 - ran.loc["plain", "saved_mib"]) < 1e-6


def test_plan_puts_the_headline_first(scripts):
    order = scripts["trm"].plan(["a", "b"], ["step", "cycle"],
                                ["plain", "plain+compile", "ckpt+compile"])
    assert order[:3] == [("a", "step", "plain"), ("a", "step", "plain+compile"),
                         ("a", "step", "ckpt+compile")]
    assert order[-1][2] == "ckpt+compile" and len(order) == 12


def test_live_bytes_counts_each_storage_once_and_its_peak(scripts):
    live_bytes = scripts["variants"].LiveBytes
    with live_bytes() as live:
        a = torch.ones(1000)  # 4000 bytes
        v = a.view(10, 100).t()  # a view: no new storage
        b = a * 2
        assert live.live() == 8000
        del b
        c = torch.ones(500)
        assert live.live() == 6000 and live.peak == 8000
        a.add_(1)  # in place: nothing new
        assert live.live() == 6000
    del v, c


def test_report_from_synthetic_csvs(scripts, tmp_path):
    """A CPU set alone says GPU results are pending; a GPU-shaped set gets goals and plots."""
    report = scripts["report"]
    common = dict(torch_version="2.x", triton_version="3.6.0", date="2026-01-01")
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    pd.DataFrame([dict(preset="tiny", scope="step", variant=v, compiled=False, gpu="cpu",
                       batch=2, peak_mem_mib=p, activation_mib=a, step_ms=float("nan"),
                       act_ratio_vs_plain=a / 10, mem_ratio_vs_plain=p / 20, status="ok",
                       **common) for v, p, a in (("plain", 20, 10), ("ckpt", 8, 1))] +
                 [dict(preset="tiny+lean", scope="step", variant=v, compiled=False, gpu="cpu",
                       batch=2, peak_mem_mib=p, activation_mib=a, step_ms=float("nan"),
                       act_ratio_vs_plain=a / 5, mem_ratio_vs_plain=p / 15, status="ok",
                       **common) for v, p, a in (("plain", 15, 5), ("laser_torch", 10, 2))]
                 ).to_csv(cpu / "trm.csv", index=False)
    assert report.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "GPU results are pending" in text and "no timing claims" in text
    assert "against plain `tiny`: plain 0.50x, laser_torch 0.20x." in text
    # A set without a forward_dtype column ran fp32 on CPU: the summary says ratios do not
    # carry over to a GPU, and that held bytes are not the peak.
    assert "float32 (not recorded" in text and "do not carry over" in text
    assert "decides an out-of-memory error" in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- perf-summary:begin -->\nold\n<!-- perf-summary:end -->\nrest\n")
    assert report.main(["--results", str(tmp_path), "--readme", str(readme), "--no-plots"]) == 0
    block = readme.read_text()
    assert block.startswith("intro\n") and block.endswith("rest\n") and "old" not in block
    assert "`tiny+lean` (batch 2): plain 0.50x (peak 0.75x); laser_torch 0.20x" in block
    assert (cpu / "trm_memory_time.png").is_file()

    gpu = tmp_path / "synthetic_gpu"
    gpu.mkdir()
    rows = []
    for v, p, a, ms in (("plain", 100, 80, 10.0), ("plain+compile", 80, 60, 5.0),
                        ("laser_triton+compile", 50, 20, 5.5), ("ckpt", 30, 4, 13.0)):
        rows.append(dict(preset="paper_sudoku", scope="step", variant=v, gpu="SYNTHETIC GPU",
                         compiled="compile" in v, batch=768, peak_mem_mib=p, activation_mib=a,
                         act_peak_mib=a,
                         step_ms=ms, act_ratio_vs_compiled_plain=a / 60,
                         time_ratio_vs_compiled_plain=ms / 5.0, status="ok", **common))
    rows.append(dict(preset="paper_sudoku+lean", scope="step", variant="laser_triton",
                     gpu="SYNTHETIC GPU", compiled=False, batch=768, peak_mem_mib=40,
                     activation_mib=12, act_peak_mib=15, step_ms=6.0, status="ok", **common))
    pd.DataFrame(rows).to_csv(gpu / "trm.csv", index=False)
    k = [dict(kernel=kn, provider=pr, mode="graph", layout="channel", gpu="SYNTHETIC GPU", N=65536,
              D=512, r=32, ms_median=ms, bytes=7e7, flops=4.3e9, copy_gbps=4000.0,
              matmul_tflops=700.0, frac_of_roofline=0.5, speedup_vs_torch=1.0, rel_err=1e-6,
              frac_of_copy_bw=0.25, target_ms=float("nan"), gbps=1000.0, error=float("nan"),
              **common)
         for kn in ("compress_pass", "reconstruct", "orthonormalize")
         for pr, ms in (("torch", 0.1), ("triton", 0.03))]
    pd.DataFrame(k).to_csv(gpu / "kernels.csv", index=False)
    assert report.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "GPU results: `synthetic_gpu`" in text
    assert "peak activation memory 0.33x (goal <= 0.4)" in text and "**met**" in text
    assert "ckpt 1.30x time at 0.05x peak activation" in text
    assert "`paper_sudoku+lean` vs compiled plain: peak activation memory 0.25x, step time 1.20x" in text
    assert "| r=32 |" in text and "orthonormalize (fp32 output)" in text
    assert (gpu / "kernels_roofline.png").is_file() and (gpu / "trm_memory_time.png").is_file()


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(PERF / "gpu_check.sh")], check=True)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The whole GPU script in its smallest CPU form (about a minute on 2 idle cores)."""
    env = {**os.environ, "OUT": str(tmp_path), "QUICK": "1", "AUTOTUNE": "0",
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(PERF / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"gpu_check.log", "tests_gpu.txt", "trm.csv", "trm_sites.csv", "kernels.csv",
            "SUMMARY.md"} <= names and len(names) <= 8
    assert "rc=124" not in proc.stdout  # no section ran out of time
    trm = pd.read_csv(tmp_path / "trm.csv")
    assert (trm[~trm.variant.str.endswith("+compile")].status == "ok").all()


@pytest.mark.slow
def test_bench_trm_compiled_variants_on_cpu(scripts, tmp_path):
    """The +compile path (network compiled, LASER's hooks outside) through AOTAutograd's
    aot_eager backend: the compiled Function's saves still reach LASER."""
    out = tmp_path / "trm.csv"
    assert scripts["trm"].main(["--out", str(out), "--presets", "tiny", "--batch", "tiny=2",
                                "--scopes", "cycle", "--variants", "plain+compile",
                                "laser_torch+compile", "--compile-backend", "aot_eager"]) == 0
    df = pd.read_csv(out).set_index("variant")
    assert (df.status == "ok").all(), df.status.to_dict()
    assert df.compile_stats.str.contains("breaks=0").all()
    assert df.loc["laser_torch+compile", "laser_stored_mib"] < \
        df.loc["laser_torch+compile", "laser_raw_mib"]


def test_auto_batch_failure_falls_back(scripts, monkeypatch, capsys):
    """A failing batch probe must not lose the benchmark before its first row."""
    trm = scripts["trm"]

    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(trm, "auto_batch", broken)
    args = type("A", (), {"time_budget": 100.0})()
    cfg = trm.preset_config("tiny+lean")
    assert cfg.lean_saves
    assert trm.safe_auto_batch("tiny", cfg, torch.device("cpu"), args) == trm.AUTO_BATCH_FALLBACK
    assert "automatic batch failed (error: RuntimeError" in capsys.readouterr().out


def test_orthonormalization_comparison(tmp_path):
    """perf/orth_compare.py: CholeskyQR2 orthonormalizes in 2 rounds where Newton-Schulz needs
    many steps, and Muon's quintic does not orthonormalize (the recorded verdict)."""
    orth_compare = bench.load_module(PERF, "orth_compare")

    out = tmp_path / "orth.csv"
    assert orth_compare.main(["--out", str(out), "--D", "96", "--r", "5", "16",
                              "--decades", "1", "3", "--drift", "0.1"]) == 0
    df = pd.read_csv(out)
    chol = df[df.method == "cholqr2"]
    assert chol.converged.all() and (chol.orth_err <= 1e-6).all() and (chol.span_err <= 1e-5).all()
    ns = df[(df.method == "ns_cubic_fp32") & (df.decades == 3)]
    assert ns.converged.all() and (ns.steps >= 10).all()
    assert not df[df.method == "muon_quintic_bf16"].converged.any()
    assert "Verdict" in out.with_suffix(".md").read_text()


def test_learned_structural_ratios_are_against_plain_tiny_of_the_same_weights():
    ls = bench.load_module(PERF, "learned_structural")
    rows = []
    for kind, scale in (("untrained", 1.0), ("trained", 2.0)):
        for preset, variant, act, peak in (("tiny", "plain", 10, 20), ("tiny", "laser_torch", 8, 22),
                                           ("tiny+lean", "plain", 5, 12),
                                           ("tiny+lean", "laser_torch", 2, 11)):
            rows.append(dict(weights_kind=kind, tau=0.05, preset=preset, variant=variant,
                             activation_mib=act * scale, peak_mem_mib=peak * scale,
                             forward_dtype="bfloat16", status="ok"))
    t = ls.table(pd.DataFrame(rows)).set_index(["weights", "preset", "variant"])
    for kind in ("untrained", "trained"):
        assert t.loc[(kind, "tiny", "plain"), "held_vs_plain"] == 1.0
        assert t.loc[(kind, "tiny+lean", "plain"), "held_vs_plain"] == pytest.approx(0.5)
        assert t.loc[(kind, "tiny+lean", "laser_torch"), "peak_vs_plain"] == pytest.approx(0.55)
    assert "| trained | 0.05 | tiny | laser_torch | 0.80x | 1.10x |" in ls.markdown(
        t.reset_index(), "ckpt")
    sweep = pd.DataFrame([dict(tau=0.05, held_vs_plain=0.8, peak_vs_plain=1.1, grad_cos=0.9995,
                               grad_cos_min=0.999, grad_cos_noise=0.3)])
    assert "| 0.05 | 0.80x | 1.10x | 0.99950 | 0.99900 | 0.300 |" in ls.markdown(
        t.reset_index(), "ckpt", sweep)


def test_trm_plot_is_a_grid_not_a_strip(scripts, tmp_path):
    """Seven (preset, scope) panels lay out in rows of at most three, readable at a glance
    (one row of twelve made a 7260x495 px strip)."""
    from matplotlib.image import imread

    rows = [dict(preset=f"p{i}", scope="step", variant=v, compiled=False, peak_mem_mib=p,
                 activation_mib=a, step_ms=float("nan"), status="ok")
            for i in range(7) for v, p, a in (("plain", 20, 10), ("ckpt", 8, 1))]
    path = tmp_path / "trm.png"
    scripts["report_plots"].plot_trm(pd.DataFrame(rows), path, "seven panels")
    height, width = imread(path).shape[:2]
    assert width <= 3 * 5.5 * 110 + 1 and 0.5 < width / height < 2.5, (width, height)


def test_tau_sweep_gradient_cosine_is_exact_at_tau_zero(tmp_path):
    from laser_triton.tools.trainer import Trainer
    from laser_triton.tools.training import TrainConfig

    ls = bench.load_module(PERF, "learned_structural")
    cfg = TrainConfig.for_preset("tiny", steps=1, batch_size=8, train_puzzles=16, test_puzzles=8,
                                 eval_batch_size=8,
                                 model={"L_cycles": 2, "H_cycles": 1, "halt_max_steps": 2,
                                        "num_layers": 1})
    tr = Trainer(cfg)
    tr.train_step()
    tr.save(str(tmp_path / "last.pt"))
    exact = ls.grad_cosines(tmp_path / "last.pt", 0.0, probes=1)
    lossy = ls.grad_cosines(tmp_path / "last.pt", 0.5, probes=1)
    assert exact["grad_cos"] == pytest.approx(1.0, abs=1e-12)  # tau 0: bit-identical gradients
    assert lossy["grad_cos"] < 1.0 - 1e-9 and -1.0 < lossy["grad_cos_noise"] < 1.0
