"""The static performance model's bounds (perf/audit.py, kernels/_audit.py), without compiling.

The model is an estimate; these tests pin what it charges for: wgmma shapes whose operand
reads outrun shared memory, L2 re-reads of X, U and C, and the loop trips of each kernel.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from helpers import load_source  # noqa: E402
from laser_triton.kernels._audit import Facts, wgmma_clocks, wgmma_efficiency  # noqa: E402
from laser_triton.kernels._spec import SPECS  # noqa: E402

N = 87_000


def _model():
    return load_source("laser_triton_perf_model_test", "perf/audit.py")


def test_wgmma_clocks_charge_shared_memory_reads_of_narrow_shapes():
    ss = " R96, gdesc[UR16].tnspB, R96"  # both operands from shared memory
    assert wgmma_clocks(".64x16x16.F32.BF16", ss) == (8.0, 20.0)  # 2 KiB + 512 B at 128 B/clk
    assert wgmma_clocks(".64x32x16.F32.BF16", ss) == (16.0, 24.0)
    assert wgmma_clocks(".64x128x16.F32.BF16", ss) == (64.0, 64.0)  # math-bound
    rs = " R24, R152, gdesc[UR4], R24"  # A from registers: only B is read from shared memory
    assert wgmma_clocks(".64x32x16.F32.BF16", rs) == (16.0, 16.0)
    assert wgmma_efficiency([(".64x16x16.F32.BF16", ss)]) == 0.4
    assert wgmma_efficiency([]) == 1.0


def _facts(**kw) -> Facts:
    base = dict(kernel="compress_y", config="", regs=64, stack=0, local=0, spill_ops=0,
                shared=0, num_warps=8, hmma=0, hgmma=8, dmma=0, ffma=0, instructions=100,
                loop_body=10, outer_body=0, loop_mma=8, compile_s=0.1, compile_wall_s=0.1)
    return Facts(**{**base, **kw})


def test_predict_takes_the_largest_bound_including_l2_and_wgmma_shapes():
    m = _model()
    work = dict(bytes=1e6, l2_bytes=1e9, flops=1e9, programs=132, outer=132, inner=10)
    p = m.predict(_facts(), work)
    assert p["bound"] == "L2" and p["t"] == pytest.approx(1e9 / m.L2_BW)
    # The same flops in narrow wgmma shapes: the shape bound exceeds flops / peak.
    clk = 1e6
    p = m.predict(_facts(mma_clk_inner=clk), dict(work, l2_bytes=1e6))
    assert p["bound"] == "tensor"
    assert p["t_mma"] == pytest.approx(132 * 10 * clk * 2 / (m.N_SMS * m.MMA_CLOCK))
    assert p["t_mma"] > 1e9 / m.MMA_RATE["HGMMA"]


def test_latency_bound_counts_the_bytes_in_flight():
    """Little's law: one CTA per SM with a 2-stage pipeline keeps one iteration's loads in
    flight; 3 stages keep two, halving the latency bound."""
    m = _model()
    f = _facts(regs=255, num_warps=8, shared=72 * 1024)  # one CTA per SM
    work = dict(bytes=1e8, l2_bytes=1e8, flops=0, programs=132, outer=132, inner=1,
                stream=16 * 1024, stages=2)
    two = m.predict(f, work)
    assert two["t_lat"] == pytest.approx(1e8 * m.HBM_LATENCY_S / (132 * 16 * 1024))
    three = m.predict(f, dict(work, stages=3))
    assert three["t_lat"] == pytest.approx(two["t_lat"] / 2)
    # Smaller CTAs share an SM: twice the resident CTAs, half the bound.
    small = m.predict(_facts(regs=64, num_warps=8, shared=72 * 1024),
                      dict(work, programs=264))
    assert small["t_lat"] == pytest.approx(two["t_lat"] / 2)


def test_l2_traffic_of_the_compress_kernels():
    m = _model()
    x_bytes = N * 512 * 2
    fused = m.kernel_work("compress_fused", N, 512, 32, "bf16", SPECS["compress_fused"].defaults)
    assert fused["l2_bytes"] > 2 * x_bytes  # X for C, X again for Y, plus U per row block
    assert fused["bytes"] < 1.2 * x_bytes  # HBM: X once
    y = SPECS["compress_y"].defaults
    narrow = m.kernel_work("compress_y", N, 3072, 128, "bf16", {**y, "BLOCK_D": 64})
    wide = m.kernel_work("compress_y", N, 3072, 128, "bf16", {**y, "BLOCK_D": 256})
    # every D tile re-reads its segment's C halves: 48 tiles of 64 vs 12 of 256
    assert narrow["l2_bytes"] - wide["l2_bytes"] == pytest.approx(36 * N * 128 * 4, rel=0.05)


def test_reconstruct_is_charged_what_its_programs_read():
    """Persistent programs keep a basis tile for their run of row blocks: in L2 the basis
    crosses once per (program, D tile) visit, C once per D tile, X_hat once; C is charged
    at its stored width and a bf16 C needs 2 MMAs per product, a wider one 3."""
    m = _model()
    cfg = SPECS["reconstruct"].defaults
    D, r = 3072, 128
    w = m.kernel_work("reconstruct", N, D, r, "bf16", cfg)
    n_dt, n_rb = D // cfg["BLOCK_D"], -(-N // cfg["BLOCK_N"])
    P = w["programs"]
    assert P <= 132 * cfg["PROGRAMS_PER_SM"] and P <= w["outer"] <= P + n_dt - 1  # visits
    basis = w["l2_bytes"] - N * D * 2 - n_dt * N * r * 2
    assert basis == w["outer"] * cfg["BLOCK_D"] * r * 4
    assert basis < 0.01 * n_rb * D * r * 4  # the old grid: the basis once per row block
    assert w["bytes"] == N * r * 2 + D * r * 4 + N * D * 2 and w["load_bytes"] < w["bytes"] / 20
    wide = m.kernel_work("reconstruct", N, D, r, "bf16", cfg, coeff="fp32")
    assert wide["bytes"] - w["bytes"] == N * r * 2 and wide["flops"] == 1.5 * w["flops"]
    assert m.roofline("reconstruct", N, D, r, "fp16") == pytest.approx(w["flops"] / m.MMA_RATE["HGMMA"])


def test_finish_is_charged_the_slabs_its_producer_wrote():
    """compress_finish reads one Y slab per program of the launch before it, sized by the
    config that launch ran (the store's), not the built-in defaults. At D = 1536, 64-wide
    D tiles (24 per row segment) leave compress_y 6 row segments on 132 SMs, 256-wide tiles
    22; a fused config with more programs per SM writes more slabs."""
    m = _model()
    y = SPECS["compress_y"].defaults
    cp = m._compress_module()
    work = {}
    for block_d in (64, 256):
        cfg = {**y, "BLOCK_D": block_d}
        work[block_d] = m.kernel_work("compress_finish", N, 1536, 128, "bf16", {},
                                      producer=("compress_y", cfg))
        n_seg = cp.y_segments(N, 1536, 128, cfg, 132)[0]
        assert work[block_d]["bytes"] == n_seg * 1536 * 128 * 4 + 2 * N * 4 + 1536 * 128 * 4
    assert work[64]["bytes"] < work[256]["bytes"]
    fused = SPECS["compress_fused"].defaults
    small = m.kernel_work("compress_finish", N, 512, 16, "bf16", {},
                          producer=("compress_fused", {**fused, "PROGRAMS_PER_SM": 1}))
    big = m.kernel_work("compress_finish", N, 512, 16, "bf16", {},
                        producer=("compress_fused", {**fused, "PROGRAMS_PER_SM": 4}))
    assert small["bytes"] < big["bytes"]
