"""grad_coeff (T = G^T C in fp32, the weight gradient in coefficient space): the Triton kernel
(under the interpreter on CPU) and the torch twin against float64, with NaN-poisoned outputs
and shapes that are not multiples of any block size."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")
from laser_triton.kernels import _common, configs, grad_coeff, supports  # noqa: E402

from laser_triton import ops, reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.interpret,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def _ref64(G: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return G.double().transpose(-2, -1) @ C.double()


def _check(T: torch.Tensor, G: torch.Tensor, C: torch.Tensor) -> None:
    ref = _ref64(G, C)
    assert T.dtype == torch.float32 and T.shape == ref.shape
    assert not T.isnan().any()  # every element written (outputs are NaN-poisoned)
    # fp32 accumulation of exact products: ~N ulp(fp32) of sum |g||c| at worst
    scale = G.double().abs().transpose(-2, -1) @ C.double().abs()
    assert bool(((T.double() - ref).abs() <= 1e-5 * scale + 1e-30).all())


@pytest.mark.parametrize("B,N,O,R,g_dtype,c_dtype", [
    (1, 37, 70, 33, torch.bfloat16, torch.bfloat16),   # tensor-core path, masked O and R
    (1, 1000, 130, 5, torch.float32, torch.float32),    # row splits (4 on the interpreter)
    (3, 50, 20, 7, torch.bfloat16, torch.float32),      # batched, mixed dtypes
    (2, 19, 9, 1, torch.float16, torch.bfloat16),
])
def test_grad_coeff_matches_fp64(B, N, O, R, g_dtype, c_dtype):
    g = torch.Generator().manual_seed(N + O + R)
    G = torch.randn(B, N, O, generator=g).to(g_dtype).to(DEV)
    C = torch.randn(B, N, R, generator=g).to(c_dtype).to(DEV)
    _check(grad_coeff(G, C), G, C)


def test_grad_coeff_strided_and_shared_coefficients():
    """G as a transposed view and C expanded over the batch (stride 0), as the column layout
    of laser_triton.lowrank passes them."""
    g = torch.Generator().manual_seed(5)
    G = torch.randn(3, 40, 67, generator=g).to(DEV).transpose(1, 2)  # (3, 67, 40), strided
    U = torch.randn(67, 11, generator=g).to(DEV)
    C = U.expand(3, 67, 11)
    _check(grad_coeff(G, C), G, C)


def test_grad_coeff_small_blocks(tmp_path, monkeypatch):
    """Blocks smaller than every dimension: the loops over rows, O and R blocks all run."""
    name = configs.sanitize_gpu_name(configs.gpu_name(torch.device(DEV))) + ".json"
    entry = {"BLOCK_N": 16, "BLOCK_O": 16, "BLOCK_R": 16}
    (tmp_path / name).write_text(json.dumps(
        {"triton_version": "x", "kernels": {"grad_coeff": {"D=45,r=21,dtype=fp32": entry}}}))
    monkeypatch.setenv("LASER_TRITON_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(configs, "_STORES", {})
    g = torch.Generator().manual_seed(7)
    G = torch.randn(1, 83, 45, generator=g).to(DEV)
    C = torch.randn(1, 83, 21, generator=g).to(DEV)
    _check(grad_coeff(G, C), G, C)


def test_ops_grad_coeff_dispatch_and_twin(monkeypatch):
    g = torch.Generator().manual_seed(3)
    G = torch.randn(53, 29, generator=g).bfloat16().to(DEV)
    C = torch.randn(53, 6, generator=g).bfloat16().to(DEV)
    monkeypatch.setenv("LASER_TRITON_BACKEND", "torch")
    ref = ops.grad_coeff(G, C)
    assert ref.shape == (29, 6)
    _check(ref[None], G[None], C[None])
    monkeypatch.setattr(reference, "_GRAD_COEFF_ELEMS", 64)  # many row chunks
    _check(ops.grad_coeff(G, C)[None], G[None], C[None])
    monkeypatch.setenv("LASER_TRITON_BACKEND", "triton")
    assert torch.allclose(ops.grad_coeff(G, C), ref, rtol=1e-5, atol=1e-6)
    assert supports("grad_coeff", G[None], C[None])


def test_ops_grad_coeff_rejects_bad_input():
    G = torch.randn(10, 4)
    with pytest.raises(ValueError, match="agree"):
        ops.grad_coeff(G, torch.randn(11, 3))
    with pytest.raises(ValueError, match="both be 2-D or both 3-D"):
        ops.grad_coeff(G, torch.randn(1, 10, 3))
    with pytest.raises(TypeError, match="dtype"):
        ops.grad_coeff(G, torch.randn(10, 3).long())
    with pytest.raises(ValueError, match="empty"):
        ops.grad_coeff(torch.randn(0, 4), torch.randn(0, 3))


def test_grad_coeff_compiles_for_sm90_with_tensor_cores():
    """bf16 G and C go to tensor-core products (mma / wgmma) on Hopper, compiled on CPU."""
    from laser_triton.kernels import _hopper  # noqa: PLC0415

    info = _hopper.compile_info("grad_coeff", 256, 16, "bf16", configs.DEFAULTS["grad_coeff"])
    assert info["cubin_bytes"] > 0 and 0 <= info["shared"] <= configs.SHARED_LIMIT_SM90
    assert "mma" in info["ptx"] and ".bf16" in info["ptx"]
