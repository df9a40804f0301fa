"""compress_pass's TMA design (kernels/compress_tma.py) against float64, NaN-poisoned outputs.

Under TRITON_INTERPRET=1 the tensor descriptor is read by Triton's interpreter (rows past N
and columns past D come back as zeros, as TMA fills them). Each test checks that the TMA
kernel itself ran (a spy on its launch), at shapes that are not multiples of its blocks.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_checks import DEV, KERNEL_MARKS, check_compress, fp64_compress, inputs

pytest.importorskip("triton")
from laser_triton.kernels import compress_pass  # noqa: E402

pytestmark = KERNEL_MARKS

CP = importlib.import_module("laser_triton.kernels.compress_pass")
TMA = importlib.import_module("laser_triton.kernels.compress_tma")
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def tma_runs(monkeypatch):
    """compress_pass takes the TMA path wherever it fits; returns the list of its launches."""
    size_rule = CP.choose_path

    def choose(D, r, dtype, device, store=None, coeff="bf16"):
        return "tma" if TMA.tma_fits(D, r, dtype) else size_rule(D, r, dtype, device, store,
                                                                  coeff)

    monkeypatch.setattr(CP, "choose_path", choose)
    launches, kernel = [], CP._compress_tma_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(CP, "_compress_tma_kernel", Spy())
    return launches


CASES = [  # (N, D, r, X dtype, coeff dtype): two 256-wide column tiles, one tile wider
    (1037, 512, 33, BF16, BF16),  # than D, r = 64, fp16 X (fp16 halves of U and C)
    (300, 136, 8, BF16, F32),
    (77, 264, 24, BF16, BF16),
    (1, 512, 64, BF16, BF16),
    (1037, 512, 33, F16, F16),
    (300, 264, 64, F16, BF16),
]


@pytest.mark.parametrize("N,D,r,dtype,coeff", CASES,
                         ids=[f"{n}x{d}-r{r}-{str(t)[6:]}" for n, d, r, t, _ in CASES])
def test_tma_kernel_matches_fp64(N, D, r, dtype, coeff, tma_runs):
    X, U = inputs(N, D, r, dtype, seed=N + D + r)
    check_compress(compress_pass(X, U, True, coeff), X, U, coeff)
    assert len(tma_runs) == 1


def test_fp16_x_keeps_its_accuracy_at_any_magnitude(tma_runs):
    """fp16 X: C's fp16 halves are scaled per row block by a power of two, so |C| beyond
    fp16's range (65504; here ~2.7e5) and tiny rows (1e-4) both keep fp32-class Y; the later,
    larger blocks rescale the sums of the earlier ones."""
    X, U = inputs(600, 512, 16, F16, seed=21)
    X = X.float()
    X[:200] *= 1e-4 / 3
    X[400:] = X[400:].sign() * 60000.0
    X = X.half()
    out = compress_pass(X, U, True, F32)
    assert float(out.C.abs().max()) > 2 * 65504
    check_compress(out, X, U, F32)
    # Zero rows first (the unit stays at its floor, 2^-126), then rows with |C| ~ 4e4: the
    # unit grows by 2^128, beyond fp32's normal range; the (zero) earlier sums must stay
    # zero, not become 0 x inf = NaN
    X2 = torch.zeros_like(X)
    noise = torch.randn(88, 512, generator=torch.Generator().manual_seed(4)) * 530.0
    X2[512:] = (40000.0 * U[:, 0].double().cpu() + noise).half().to(X.device)
    out = compress_pass(X2, U, True, F32)
    assert 32768 <= float(out.C.abs().max()) < 65536
    check_compress(out, X2, U, F32)
    assert len(tma_runs) == 2


def test_tma_kernel_without_y_column_major_basis_and_nan_rows(tma_runs):
    """need_y=False; torch.linalg.qr's column-major U; a NaN in a later row block poisons
    max |C|, e_C and e_X as on the other paths."""
    X, _ = inputs(400, 200, 12, F16, seed=5)
    U = torch.linalg.qr(torch.randn(200, 12, dtype=torch.float64))[0].float().to(DEV)
    assert not U.is_contiguous()
    check_compress(compress_pass(X, U, False, F16), X, U, F16, need_y=False)
    X[333, 150] = float("nan")
    out = compress_pass(X, U, True, F16)
    assert torch.isnan(out.c_amax) and torch.isnan(out.e_C) and torch.isnan(out.e_X)
    assert len(tma_runs) == 2


def test_tma_kernel_is_repeatable_and_has_the_atomic_option(tma_runs):
    X, U = inputs(700, 136, 9, BF16, seed=3)
    a, b = compress_pass(X, U), compress_pass(X, U)
    assert all(torch.equal(x, y) for x, y in zip(tuple.__iter__(a), tuple.__iter__(b)))
    check_compress(compress_pass(X, U, True, None, deterministic=False), X, U, BF16)
    assert len(tma_runs) == 3


def test_tma_kernel_rounds_bf16_coefficients_to_nearest(tma_runs):
    """C stored in bf16 is the split's hi half: within half an ulp of the fp64 product where
    the fp32-class product error is negligible (a truncating cast is off by up to one ulp)."""
    X, U = inputs(400, 152, 24, BF16, seed=12)
    C64 = fp64_compress(X, U)[0]
    C = compress_pass(X, U, True, BF16).C.double()
    big = C64.abs() > 0.1 * C64.abs().max()
    ulp = torch.ldexp(torch.ones_like(C64), torch.frexp(C64)[1] - 8)
    assert big.sum() > 1000 and float(((C - C64).abs() / ulp)[big].max()) <= 0.52
    assert len(tma_runs) == 1


def test_layouts_tma_cannot_read_take_the_other_designs(tma_runs):
    """A strided X, a width that is not a multiple of 8, an fp32 X: no TMA launch, and the
    result is still right."""
    base, U = inputs(300, 2 * 136, 8, BF16, seed=7)
    U = U[:136]  # (136, 8), not orthonormal: fine for the check
    X = base[:, ::2]
    check_compress(compress_pass(X, U, True, BF16), X, U, BF16)
    X2, U2 = inputs(50, 130, 8, BF16, seed=8)
    check_compress(compress_pass(X2, U2, True, BF16), X2, U2, BF16)
    X3, U3 = inputs(50, 136, 8, F32, seed=9)
    check_compress(compress_pass(X3, U3, True, BF16), X3, U3, BF16)
    assert tma_runs == []


def test_only_shapes_the_kernel_covers_take_a_tma_entry():
    """A store's 'tma' entry applies where `tma_fits`; elsewhere the size rule decides."""
    class Store:
        def lookup(self, *args, **kwargs):
            return "tma"

    assert CP.choose_path(512, 32, "bf16", None, Store()) == "tma"
    assert CP.choose_path(512, 128, "bf16", None, Store()) == "split"  # r > 64
    assert CP.choose_path(97, 8, "bf16", None, Store()) == "fused"  # D not a multiple of 8
    assert CP.choose_path(512, 32, "fp32", None, Store()) == "fused"


def test_views_with_offsets_and_overlapping_rows(tma_runs):
    """Saved activations are often views. A row slice (storage offset 16-byte aligned) and a
    column slice (rows padded: pitch > D) are read through the descriptor; a view whose base
    is 8 bytes off and an expanded X (row stride 0: rows overlap, a layout no TMA descriptor
    is documented for) take the other designs. All against fp64."""
    base, U = inputs(301, 280, 8, BF16, seed=11)
    U = U[:136]
    for X, tma in ((base[1:, :136], True), (base[:, 8:144], True),
                   (base.reshape(-1)[4:4 + 300 * 136].view(300, 136), False),
                   (base[5, :136].expand(40, 136), False)):
        before = len(tma_runs)
        check_compress(compress_pass(X, U, True, BF16), X, U, BF16)
        assert (len(tma_runs) > before) == tma, (X.stride(), X.storage_offset())
