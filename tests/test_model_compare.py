"""`laser-triton bench compare` (perf/compare.py): a GPU run's measured kernel times next to
the static model's prediction at the same shapes, and its place in the report.

The measured CSV here is synthetic: made-up timings in the layout perf/bench_kernels.py
writes, labelled as such in its `gpu` column. One shape (N = 65,536, the bench's, not the
audit's 87,000; 512 x 32, bf16) is compiled for sm_90, cached by Triton after the first run.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("triton")
from laser_triton.kernels._audit import audit  # noqa: E402
from laser_triton.kernels.configs import ConfigStore  # noqa: E402

from laser_triton.tools import bench  # noqa: E402

PERF = Path(__file__).resolve().parents[1] / "perf"
N, D, R = 65_536, 512, 32
GPU = "NVIDIA H200 (SYNTHETIC: made-up timings)"


@pytest.fixture(scope="module")
def compare():
    return bench.load_module(PERF, "compare")


def _measured_rows() -> list[dict]:
    base = dict(layout="channel", gpu=GPU, N=N, D=D, r=R, dtype="bfloat16",
                coeff_dtype="bfloat16", valid_timing=True, error=math.nan, frac_of_roofline=0.5,
                speedup_vs_torch=2.0, gbps=1000.0, frac_of_copy_bw=0.25, rel_err=1e-6,
                target_ms=math.nan, torch_version="2.x", triton_version="3.6.0",
                date="2026-12-01")
    return [
        # reconstruct: graph and eager -> one compared row
        dict(base, kernel="reconstruct", provider="triton", mode="graph", ms_median=0.040),
        dict(base, kernel="reconstruct", provider="triton", mode="eager", ms_median=0.055),
        dict(base, kernel="reconstruct", provider="torch", mode="graph", ms_median=0.100),
        # compress_pass: the graph capture failed (an error row), eager timed -> eager only
        dict(base, kernel="compress_pass", provider="triton", mode="graph", ms_median=math.nan,
             error="RuntimeError: capture failed"),
        dict(base, kernel="compress_pass", provider="triton", mode="eager", ms_median=0.070),
        # a CPU row (invalid timing) at another N: skipped, never compared
        dict(base, kernel="reconstruct", provider="triton", mode="cpu-wall", ms_median=5.0,
             valid_timing=False, N=1024),
    ]


@pytest.fixture(scope="module")
def compared(compare, tmp_path_factory):
    d = tmp_path_factory.mktemp("h200_synthetic")
    pd.DataFrame(_measured_rows()).to_csv(d / "kernels.csv", index=False)
    assert compare.main(["--measured", str(d / "kernels.csv")]) == 0
    return d


def _predicted_reconstruct_s(model) -> float:
    """What perf/audit.py predicts for the reconstruct the bench times at (N, D, R), bf16 X
    and C, computed here from its parts: the kernel with an H200's config. The bench reuses
    one basis, split into bf16 halves by its first (untimed) call: no split launch, no gap."""
    store = ConfigStore("NVIDIA H200", interpreter=False)
    first = model.op_steps(store, "reconstruct", N, D, R, "bf16")
    assert [k for k, _, _ in first] == ["split_basis", "reconstruct"]  # a new basis
    steps = model.op_steps(store, "reconstruct", N, D, R, "bf16", basis_split=True)
    assert [k for k, _, _ in steps] == ["reconstruct"]
    (kernel, cfg, _), = steps
    f = audit(kernel, D, R, "bf16", cfg, N=N)
    return model.predict(f, model.kernel_work(kernel, N, D, R, "bf16", cfg))["t"]


def test_rows_joins_and_ratios(compare, compared):
    out = pd.read_csv(compared / "model_compare.csv")
    assert list(out.columns) == compare.COLUMNS
    assert sorted(out.op) == ["compress_pass", "reconstruct"]  # torch and CPU rows skipped
    rec = out[out.op == "reconstruct"].iloc[0]
    assert (rec.N, rec.D, rec.r, rec["dtype"], rec.coeff) == (N, D, R, "bf16", "bf16")
    assert rec.measured_graph_us == pytest.approx(40.0) and rec.measured_eager_us == pytest.approx(55.0)
    model = compare.audit
    pred_us = _predicted_reconstruct_s(model) * 1e6
    assert rec.predicted_us == pytest.approx(pred_us, rel=1e-3)
    assert rec.measured_over_predicted == pytest.approx(40.0 / pred_us, rel=1e-3)
    assert rec.eager_over_predicted == pytest.approx(55.0 / pred_us, rel=1e-3)
    roof_us = model.roofline("reconstruct", N, D, R, "bf16", "bf16") * 1e6
    assert rec.roofline_us == pytest.approx(roof_us, rel=1e-3)
    assert rec.measured_fraction == pytest.approx(roof_us / 40.0, rel=1e-3)
    assert rec.predicted_fraction == pytest.approx(roof_us / pred_us, rel=1e-3)
    assert rec.bench_frac_of_roofline == 0.5 and rec.launch_gaps_us == 0
    assert rec.kernels.startswith("reconstruct:") and " + " not in rec.kernels
    assert rec.dominant_kernel == "reconstruct" and rec.bound in rec.kernels
    assert isinstance(rec.note, float)  # empty: measured on an H200 with graph timing
    # eager only: kept with its eager ratio, no graph ratio, and said so
    cp = out[out.op == "compress_pass"].iloc[0]
    assert math.isnan(cp.measured_graph_us) and math.isnan(cp.measured_over_predicted)
    assert cp.eager_over_predicted == pytest.approx(70.0 / cp.predicted_us, rel=1e-3)
    assert "eager only" in cp.note and cp.kernels.endswith("us/" + cp.kernels.split("/")[-1])
    assert cp.kernels.split(" + ")[-1].startswith("compress_finish:")


def test_summary_by_bound_takes_graph_rows_only(compare, compared):
    out = pd.read_csv(compared / "model_compare.csv")
    summary = pd.read_csv(compared / "model_compare_summary.csv")
    rec = out[out.op == "reconstruct"].iloc[0]
    assert list(summary.bound) == [rec.bound, "all"]
    assert (summary.shapes == 1).all()
    assert summary.median_ratio.iloc[0] == pytest.approx(rec.measured_over_predicted, rel=1e-2)
    assert summary.assumption.iloc[0] == compare.assumptions()[rec.bound]


def test_report_shows_the_comparison(compared):
    report = bench.load_script(PERF, "report")
    assert report.main(["--results", str(compared), "--no-plots"]) == 0
    text = (compared / "SUMMARY.md").read_text()
    assert "The performance model against this run" in text
    assert "| bound | rests on | shapes | median |" in text
    assert "1 shape(s) timed in eager mode only" in text


def test_cpu_dry_run_gives_no_rows_and_says_why(compare, tmp_path, capsys):
    """bench kernels on CPU (valid_timing False): nothing compared, nothing written."""
    kernels = bench.load_script(PERF, "kernels")
    csv = tmp_path / "kernels.csv"
    assert kernels.main(["--out", str(csv), "--quick", "--rows", "100", "--hidden", "64",
                         "--rank", "4", "--no-orth", "--providers", "triton"]) == 0
    assert not pd.read_csv(csv).valid_timing.any()
    capsys.readouterr()
    assert compare.main(["--measured", str(csv)]) == 1
    err = capsys.readouterr().err
    assert "no Triton rows with valid timing" in err and "valid_timing False" in err
    assert not (tmp_path / "model_compare.csv").exists()


def test_orthonormalize_rows_take_their_batch_as_sites(compare, monkeypatch):
    """bench's `orthonormalize_x32` (N = 32) is one call over 32 sites; the per-launch
    times and bounds come from audit_orth's model row."""
    calls = []

    def audit_call(store, D, r, sites, label, audit, check):
        calls.append((D, r, sites))
        return [], {"predicted_us": 50.0, "kernels": "orth_gram(WITH_Z=True):6.0us/memory + "
                    "orth_factor(MODE=repair):30.0us/one program + orth_apply(REPAIR=True):"
                    "4.0us/issue"}, 0

    fake = types.SimpleNamespace(audit_call=audit_call, CPI=1.5, FP64_MMA=67e12)
    monkeypatch.setattr(compare.audit, "_orth_module", lambda: fake)
    measured = pd.DataFrame([dict(kernel="orthonormalize_x32", provider="triton", mode=mode,
                                  layout="batched", gpu=GPU, N=32, D=512, r=64,
                                  dtype="bfloat16", valid_timing=True, error=math.nan,
                                  ms_median=ms, frac_of_roofline=math.nan)
                             for mode, ms in (("graph", 0.1), ("eager", 0.2))])
    points, skipped = compare.measured_points(measured)
    assert skipped == {} and len(points) == 1
    point = points.iloc[0].to_dict()
    assert (point["dtype"], point["coeff"]) == ("fp32", "")  # fp32 bases, no C
    row = compare.compare_row(point, compare.predict_point(None, point))
    assert calls == [(512, 64, 32)]
    # the kernels (50 us) + the bench's pack copy of 32 bases and its launch gap
    pack_us = 2 * 32 * 512 * 64 * 4 / compare.audit.BW * 1e6
    assert row["predicted_us"] == pytest.approx(50.0 + pack_us + 2.0)
    assert row["kernels"].startswith(f"pack(torch.cat):{pack_us:.1f}us/memory + orth_gram")
    assert row["measured_over_predicted"] == pytest.approx(100.0 / row["predicted_us"])
    assert row["bound"] == "one program" and row["dominant_kernel"] == "orth_factor(MODE=repair)"
    assert row["launch_gaps_us"] == pytest.approx(6.0) and math.isnan(row["measured_fraction"])
    single = compare.predict_point(None, dict(point, kernel="orthonormalize", N=1))
    assert calls[-1] == (512, 64, 1) and len(single["parts"]) == 4
