"""compress_pass kernels (fused and split paths) against float64 and the torch reference
(I3; docs/design.md §6.1). The default tier is a representative subset; `-m slow` runs the
full grid.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_close
from kernel_checks import (
    DEV,
    KERNEL_MARKS,
    check_compress,
    force_path,
    fp64_compress,
    inputs,
    param_id,
)

pytest.importorskip("triton")
from laser_triton.kernels import compress_pass, reconstruct  # noqa: E402

from laser_triton import reference  # noqa: E402

pytestmark = KERNEL_MARKS

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
COMPRESS_FAST = [  # (N, D, r, X dtype, coeff dtype, path)
    (37, 96, 5, F32, F32, "fused"),
    (1000, 520, 33, BF16, BF16, "split"),
    (1, 64, 1, F16, F16, "fused"),
    (1000, 96, 16, F32, BF16, "split"),
    (1000, 64, 16, BF16, F32, "fused"),
]


def _case_id(case: tuple) -> str:
    N, D, r, dtype, coeff, path = case
    return f"{N}x{D}-r{r}-x_{param_id(dtype)}-c_{param_id(coeff)}-{path}"


@pytest.mark.parametrize("N,D,r,dtype,coeff,path",
                         [pytest.param(*c, id=_case_id(c)) for c in COMPRESS_FAST])
def test_compress_pass_matches_fp64(N, D, r, dtype, coeff, path, monkeypatch):
    force_path(monkeypatch, path)
    X, U = inputs(N, D, r, dtype)
    check_compress(compress_pass(X, U, True, coeff), X, U, coeff)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=param_id)
@pytest.mark.parametrize("N,D,r", [(N, D, r) for N, D, r in itertools.product(
    (1, 37, 1000), (64, 96, 520), (1, 5, 16, 33)) if r <= D])
def test_compress_pass_full_grid(N, D, r, dtype, path, monkeypatch):
    force_path(monkeypatch, path)
    X, U = inputs(N, D, r, dtype, seed=N + D + r)
    check_compress(compress_pass(X, U, True, BF16), X, U, BF16)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_compress_pass_strides_no_y_and_matches_reference(path, monkeypatch):
    """Column-major U (torch.linalg.qr's layout), a strided X view, need_y=False."""
    force_path(monkeypatch, path)
    base = torch.randn(300, 2 * 130).to(DEV)
    X = base[:, ::2]  # (300, 130), stride (260, 2)
    U = torch.linalg.qr(torch.randn(130, 7))[0].to(DEV)  # column-major
    assert not X.is_contiguous() and not U.is_contiguous()
    out = compress_pass(X, U, False, BF16)
    check_compress(out, X, U, BF16, need_y=False)
    ref = reference.compress_pass(X, U, False, BF16)
    for a, b in [(out.e_X, ref.e_X), (out.e_C, ref.e_C), (out.c_amax, ref.c_amax)]:
        assert float(a) == pytest.approx(float(b), rel=1e-5)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_compress_pass_deterministic_and_atomic_option(path, monkeypatch):
    force_path(monkeypatch, path)
    X, U = inputs(700, 130, 9, BF16, seed=3)
    a, b = compress_pass(X, U), compress_pass(X, U)
    assert all(torch.equal(x, y) for x, y in zip(tuple.__iter__(a), tuple.__iter__(b)))
    fast = compress_pass(X, U, True, None, deterministic=False)
    check_compress(fast, X, U, BF16)


def test_compress_pass_zero_and_nonfinite_rows():
    X, U = inputs(40, 64, 4, F32)
    X[3] = 0.0
    out = compress_pass(X, U)
    check_compress(out, X, U, F32)
    Z = torch.zeros_like(X)
    z = compress_pass(Z, U)
    assert float(z.e_X) == 0.0 and float(z.row_err_max) == 0.0 and float(z.c_amax) == 0.0
    X[5, 7] = float("nan")
    bad, ref = compress_pass(X, U), reference.compress_pass(X, U)
    assert torch.isnan(bad.e_X) and torch.isnan(ref.e_X)  # what the tracker tests
    # Like the reference, a row without a positive ||x||^2 (zero or NaN) has no row error.
    assert float(bad.row_err_max) == pytest.approx(float(ref.row_err_max), abs=1e-4)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_compress_pass_nan_rows_poison_c_amax(path, monkeypatch):
    """A NaN in X makes max |C| NaN (GPU max drops NaN; the kernels test each row's sum of
    squares instead), whichever row block and rank tile it lands in."""
    force_path(monkeypatch, path)
    X, U = inputs(300, 130, 9, BF16, seed=11)
    X[257, 100] = float("nan")  # past the first 256-row block
    out = compress_pass(X, U, True, BF16)
    assert torch.isnan(out.c_amax) and torch.isnan(out.e_C) and torch.isnan(out.e_X)


def test_split_path_rounds_bf16_coefficients_to_nearest(monkeypatch):
    """The split path stores C in bf16 rounded to nearest (its hi half): within half an
    ulp of the fp64 product where the fp32-class product error is negligible; a truncating
    cast (the interpreter's) is off by up to one ulp."""
    force_path(monkeypatch, "split")
    X, U = inputs(400, 150, 24, BF16, seed=12)
    C64 = fp64_compress(X, U)[0]
    C = compress_pass(X, U, True, BF16).C.double()
    big = C64.abs() > 0.1 * C64.abs().max()  # the fp32 product error is < 0.01 ulp there
    ulp = torch.ldexp(torch.ones_like(C64), torch.frexp(C64)[1] - 8)  # bf16: 8-bit significand
    ulps = ((C - C64).abs() / ulp)[big]
    assert big.sum() > 1000 and float(ulps.max()) <= 0.52


def test_compress_pass_bf16x3_precision(use_configs, monkeypatch):
    """The hi+lo bf16 split product (a GPU speed option) keeps fp32-class accuracy."""
    split = {"PRECISION": "bf16x3"}
    use_configs({k: {f"D=130,r=9,dtype={d}": split for d in ("bf16", "fp32")}
                 for k in ("compress_coeff", "compress_y", "reconstruct")})
    force_path(monkeypatch, "split")
    for dtype in (BF16, F32):
        X, U = inputs(200, 130, 9, dtype, seed=5)
        C64, eX, eC, Y64, _, _ = fp64_compress(X, U)
        out = compress_pass(X, U, True, F32)
        assert_close(out.C, C64, rtol=1e-5, norm=True, msg="C:")
        assert_close(out.Y, Y64, rtol=1e-5, norm=True, msg="Y:")
        assert float(out.e_C) == pytest.approx(float(eC), rel=1e-5)
        X_hat = reconstruct(out.C, U, F32)
        assert_close(X_hat, out.C.double() @ U.double().t(), rtol=1e-5, norm=True, msg="X_hat:")
