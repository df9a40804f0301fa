"""What the per-op kernel tests share: inputs, fp64 references, the compress_pass check.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports
Triton, so the real kernels run on CPU tensors. Every output and scratch buffer is poisoned
with NaN before launch (the `poison` fixture), so an element a kernel fails to write shows up
as a NaN. Shapes are deliberately not multiples of any block size.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import assert_close, random_orthonormal

from laser_triton.validation import DTYPE_NAMES

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# Marks for every kernel test module: interpreter runs, NaN-poisoned outputs, and the Triton 3.6
# interpreter's own numpy deprecations and masked-lane warnings silenced.
KERNEL_MARKS = [
    pytest.mark.interpret,
    pytest.mark.usefixtures("poison"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


def param_id(value: object) -> str | None:
    """Readable parametrize ids: `bf16` rather than `dtype1`; None keeps pytest's own id."""
    return DTYPE_NAMES.get(value) if isinstance(value, torch.dtype) else None


def force_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make compress_pass take its fused (one launch) or split (coeff + y) path."""
    plan = sys.modules["laser_triton.kernels.compress_plan"]
    monkeypatch.setattr(plan, "FUSED_MAX_ELEMS", 1 << 40 if path == "fused" else 0)


def inputs(N: int, D: int, r: int, dtype: torch.dtype, seed: int = 0):
    """X (N, D) in `dtype` and an orthonormal fp32 basis U (D, r)."""
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(N, D, generator=g) * 3).to(dtype).to(DEV)
    U = random_orthonormal(D, r, seed=seed + 1).float().to(DEV)
    return X, U


def fp64_compress(X: torch.Tensor, U: torch.Tensor):
    """C = XU, ||X||^2, ||C||^2, Y = X^T C, max row relative error (sqrt), max |C| in fp64."""
    Xd, Ud = X.double(), U.double()
    C = Xd @ Ud
    rx, rc = Xd.square().sum(1), C.square().sum(1)
    rel = torch.where(rx > 0, (1 - rc / rx.clamp_min(1e-300)).clamp_min(0), torch.zeros_like(rx))
    return C, rx.sum(), rc.sum(), Xd.t() @ C, rel.max().sqrt(), C.abs().max()


C_RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # 1 ulp


def check_compress(out, X: torch.Tensor, U: torch.Tensor, coeff_dtype: torch.dtype,
                   need_y: bool = True) -> None:
    """Every field of a compress_pass result against fp64: C within one ulp of its dtype."""
    C64, eX, eC, Y64, row, amax = fp64_compress(X, U)
    C, e_X, e_C, Y = out
    assert C.dtype == coeff_dtype and C.shape == C64.shape and C.is_contiguous()
    assert e_X.dtype == torch.float32 and e_X.dim() == 0 and out.row_err_max.dim() == 0
    scale = float(C64.abs().max()) + 1e-30
    assert_close(C, C64, rtol=C_RTOL[coeff_dtype], atol=1e-5 * scale, msg="C beyond one ulp:")
    assert float(e_X) == pytest.approx(float(eX), rel=1e-5)
    assert float(e_C) == pytest.approx(float(eC), rel=1e-5, abs=1e-6 * float(eX))
    assert float(out.row_err_max) == pytest.approx(float(row), abs=1e-4)
    assert float(out.c_amax) == pytest.approx(float(amax), rel=1e-5)
    if need_y:
        assert Y.dtype == torch.float32 and Y.shape == (X.shape[1], U.shape[1])
        assert_close(Y, Y64, rtol=1e-5, norm=True, msg="Y:")
    else:
        assert Y is None


def orth_err(Q: torch.Tensor) -> float:
    """max |Q^T Q - I| in fp64."""
    Qd = Q.double()
    return float((Qd.t() @ Qd - torch.eye(Q.shape[1], dtype=torch.float64, device=Q.device))
                 .abs().max())


def span_residual(Q: torch.Tensor, Y: torch.Tensor) -> float:
    """||Y - Q Q^T Y|| / ||Y||: how much of Y's span Q misses."""
    Yd, Qd = Y.double(), Q.double()
    return float((Yd - Qd @ (Qd.t() @ Yd)).norm() / Yd.norm())


def conditioned(D: int, r: int, kappa: float, seed: int = 0) -> torch.Tensor:
    """A (D, r) fp32 matrix with singular values log-spaced from 1 down to 1/kappa."""
    g = torch.Generator().manual_seed(seed)
    A = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), r, dtype=torch.float64)
    return ((A * s) @ V.t()).float().to(DEV)
