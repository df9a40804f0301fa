"""reconstruct kernel (X_hat = C U^T) against float64 and the torch reference
(I3; docs/design.md §6.3)."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from helpers import assert_close, random_orthonormal
from kernel_checks import DEV, KERNEL_MARKS, param_id

pytest.importorskip("triton")
from laser_triton.kernels import reconstruct  # noqa: E402
from laser_triton.kernels._common import num_sms  # noqa: E402

from laser_triton import reference  # noqa: E402
from laser_triton.validation import DTYPE_NAMES  # noqa: E402

RC = importlib.import_module("laser_triton.kernels.reconstruct")  # the module, not the function
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


def _programs(N: int, D: int, cfg: dict) -> list[tuple[int, int]]:
    """Per program of the launch, (first, last) D tile its run of output tiles touches."""
    P, per = RC.programs(N, D, cfg, num_sms(torch.device(DEV)))
    n_rb, n_dt = -(-N // cfg["BLOCK_N"]), -(-D // cfg["BLOCK_D"])
    return [(p * per // n_rb, (min((p + 1) * per, n_rb * n_dt) - 1) // n_rb) for p in range(P)]


@pytest.mark.parametrize("c_dtype,out_dtype,r,precision", [
    (BF16, BF16, 37, "bf16x3"),
    (F32, F16, 20, "bf16x3"),
    (F16, F32, 9, "ieee"),
], ids=param_id)
def test_programs_walk_several_d_tiles(use_configs, c_dtype, out_dtype, r, precision):
    """Small blocks at an odd shape: program runs cross D tiles (the basis tile reloaded
    mid-run), the last row block and the last D tile are partial, ranks are padded; every
    element is written (outputs are NaN-poisoned) and within tolerance of fp64."""
    N, D = 53, 70
    cfg = {"BLOCK_N": 16, "BLOCK_D": 32, "PROGRAMS_PER_SM": 1, "PRECISION": precision}
    use_configs({"reconstruct": {f"D={D},r={r},dtype={DTYPE_NAMES[out_dtype]}": cfg}})
    spans = _programs(N, D, cfg)
    assert any(last > first for first, last in spans)  # the launch exercises the reload
    C = (torch.randn(N, r, generator=torch.Generator().manual_seed(r)) * 2).to(c_dtype).to(DEV)
    U = random_orthonormal(D, r, seed=r).float().to(DEV)
    out = reconstruct(C, U, out_dtype)
    ref = C.double() @ U.double().t()
    split_err = 2.0**-15 * float((C.double().abs() @ U.double().abs().t()).max())
    assert_close(out, ref, rtol=OUT_RTOL[out_dtype],
                 atol=max(1e-6 * float(ref.abs().max()), split_err))


def test_results_do_not_depend_on_the_grid(use_configs):
    """Each output element is one program's fp32 sum in a fixed order, so any number of
    programs gives the same bits (4 programs of 3 tiles, 5 of 2, one tile per program)."""
    N, D, r = 45, 70, 24
    C = torch.randn(N, r, generator=torch.Generator().manual_seed(3)).to(BF16).to(DEV)
    U = random_orthonormal(D, r, seed=4).float().to(DEV)
    outs = []
    for per_sm in (1, 2, 4):
        use_configs({"reconstruct": {f"D={D},r={r},dtype=fp32": {
            "BLOCK_N": 16, "BLOCK_D": 32, "PROGRAMS_PER_SM": per_sm}}})
        outs.append(reconstruct(C, U, F32))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
