"""Compile cost: every kernel variant LASER launches at the TRM's shapes compiles for sm_90 in
under 10 s of CPU time, so a fresh GPU's first training steps do not stall for minutes.

Measured with the cache-warming tool (`python -m laser_triton.kernels._warm`) into an empty
Triton cache: one variant per kernel and constexpr set (which int arguments are divisible by
16 multiplies the variants but hardly changes their cost). CPU seconds (compiler + ptxas)
rather than wall time, which a busy CI machine inflates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRM_WIDTHS = ["128", "256", "512", "1024", "1536", "3072"]  # tiny and paper presets
TRM_RANKS = ["16", "32", "64", "128", "136"]  # every padded rank up to max_rank + oversample
MAX_CPU_S = 10.0


@pytest.mark.slow
def test_every_trm_kernel_variant_compiles_for_sm90_in_under_10s(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # really compile, no cache hits
    out = tmp_path / "compile_times.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "laser_triton.kernels._warm", "--hidden", *TRM_WIDTHS,
         "--rank", *TRM_RANKS, "--rows", "776", "--representative", "--jobs", "1",
         "--csv", str(out)], capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_csv(out)
    assert len(df) >= 40 and df.error.isna().all(), df[df.error.notna()]
    for kernel in ("_compress_fused_kernel", "_compress_coeff_kernel", "_reconstruct_kernel",
                   "_orth_factor_kernel", "_grad_coeff_kernel"):
        assert (df.kernel == kernel).any(), kernel
    slow = df[df.cpu_seconds > MAX_CPU_S]
    assert slow.empty, slow[["cpu_seconds", "seconds", "variant"]].to_string()
