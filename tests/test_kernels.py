"""Triton kernels against float64 computations and the torch reference (I3, DESIGN §2, §6).

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports
Triton, so the real kernels run on CPU tensors. Every output and scratch buffer is poisoned
with NaN before launch (kernels._common.POISON), so an element a kernel fails to write shows up
as a NaN. Shapes are deliberately not multiples of any block size. The default tier is a
representative subset; `-m slow` runs the full grid of the issue.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import random_orthonormal

pytest.importorskip("triton")
from laser_triton.kernels import (  # noqa: E402
    _common,
    compress_pass,
    configs,  # noqa: E402
    orthonormalize,
    orthonormalize_batched,
    reconstruct,
    supports,
)

from laser_triton import ops, reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.interpret,
    # The Triton 3.6 interpreter's own numpy deprecations and masked-lane warnings.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]
CP = sys.modules["laser_triton.kernels.compress_pass"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


@pytest.fixture
def use_configs(tmp_path, monkeypatch):
    """Make the kernels read `kernels` (a {kernel: {key: entry}} map) as this machine's file."""

    def install(kernels: dict) -> None:
        name = configs.sanitize_gpu_name(configs.gpu_name(torch.device(DEV))) + ".json"
        (tmp_path / name).write_text(json.dumps({"triton_version": "x", "kernels": kernels}))
        monkeypatch.setenv("LASER_TRITON_CONFIG_DIR", str(tmp_path))
        monkeypatch.setattr(configs, "_STORES", {})

    return install


# ----------------------------------------------------------------------------- compress_pass


def _fp64_compress(X, U):
    Xd, Ud = X.double(), U.double()
    C = Xd @ Ud
    rx, rc = Xd.square().sum(1), C.square().sum(1)
    rel = torch.where(rx > 0, (1 - rc / rx.clamp_min(1e-300)).clamp_min(0), torch.zeros_like(rx))
    return C, rx.sum(), rc.sum(), Xd.t() @ C, rel.max().sqrt(), C.abs().max()


_C_RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # 1 ulp


def _check_compress(out, X, U, coeff_dtype, need_y=True):
    C64, eX, eC, Y64, row, amax = _fp64_compress(X, U)
    C, e_X, e_C, Y = out
    assert C.dtype == coeff_dtype and C.shape == C64.shape and C.is_contiguous()
    assert e_X.dtype == torch.float32 and e_X.dim() == 0 and out.row_err_max.dim() == 0
    scale = float(C64.abs().max()) + 1e-30
    bound = _C_RTOL[coeff_dtype] * C64.abs() + 1e-5 * scale
    assert bool(((C.double() - C64).abs() <= bound).all()), "C differs beyond one ulp"
    assert float(e_X) == pytest.approx(float(eX), rel=1e-5)
    assert float(e_C) == pytest.approx(float(eC), rel=1e-5, abs=1e-6 * float(eX))
    assert float(out.row_err_max) == pytest.approx(float(row), abs=1e-4)
    assert float(out.c_amax) == pytest.approx(float(amax), rel=1e-5)
    if need_y:
        assert Y.dtype == torch.float32 and Y.shape == (X.shape[1], U.shape[1])
        assert float((Y.double() - Y64).norm() / Y64.norm()) < 1e-5
    else:
        assert Y is None


def _inputs(N, D, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(N, D, generator=g) * 3).to(dtype).to(DEV)
    U = random_orthonormal(D, r, seed=seed + 1).float().to(DEV)
    return X, U


COMPRESS_FAST = [  # (N, D, r, X dtype, coeff dtype, path)
    (37, 96, 5, torch.float32, torch.float32, "fused"),
    (1000, 520, 33, torch.bfloat16, torch.bfloat16, "split"),
    (1, 64, 1, torch.float16, torch.float16, "fused"),
    (1000, 96, 16, torch.float32, torch.bfloat16, "split"),
    (1000, 64, 16, torch.bfloat16, torch.float32, "fused"),
]


def _force_path(monkeypatch, path):
    monkeypatch.setattr(CP, "FUSED_MAX_ELEMS", 1 << 40 if path == "fused" else 0)


