"""Lean saves (TRMConfig.lean_saves): RMSNorm and the SwiGLU tail recomputed in backward. The
same function as the plain layers, gradients as accurate (against fp64), fewer saved bytes, and
LASER on top still within its bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import UnpackTap, sudoku_batch, trm_steps

import laser_triton as lt
from laser_triton.trm import TRM, TRMConfig
from laser_triton.trm.layers import rms_norm
from laser_triton.trm.lean import rms_norm_lean, swiglu_down
from laser_triton.trm.savecount import SavedTensorCounter

DTYPES = [torch.float32, torch.bfloat16]


def plain_swiglu_down(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight.to(gate_up.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_down_is_bit_identical_to_plain_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    gate_up = (2 * torch.randn(3, 37, 2 * 45, generator=g)).to(dtype).requires_grad_()
    weight = torch.randn(29, 45, generator=g).requires_grad_()
    dout = torch.randn(3, 37, 29, generator=g).to(dtype)
    results = []
    for fn in (plain_swiglu_down, swiglu_down):
        out = fn(gate_up, weight)
        out.backward(dout)
        results.append((out.detach(), gate_up.grad, weight.grad))
        gate_up.grad = weight.grad = None
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_swiglu_down_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(5, 2 * 7, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_down, (gate_up, weight))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "mlp_t_layout"])
def test_rms_norm_lean_forward_identical_gradient_as_accurate(dtype, transposed):
    g = torch.Generator().manual_seed(2)
    x64 = 3 * torch.randn(4, 97, 130, generator=g, dtype=torch.float64) + 0.5
    if transposed:  # mlp_t normalizes a (B, D, L) view of a (B, L, D) tensor
        x64 = x64.transpose(1, 2)
    dy64 = torch.randn(x64.shape, generator=g, dtype=torch.float64)
    x = x64.to(dtype).requires_grad_()
    dy = dy64.to(dtype)
    xr = x.detach().double().requires_grad_()
    rms_norm_fp64(xr, 1e-5).backward(dy.double())  # the truth at the rounded inputs
    errs = {}
    for fn in (rms_norm, rms_norm_lean):
        y = fn(x, 1e-5)
        y.backward(dy)
        errs[fn.__name__] = ((x.grad.double() - xr.grad).norm() / xr.grad.norm()).item()
        if fn is rms_norm:
            y_plain = y.detach()
        else:
            assert torch.equal(y.detach(), y_plain) and y.dtype == dtype
        x.grad = None
    # measured: 6.5e-8 for both in fp32, 1.66e-3 vs 1.67e-3 in bf16 (rounding of dx)
    assert errs["rms_norm_lean"] <= 1.25 * errs["rms_norm"], errs


def rms_norm_fp64(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _tiny(lean: bool, **kw) -> TRMConfig:
    return TRMConfig.tiny().replace(L_cycles=2, lean_saves=lean, **kw)


def _step(cfg: TRMConfig, laser=None):
    torch.manual_seed(0)
    model = TRM(cfg, laser=laser)
    if laser is not None:
        laser.watch(model.net)
    logits = trm_steps(model, sudoku_batch(4))
    return logits, {n: p.grad for n, p in model.named_parameters()
                                    if p.grad is not None}


@pytest.mark.parametrize("mlp_t", [True, False], ids=["mlp_t", "attention"])
def test_lean_model_computes_the_same_function(mlp_t):
    extra = {} if mlp_t else {"mlp_t": False, "pos_encodings": "rope"}
    logits, grads = _step(_tiny(False, **extra))
    lean_logits, lean_grads = _step(_tiny(True, **extra))
    assert torch.equal(logits, lean_logits)
    assert grads.keys() == lean_grads.keys()
    for n in grads:
        torch.testing.assert_close(lean_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _saved(cfg: TRMConfig) -> tuple[int, list[tuple[torch.dtype, tuple, bool]]]:
    """Bytes the counter sees in one step, and (dtype, shape, is parameter) of every save."""
    counter = SavedTensorCounter()
    seen = []
    orig = counter._pack

    def pack(t):
        seen.append((t.dtype, tuple(t.shape), isinstance(t, torch.nn.Parameter)))
        return orig(t)

    counter._pack = pack
    _step(cfg, laser=counter)
    return counter.total_bytes(), seen


def test_lean_saves_fewer_bytes_no_fp32_copies_no_weight_copies():
    cfg = dict(forward_dtype="bfloat16")
    plain, plain_seen = _saved(_tiny(False, **cfg))
    lean, lean_seen = _saved(_tiny(True, **cfg))
    assert lean < 0.5 * plain, (lean, plain)
    tiny = TRMConfig.tiny()
    widths = (tiny.hidden_size, tiny.total_len)

    def fp32_activations(seen):  # RMSNorm's fp32 input copies: (B, L, D) or (B, D, L)
        return [s for dt, s, param in seen if dt == torch.float32 and len(s) == 3
                and s[-1] in widths]

    def narrow_2d(seen):  # F.linear's 2-D copy of mlp_t's transposed input: rows of 97
        return [s for dt, s, param in seen if not param and len(s) == 2
                and s[-1] == tiny.total_len]

    def weight_copies(seen):  # bf16 casts of the fp32 weights
        return [s for dt, s, param in seen if dt == torch.bfloat16 and len(s) == 2
                and not param and s[-1] != tiny.total_len]

    for check in (fp32_activations, narrow_2d, weight_copies):
        assert check(plain_seen) and not check(lean_seen), check.__name__


def test_laser_on_a_lean_model_stays_within_tau(monkeypatch):
    cfg = lt.LaserConfig(rank=16, max_rank=128, tau=0.05, coeff_dtype=torch.float32)
    laser = lt.Laser(cfg)
    tap = UnpackTap(laser, monkeypatch)
    _, plain = _step(_tiny(True))
    _, lasered = _step(_tiny(True), laser=laser)
    errs = tap.errors()
    assert errs and max(e for e, _ in errs) <= cfg.tau + 1e-6  # I1 on what unpack returned
    assert sum(not exact for _, exact in errs) >= 4  # and some of it was compressed
    for n in plain:
        err = (lasered[n] - plain[n]).norm() / plain[n].norm().clamp_min(1e-12)
        assert err < 2 * cfg.tau, (n, float(err))


def test_lean_model_compiles():
    """torch.compile traces the lean Functions (aot_eager: the autograd path, quickly)."""
    cfg = _tiny(True)
    logits, grads = _step(cfg)
    torch.manual_seed(0)
    model = TRM(cfg)
    model.net = torch.compile(model.net, backend="aot_eager")
    assert torch.equal(trm_steps(model, sudoku_batch(4)), logits)
    for n, p in model.named_parameters():
        if p.grad is not None:
            key = n.replace("net._orig_mod.", "net.")
            torch.testing.assert_close(p.grad, grads[key], rtol=1e-5, atol=1e-7, msg=n)
