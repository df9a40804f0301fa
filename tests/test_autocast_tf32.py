"""LASER's own math is immune to the caller's autocast and TF32 / fp32-precision settings.

Pack hooks, batch closes, polls and unpacks run inside the user's autocast region; without
isolation the torch backend's C = X U, Y = X^T C and ||C||^2, the shrink matrix U^T Y and
the reconstruction C U^T came back bf16 there, moving the fidelity estimate by up to ~0.04.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import rel_err
from models import low_rank_tokens

import laser_triton as lt
from laser_triton import decisions, reference, util
from laser_triton.tracker import SiteTracker

TAU = 0.05


def _run(autocast: bool, monkeypatch, dtype=torch.float32):
    """4 steps of one saved tensor per step (resets, power steps, shrink checks); returns the
    fidelity estimates the package computed and the errors of what unpack returned."""
    laser = lt.Laser(lt.LaserConfig(tau=TAU, max_rank=32, min_width=64, shrink_every=1))
    estimates = []
    orig_err = SiteTracker._err

    def err(self, out, U, X, *args):
        e = orig_err(self, out, U, X, *args)
        estimates.append(float(e))
        return e

    monkeypatch.setattr(SiteTracker, "_err", err)
    orig_host = decisions.host_error

    def host_error(*args):  # the batched decisions compute the drafts' errors on the host
        e = orig_host(*args)
        estimates.append(e)
        return e

    monkeypatch.setattr(decisions, "host_error", host_error)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    unpack_errs = []
    for step in range(4):
        base = low_rank_tokens(1, 301, 160, rank=12, seed=step, noise=0.02).to(dtype)
        base = base.requires_grad_()
        w = torch.ones(1, requires_grad=True)
        with ctx:
            with laser.compress():
                x = base * 1.0  # has history, so it is eligible
                y = x * w  # mul is no autocast op: the saved x is the same tensor in both runs
            assert torch.is_autocast_enabled("cpu") == autocast
            x_hat = y.grad_fn._saved_self  # unpack, inside the caller's autocast region
        assert x_hat.dtype == dtype
        unpack_errs.append(rel_err(x_hat.detach(), x.detach()))
    monkeypatch.setattr(SiteTracker, "_err", orig_err)
    monkeypatch.setattr(decisions, "host_error", orig_host)
    return estimates, unpack_errs, laser


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fidelity_estimate_and_unpack_error_unchanged_under_bf16_autocast(monkeypatch, dtype):
    monkeypatch.setenv("LASER_TRITON_BACKEND", "torch")
    est_plain, err_plain, _ = _run(False, monkeypatch, dtype)
    est_auto, err_auto, laser = _run(True, monkeypatch, dtype)
    assert len(est_plain) >= 4 and est_plain == est_auto  # bit-identical decisions
    assert err_plain == err_auto
    assert all(e <= TAU for e in err_auto), err_auto
    df = laser.report()
    sites = df[df.width > 0]
    assert len(sites) and (sites["rank"] > 0).all() and (sites.raw_tensors < sites.tensors).all()


def test_own_math_disables_autocast_and_restores_it():
    seen = []

    @util.own_math
    def probe():
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.randn(5, 7) @ torch.randn(7, 3)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert probe().dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        assert (torch.randn(5, 7) @ torch.randn(7, 3)).dtype == torch.bfloat16
    assert seen == [False]


@pytest.fixture
def precision_settings():
    """Restore every fp32 matmul setting a test changes (they are process-global)."""
    cuda_mm = torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, cuda_mm.fp32_precision)
    yield
    torch.backends.fp32_precision = "none"
    cuda_mm.fp32_precision = "none"
    torch.backends.fp32_precision, cuda_mm.fp32_precision = saved


class _CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA, to reach the CUDA branch of the matmul helper."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_reduced_precision_detected_from_new_and_mixed_apis(precision_settings):
    cuda_mm = torch.backends.cuda.matmul
    assert not util.reduced_fp32_matmul(torch.device("cuda"))
    cuda_mm.fp32_precision = "tf32"
    assert util.reduced_fp32_matmul(torch.device("cuda"))
    cuda_mm.fp32_precision = "ieee"
    torch.backends.fp32_precision = "tf32"
    assert not util.reduced_fp32_matmul(torch.device("cuda"))  # the matmul setting wins
    cuda_mm.fp32_precision = "none"
    assert util.reduced_fp32_matmul(torch.device("cuda"))  # inherits the global tf32


def test_torch_backend_survives_new_tf32_api_and_stays_fp32_accurate(precision_settings):
    """Reading torch.backends.cuda.matmul.allow_tf32 raises once fp32_precision was set (the
    old helper crashed there); the product must also come out at fp32 accuracy."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    g = torch.Generator().manual_seed(3)
    C = torch.randn(37, 12, generator=g)
    U = torch.linalg.qr(torch.randn(70, 12, generator=g))[0]
    ref = C.double() @ U.double().t()
    out = reference.reconstruct(C.as_subclass(_CudaLooking), U.as_subclass(_CudaLooking))
    assert out.dtype == torch.float32
    assert rel_err(out.as_subclass(torch.Tensor), ref) < 1e-6