@pytest.mark.parametrize("N,D,r,dtype,coeff,path", COMPRESS_FAST)
def test_compress_pass_matches_fp64(N, D, r, dtype, coeff, path, monkeypatch):
    _force_path(monkeypatch, path)
    X, U = _inputs(N, D, r, dtype)
    _check_compress(compress_pass(X, U, True, coeff), X, U, coeff)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,r", [(N, D, r) for N, D, r in itertools.product(
    (1, 37, 1000), (64, 96, 520), (1, 5, 16, 33)) if r <= D])
def test_compress_pass_full_grid(N, D, r, dtype, path, monkeypatch):
    _force_path(monkeypatch, path)
    X, U = _inputs(N, D, r, dtype, seed=N + D + r)
    _check_compress(compress_pass(X, U, True, torch.bfloat16), X, U, torch.bfloat16)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_compress_pass_strides_no_y_and_matches_reference(path, monkeypatch):
    """Column-major U (torch.linalg.qr's layout), a strided X view, need_y=False."""
    _force_path(monkeypatch, path)
    base = torch.randn(300, 2 * 130).to(DEV)
    X = base[:, ::2]  # (300, 130), stride (260, 2)
    U = torch.linalg.qr(torch.randn(130, 7))[0].to(DEV)  # column-major
    assert not X.is_contiguous() and not U.is_contiguous()
    out = compress_pass(X, U, False, torch.bfloat16)
    _check_compress(out, X, U, torch.bfloat16, need_y=False)
    ref = reference.compress_pass(X, U, False, torch.bfloat16)
    for a, b in [(out.e_X, ref.e_X), (out.e_C, ref.e_C), (out.c_amax, ref.c_amax)]:
        assert float(a) == pytest.approx(float(b), rel=1e-5)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_compress_pass_deterministic_and_atomic_option(path, monkeypatch):
    _force_path(monkeypatch, path)
    X, U = _inputs(700, 130, 9, torch.bfloat16, seed=3)
    a, b = compress_pass(X, U), compress_pass(X, U)
    assert all(torch.equal(x, y) for x, y in zip(tuple.__iter__(a), tuple.__iter__(b)))
    fast = compress_pass(X, U, True, None, deterministic=False)
    _check_compress(fast, X, U, torch.bfloat16)


def test_compress_pass_zero_and_nonfinite_rows():
    X, U = _inputs(40, 64, 4, torch.float32)
    X[3] = 0.0
    out = compress_pass(X, U)
    _check_compress(out, X, U, torch.float32)
    Z = torch.zeros_like(X)
    z = compress_pass(Z, U)
    assert float(z.e_X) == 0.0 and float(z.row_err_max) == 0.0 and float(z.c_amax) == 0.0
    X[5, 7] = float("nan")
    bad, ref = compress_pass(X, U), reference.compress_pass(X, U)
    assert torch.isnan(bad.e_X) and torch.isnan(ref.e_X)  # what the tracker tests
    # Like the reference, a row without a positive ||x||^2 (zero or NaN) has no row error.
    assert float(bad.row_err_max) == pytest.approx(float(ref.row_err_max), abs=1e-4)


def test_compress_pass_bf16x3_precision(use_configs, monkeypatch):
    """The hi+lo bf16 split product (a GPU speed option) keeps fp32-class accuracy."""
    split = {"PRECISION": "bf16x3"}
    use_configs({k: {f"D=130,r=9,dtype={d}": split for d in ("bf16", "fp32")}
                 for k in ("compress_coeff", "compress_y", "reconstruct")})
    _force_path(monkeypatch, "split")
    for dtype in (torch.bfloat16, torch.float32):
        X, U = _inputs(200, 130, 9, dtype, seed=5)
        C64, eX, eC, Y64, _, _ = _fp64_compress(X, U)
        out = compress_pass(X, U, True, torch.float32)
        assert float((out.C.double() - C64).norm() / C64.norm()) < 1e-5
        assert float((out.Y.double() - Y64).norm() / Y64.norm()) < 1e-5
        assert float(out.e_C) == pytest.approx(float(eC), rel=1e-5)
        X_hat = reconstruct(out.C, U, torch.float32).double()
        ref = out.C.double() @ U.double().t()
        assert float((X_hat - ref).norm() / ref.norm()) < 1e-5


