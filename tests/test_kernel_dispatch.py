"""Which implementation runs and with which tiles: `supports`, the ops backend switch, GPU-sized
blocks from the config store, and the package without Triton (docs/design.md §6.5)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close
from kernel_checks import (
    DEV,
    KERNEL_MARKS,
    check_compress,
    force_path,
    inputs,
    orth_err,
    span_residual,
)

pytest.importorskip("triton")
from laser_triton.kernels import (  # noqa: E402
    compress_pass,
    orthonormalize,
    reconstruct,
    supports,
)

from laser_triton import ops  # noqa: E402

pytestmark = KERNEL_MARKS


def test_small_blocks(use_configs, monkeypatch):
    """GPU-sized blocks: many programs, persistent loops, row segments and Gram tiles."""
    use_configs({
        "compress_fused": {"D=70,r=20,dtype=fp32": {"BLOCK_N": 16, "PROGRAMS_PER_SM": 1}},
        "compress_coeff": {"D=70,r=20,dtype=fp32": {"BLOCK_N": 16, "BLOCK_D": 32}},
        "compress_y": {"D=70,r=20,dtype=fp32": {"BLOCK_N": 16, "BLOCK_D": 32}},
        "reconstruct": {"D=70,r=20,dtype=fp32": {"BLOCK_N": 16, "BLOCK_D": 32}},
        "orth_gram": {"D=70,r=32,dtype=fp32": {"BLOCK_D": 16, "ROWS_PER_CHUNK": 32,
                                               "GRAM_TILE": 16}},
        "orth_apply": {"D=70,r=32,dtype=fp32": {"BLOCK_D": 16}},
    })
    X, U = inputs(60, 70, 20, torch.float32, seed=11)
    for path in ("fused", "split"):
        force_path(monkeypatch, path)
        out = compress_pass(X, U, True, torch.float32)
        check_compress(out, X, U, torch.float32)
    Q, ok = orthonormalize(out.Y)
    assert bool(ok) and orth_err(Q) <= 1e-5 and span_residual(Q, out.Y) <= 1e-5
    X_hat = reconstruct(out.C, U, torch.float32)
    # bf16x3 tensor-core products (the default): about 2^-17 relative per product
    assert_close(X_hat, out.C.double() @ U.double().t(), rtol=1e-5, norm=True)


def test_supports():
    X = torch.randn(10, 512)
    assert supports("compress_pass", X, torch.zeros(512, 64))
    assert not supports("compress_pass", torch.randn(2, 9000), torch.zeros(9000, 8))
    assert not supports("compress_pass", X, torch.zeros(512, 300))
    assert supports("orthonormalize", torch.zeros(512, 64), torch.zeros(96, 5))
    assert supports("orthonormalize", torch.zeros(512, 128))  # every TRM rank (issue 12)
    assert not supports("orthonormalize", torch.zeros(512, 129))
    assert supports("reconstruct", torch.zeros(10, 8, dtype=torch.bfloat16), torch.zeros(512, 8))
    # 32-bit offsets within a row block of the output: wider ones go to torch, and the
    # launcher says why
    wide = torch.zeros(300_000, 8)
    assert not supports("reconstruct", torch.zeros(10, 8), wide)
    with pytest.raises(ValueError, match="300000 rows"):
        reconstruct(torch.zeros(10, 8), wide)
    assert not supports("nonsense", X)


def test_supports_sends_strides_past_32_bit_offsets_to_torch():
    """Columns and ranks are addressed with 32-bit offsets (rows with 64-bit ones): a
    column-major X of 300,000 x 8,000 (stride(1) * 7,999 >= 2^31) or a C whose rank stride is
    that large would wrap silently. Metadata only: meta tensors, nothing allocated."""
    def strided(shape, strides):
        return torch.empty_strided(shape, strides, device="meta")

    N, D = 300_000, 8_000
    U = torch.zeros(D, 64)
    assert supports("compress_pass", strided((N, D), (D, 1)), U)  # row-major: fine
    assert not supports("compress_pass", strided((N, D), (1, N)), U)
    assert supports("compress_pass", strided((100_000, D), (1, 100_000)), U)  # 8e8: fits
    assert not supports("reconstruct", strided((30_000_000, 128), (1, 30_000_000)),
                        torch.zeros(64, 128))
    assert supports("reconstruct", strided((30_000_000, 128), (128, 1)), torch.zeros(64, 128))
    G = strided((1, N, D), (N * D, 1, N))  # a transposed gradient: O's stride is N
    assert not supports("grad_coeff", G, strided((1, N, 16), (N * 16, 16, 1)))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ops_dispatch(backend, monkeypatch):
    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    monkeypatch.setenv("LASER_TRITON_BACKEND", backend)
    calls = []
    kmod = sys.modules["laser_triton.kernels"]
    for name in ("compress_pass", "orthonormalize", "reconstruct"):
        real = getattr(kmod, name)
        monkeypatch.setattr(kmod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    X, U = inputs(50, 130, 6, torch.bfloat16, seed=9)
    assert ops.backend_for("compress_pass", X, U) == backend
    out = ops.compress_pass(X, U, True)
    check_compress(out, X, U, torch.bfloat16)
    Q, ok = ops.orthonormalize(out.Y)
    assert bool(ok) and orth_err(Q) <= 1e-5
    X_hat = ops.reconstruct(out.C, Q, torch.float32)
    assert X_hat.shape == X.shape
    assert calls == (["compress_pass", "orthonormalize", "reconstruct"] if backend == "triton" else [])


def test_import_without_triton_is_clean():
    code = ("import sys; sys.modules['triton'] = None\n"
            "try:\n import laser_triton.kernels\nexcept ImportError as e: print('ImportError', e)\n"
            "from laser_triton import ops; print(ops._triton_kernels())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ImportError") and out.stdout.strip().endswith("None")
