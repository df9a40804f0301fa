"""Tensor-core (bf16x3) compress_pass and reconstruct against fp64, in the interpreter.

The GPU default splits the fp32 basis (and C, and a non-bf16 X) into bf16 halves and sums the
significant products with fp32 accumulation. These tests run exactly that math (the
interpreter computes the bf16 halves' products in fp32, the same values) with NaN-poisoned
outputs, and cover the fused design's rank tiles (J > 1), which the default configs only use
when a store entry asks for them.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import random_orthonormal

pytest.importorskip("triton")
from laser_triton.kernels import _common, compress_pass, configs, reconstruct  # noqa: E402
from laser_triton.kernels._basis import split_basis  # noqa: E402

from laser_triton.validation import DTYPE_NAMES  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")]
CP = sys.modules["laser_triton.kernels.compress_pass"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SPLIT_REL = 2e-5  # bf16x3: about 2^-17 relative per product, fp32 accumulation


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


@pytest.fixture
def store_entries(tmp_path, monkeypatch):
    """Install {kernel: {key: entry}} as this machine's config file."""
    import json

    def install(kernels: dict) -> None:
        name = configs.sanitize_gpu_name(configs.gpu_name(torch.device(DEV))) + ".json"
        (tmp_path / name).write_text(json.dumps({"triton_version": "x", "kernels": kernels}))
        monkeypatch.setenv("LASER_TRITON_CONFIG_DIR", str(tmp_path))
        monkeypatch.setattr(configs, "_STORES", {})

    return install


def _inputs(N, D, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(N, D, generator=g) * 3).to(dtype).to(DEV)
    U = random_orthonormal(D, r, seed=seed + 1).float().to(DEV)
    return X, U


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def _check(out, X, U):
    Xd, Ud = X.double(), U.double()
    C64 = Xd @ Ud
    rx, rc = Xd.square().sum(1), C64.square().sum(1)
    rel = torch.where(rx > 0, (1 - rc / rx).clamp_min(0), torch.zeros_like(rx))
    assert _rel(out.C, C64) < SPLIT_REL
    assert _rel(out.Y, Xd.t() @ C64) < SPLIT_REL
    assert float(out.e_X) == pytest.approx(float(rx.sum()), rel=1e-5)
    assert float(out.e_C) == pytest.approx(float(rc.sum()), rel=1e-5)
    assert float(out.row_err_max) == pytest.approx(float(rel.max().sqrt()), abs=1e-4)
    assert float(out.c_amax) == pytest.approx(float(C64.abs().max()), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fused_rank_tiles_match_fp64(dtype, store_entries, monkeypatch):
    """r = 40 in rank tiles of 16 (J = 3 programs per row block, the last one ragged), row
    blocks of 64 over 300 rows, 5 finishing row programs (the last-block counter runs)."""
    monkeypatch.setitem(CP.FINISH_CONFIG, "ROWS", 64)
    name = DTYPE_NAMES[dtype]
    store_entries({"compress_fused": {f"D=70,r=40,dtype={name}": {
        "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": 16, "PRECISION": "bf16x3"}},
        "compress_path": {f"D=70,r=40,dtype={name}": "fused"}})
    X, U = _inputs(300, 70, 40, dtype, seed=7)
    out = compress_pass(X, U, True, torch.float32)
    assert CP.fused_programs(300, 70, 40, {**CP.SPEC_FUSED.defaults, "BLOCK_N": 64,
                                             "BLOCK_R": 16}, 4)[1] == 3
    _check(out, X, U)
    again = compress_pass(X, U, True, torch.float32)  # bitwise repeatable
    assert all(torch.equal(a, b) for a, b in zip(tuple.__iter__(out), tuple.__iter__(again)))


@pytest.mark.parametrize("ieee", [False, True])
def test_split_design_c_halves_match_fp64(ieee, store_entries):
    """The split design hands C to its second step as bf16 halves (or fp32 for ieee)."""
    prec = {"PRECISION": "ieee" if ieee else "bf16x3"}
    store_entries({"compress_y": {"D=150,r=20,dtype=bf16": {**prec, "BLOCK_N": 32,
                                                            "BLOCK_D": 64}},
                   "compress_coeff": {"D=150,r=20,dtype=bf16": {"BLOCK_N": 64, "BLOCK_D": 64}},
                   "compress_path": {"D=150,r=20,dtype=bf16": "split"}})
    X, U = _inputs(300, 150, 20, torch.bfloat16, seed=3)
    out = compress_pass(X, U, True, torch.bfloat16)
    _check_y = _rel(out.Y, X.double().t() @ (X.double() @ U.double()))
    assert _check_y < SPLIT_REL  # (step 1 keeps the default bf16x3 products)
    assert out.C.dtype == torch.bfloat16


def test_split_basis_halves():
    U = torch.linalg.qr(torch.randn(90, 33, generator=torch.Generator().manual_seed(1)))[0]
    U = U.to(DEV)
    hi, lo = split_basis(U)  # column-major U
    assert hi.dtype == lo.dtype == torch.bfloat16 and hi.is_contiguous()
    assert torch.equal(hi, U.to(torch.bfloat16))  # round to nearest even, like torch
    assert torch.equal(lo, (U - hi.float()).to(torch.bfloat16))
    err = (hi.double() + lo.double() - U.double()).abs()
    assert bool((err <= 2.0**-17 * U.double().abs()).all())


def test_split_basis_made_under_graph_capture_is_not_cached(monkeypatch):
    """Captured, the split kernel runs only at replay: a cached pair would be read
    uninitialized by calls before the first replay. Not cached then; cached otherwise."""
    import importlib

    basis = importlib.import_module("laser_triton.kernels._basis")
    U = torch.randn(40, 8, generator=torch.Generator().manual_seed(2)).to(DEV)
    monkeypatch.setattr(basis, "_capturing", lambda U: True)
    hi, lo = split_basis(U)
    assert not basis.is_split(U) and basis.split_launches(U) == 1
    assert torch.equal(hi, U.to(torch.bfloat16))
    monkeypatch.setattr(basis, "_capturing", lambda U: False)
    split_basis(U)
    assert basis.is_split(U)


@pytest.mark.parametrize("c_dtype", [torch.bfloat16, torch.float32])
def test_reconstruct_tensor_core_default_matches_fp64(c_dtype):
    assert configs.DEFAULTS["reconstruct"]["PRECISION"] == "bf16x3"
    g = torch.Generator().manual_seed(4)
    C = torch.randn(300, 45, generator=g).to(c_dtype).to(DEV)
    U = torch.linalg.qr(torch.randn(200, 45, generator=g))[0].to(DEV)
    ref = C.double() @ U.double().t()
    assert _rel(reconstruct(C, U, torch.float32), ref) < SPLIT_REL