def test_small_blocks(use_configs, monkeypatch):
    """GPU-sized blocks: many programs, persistent loops, row segments and Gram tiles."""
    use_configs({
        "compress_fused": {"D=70,r=20,dtype=fp32": {"BLOCK_N": 16, "PROGRAMS_PER_SM": 1}},
        "compress_coeff": {"D=70,r=20,dtype=fp32": {"BLOCK_N": 16, "BLOCK_D": 32}},
        "compress_y": {"D=70,r=20,dtype=fp32": {"BLOCK_N": 16, "BLOCK_D": 32}},
        "reconstruct": {"D=70,r=20,dtype=fp32": {"BLOCK_N": 16, "BLOCK_D": 32, "BLOCK_R": 16}},
        "orth_gram": {"D=70,r=32,dtype=fp32": {"BLOCK_D": 16, "ROWS_PER_CHUNK": 32,
                                               "GRAM_TILE": 16}},
        "orth_apply": {"D=70,r=32,dtype=fp32": {"BLOCK_D": 16}},
    })
    X, U = _inputs(60, 70, 20, torch.float32, seed=11)
    for path in ("fused", "split"):
        _force_path(monkeypatch, path)
        out = compress_pass(X, U, True, torch.float32)
        _check_compress(out, X, U, torch.float32)
    Q, ok = orthonormalize(out.Y)
    assert bool(ok) and _orth_err(Q) <= 1e-5 and _span_residual(Q, out.Y) <= 1e-5
    X_hat = reconstruct(out.C, U, torch.float32).double()
    ref = out.C.double() @ U.double().t()
    assert float((X_hat - ref).norm() / ref.norm()) < 1e-6


# ----------------------------------------------------------------------------- reconstruct


@pytest.mark.parametrize("N,D,r,c_dtype,out_dtype", [
    (37, 520, 33, torch.bfloat16, torch.bfloat16),
    (1, 64, 1, torch.float32, torch.float32),
    (1000, 96, 5, torch.float16, torch.float32),
])
def test_reconstruct_matches_fp64(N, D, r, c_dtype, out_dtype):
    C = torch.randn(N, r).to(c_dtype).to(DEV)
    U = torch.linalg.qr(torch.randn(D, r))[0].to(DEV)  # column-major
    out = reconstruct(C, U, out_dtype)
    ref = C.double() @ U.double().t()
    assert out.dtype == out_dtype and out.shape == (N, D) and out.is_contiguous()
    tol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[out_dtype]
    assert bool(((out.double() - ref).abs() <= tol * ref.abs() + 1e-6 * ref.abs().max()).all())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,r", [(N, D, r) for N, D, r in itertools.product(
    (1, 37, 1000), (64, 96, 520), (1, 5, 16, 33)) if r <= D])
def test_reconstruct_full_grid(N, D, r, dtype):
    C = torch.randn(N, r).to(dtype).to(DEV)
    U = random_orthonormal(D, r, seed=D + r).float().to(DEV)
    ref = reference.reconstruct(C, U, torch.float32).double()
    out = reconstruct(C, U, torch.float32).double()
    assert float((out - ref).norm()) <= 1e-6 * float(ref.norm()) + 1e-12


# ----------------------------------------------------------------------------- orthonormalize


def _orth_err(Q):
    Qd = Q.double()
    return float((Qd.t() @ Qd - torch.eye(Q.shape[1], dtype=torch.float64, device=Q.device))
                 .abs().max())


def _span_residual(Q, Y):
    Yd, Qd = Y.double(), Q.double()
    return float((Yd - Qd @ (Qd.t() @ Yd)).norm() / Yd.norm())


def _conditioned(D, r, kappa, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), r, dtype=torch.float64)
    return ((A * s) @ V.t()).float().to(DEV)


