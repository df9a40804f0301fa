"""reconstruct kernel (X_hat = C U^T) against float64 and the torch reference
(I3; docs/design.md §6.3)."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_close, random_orthonormal
from kernel_checks import DEV, KERNEL_MARKS, param_id

pytest.importorskip("triton")
from laser_triton.kernels import reconstruct  # noqa: E402

from laser_triton import reference  # noqa: E402

pytestmark = KERNEL_MARKS
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
OUT_RTOL = {F32: 1e-6, BF16: 2.0**-7, F16: 2.0**-10}


@pytest.mark.parametrize("N,D,r,c_dtype,out_dtype", [
    (37, 520, 33, BF16, BF16),
    (1, 64, 1, F32, F32),
    (1000, 96, 5, F16, F32),
], ids=param_id)
def test_reconstruct_matches_fp64(N, D, r, c_dtype, out_dtype):
    C = torch.randn(N, r).to(c_dtype).to(DEV)
    U = torch.linalg.qr(torch.randn(D, r))[0].to(DEV)  # column-major
    out = reconstruct(C, U, out_dtype)
    ref = C.double() @ U.double().t()
    assert out.dtype == out_dtype and out.shape == (N, D) and out.is_contiguous()
    # The default bf16x3 products drop terms below about 2^-16 of each |c_k u_k| (2^-15: slack).
    split_err = 2.0**-15 * float((C.double().abs() @ U.double().abs().t()).max())
    assert_close(out, ref, rtol=OUT_RTOL[out_dtype],
                 atol=max(1e-6 * float(ref.abs().max()), split_err))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=param_id)
@pytest.mark.parametrize("N,D,r", [(N, D, r) for N, D, r in itertools.product(
    (1, 37, 1000), (64, 96, 520), (1, 5, 16, 33)) if r <= D])
def test_reconstruct_full_grid(N, D, r, dtype):
    C = torch.randn(N, r).to(dtype).to(DEV)
    U = random_orthonormal(D, r, seed=D + r).float().to(DEV)
    ref = reference.reconstruct(C, U, F32)
    out = reconstruct(C, U, F32)
    assert_close(out, ref, rtol=1e-5, atol=1e-12, norm=True)  # bf16x3 tensor-core products