@pytest.mark.parametrize("D,r,kappa", [(96, 5, 1.0), (520, 33, 1e4), (130, 16, 1e8)])
def test_orthonormalize_conditioning(D, r, kappa):
    Y = _conditioned(D, r, kappa, seed=r)
    Q, ok = orthonormalize(Y)
    assert Q.dtype == torch.float32 and Q.shape == (D, r) and ok.dtype == torch.bool
    assert bool(ok) and _orth_err(Q) <= 1e-5 and _span_residual(Q, Y) <= 1e-5
    Qr, okr = reference.orthonormalize(Y)
    assert bool(okr) and float((Q - Qr).abs().max()) <= 1e-5  # same R > 0 QR, same Q


@pytest.mark.slow
@pytest.mark.parametrize("kappa", [1.0, 1e2, 1e4, 1e6, 1e7, 1e8])
@pytest.mark.parametrize("D,r", [(64, 1), (64, 16), (96, 5), (520, 33), (520, 64), (200, 128)])
def test_orthonormalize_conditioning_grid(D, r, kappa):
    Y = _conditioned(D, r, kappa, seed=D + r)
    Q, ok = orthonormalize(Y)
    assert bool(ok) and _orth_err(Q) <= 1e-5 and _span_residual(Q, Y) <= 1e-5


def test_orthonormalize_rank_deficient_zero_and_nonfinite_columns():
    Y = _conditioned(130, 12, 10.0, seed=1)
    Y[:, 9] = 2.0 * Y[:, 0] - Y[:, 3]  # exactly dependent
    Y[:, 10] = 0.0  # dead
    Y[5, 11] = float("nan")  # non-finite
    Q, ok = orthonormalize(Y)
    assert bool(ok) and torch.isfinite(Q).all() and _orth_err(Q) <= 1e-5
    live = Y[:, :10]
    assert _span_residual(Q, live) <= 1e-5  # the span of the good columns is kept
    Qr, okr = reference.orthonormalize(Y)  # completed with the same fixed directions
    assert bool(okr) and float((Q - Qr).abs().max()) <= 1e-4


def test_orthonormalize_batched_mixed_shapes():
    Ys = [_conditioned(96, 5, 10.0, 1), _conditioned(520, 33, 1e5, 2),
          _conditioned(64, 16, 1e3, 3).to(torch.bfloat16), _conditioned(200, 1, 1.0, 4)]
    Qs, ok = orthonormalize_batched(Ys)
    assert ok.shape == (4,) and bool(ok.all())
    for Y, Q in zip(Ys, Qs):
        assert Q.shape == Y.shape and _orth_err(Q) <= 1e-5
        Qr, _ = reference.orthonormalize(Y)
        assert float((Q - Qr).abs().max()) <= 1e-5
    Qs, ok = orthonormalize_batched([])
    assert Qs == [] and ok.numel() == 0


def test_completion_matrix_matches_reference():
    from laser_triton.kernels import completion_matrix

    for D, r in [(64, 1), (520, 33)]:
        assert torch.equal(completion_matrix(D, r, torch.device("cpu")),
                           reference.completion_matrix(D, r, torch.device("cpu")))


# ----------------------------------------------------------------------------- dispatch


def test_supports():
    X = torch.randn(10, 512)
    assert supports("compress_pass", X, torch.zeros(512, 64))
    assert not supports("compress_pass", torch.randn(2, 9000), torch.zeros(9000, 8))
    assert not supports("compress_pass", X, torch.zeros(512, 300))
    assert supports("orthonormalize", torch.zeros(512, 64), torch.zeros(96, 5))
    assert not supports("orthonormalize", torch.zeros(512, 128))
    assert supports("reconstruct", torch.zeros(10, 8, dtype=torch.bfloat16), torch.zeros(512, 8))
    assert not supports("nonsense", X)


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
    X, U = _inputs(50, 130, 6, torch.bfloat16, seed=9)
    assert ops.backend_for("compress_pass", X, U) == backend
    out = ops.compress_pass(X, U, True)
    _check_compress(out, X, U, torch.bfloat16)
    Q, ok = ops.orthonormalize(out.Y)
    assert bool(ok) and _orth_err(Q) <= 1e-5
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
