"""Linear layers whose backward works on LASER's compressed input, never rebuilding it (issue 17).

A linear layer y = x W^T needs its saved input only for the weight gradient dW = G^T X
(G = dL/dy and X = x as (rows, K) matrices); the input gradient dX = G W needs no X at all.
When LASER holds X as coefficients C (N x r) in a basis U (K x r), X_hat = C U^T and

    dW = G^T X_hat = (G^T C) U^T,

which costs 2 N out r + 2 out r K flops instead of 2 N K r (the rebuild) + 2 N out K, and never
materializes the N x K X_hat. `ops.grad_coeff` computes G^T C with fp32 accumulation (a Triton
kernel on GPUs); the rest is one small matmul.

Error bound. LASER stores X only if ||X - X_hat||_F <= tau ||X||_F (every stored view meets it
on its own), so, in exact arithmetic,

    ||dW - G^T X||_F = ||G^T (X - X_hat)||_F <= ||G||_2 ||X - X_hat||_F <= ||G||_2 tau ||X||_F.

This path computes in fp32 from C and U and skips the rebuild's rounding of X_hat to the
activation dtype, so its arithmetic adds less than the rebuild path's does.

Layouts handled (`lowrank_input`), both read from the stored (rows, width) region as views of C:
- "rows": x's last axis is the stored row (K = width) and its other axes pick whole rows, as
  for every projection of a (B, L, D) activation: X = C_x U^T with C_x the picked rows of C.
- "cols": x is a transposed (B, D, L) view of (B, L, D) rows, as the mlp_t token mixer reads
  them (lean saves): x[b] = U C_b^T, so dW = sum_b (G_b^T U) C_b^T, which costs
  2 B D out r + 2 B L out r instead of 2 B D L out.
Anything else (raw, pinned, undecided or modified values, other layouts) takes the ordinary
path through the rebuilt (or raw) tensor, and so does a compressed input whose rank is too high
for the factored product to cost fewer flops than rebuilding and multiplying (`pays`).

A weightless RMSNorm saving its output y (`rms_norm`, the TRM's lean saves) feeds the next
linear layer from the same storage, so its backward would rebuild the region the linear layer
was just served without it. Its gradient dx = r (dy - y mean(dy y)) (r: the saved row scales)
needs y only through mean(dy y) and one product with y, both taken from (C, U):

    rows: mean(dy y) = rowsum((dy U) * C) / D,   dx = r dy - (r mean(dy y) C) U^T
    cols: y[b] = U C_b^T, mean over L: rowsum((dy_b C_b) * U) / L,  dx_b = r dy_b - (r m U) C_b^T

the second product accumulated into r dy (one N x D result, which is dx itself). It costs
2 N D r flops more than the rebuild (4 N D r against 2 N D r) and saves its N x D tensor, so
the norm takes (C, U) only while no rebuild of the region is alive (otherwise it reuses it).

How the backward gets (C, U): `_Linear.backward` opens `request(index, accept)` around
`ctx.saved_tensors`; LASER's unpack hook asks `serve(packed)` first, which for that one saved
tensor, when held compressed in a handled layout (and `accept` agrees), records a
`LowRankInput` (`served_input()`) and returns a zero-stride placeholder of the right shape and
dtype instead of rebuilding. Every other unpack, including other consumers of the same storage,
is unchanged. `classify` says why a saved tensor is or is not served.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import ops
from .storage import Packed

__all__ = ["LowRankInput", "linear", "rms_norm", "RMSNormSavingOutput",
           "active", "serving", "request", "serve", "served_input", "classify", "lowrank_input",
           "pays", "weight_grad", "norm_grad"]

_tls = threading.local()


@contextlib.contextmanager
def serving(enabled: bool) -> Iterator[None]:
    """Set by `Laser.compress()` for its duration: linear layers may use `linear` (if enabled)."""
    prev = getattr(_tls, "serving", False)
    _tls.serving = enabled
    try:
        yield
    finally:
        _tls.serving = prev


def active() -> bool:
    """Should a linear layer use `linear` now? Only while a Laser with lowrank_backward
    compresses in this thread, with grad on, and outside compiled code: a compiled graph saves
    its activations through its own Function, whose backward this cannot change."""
    if torch.compiler.is_compiling():
        return False
    return torch.is_grad_enabled() and getattr(_tls, "serving", False)


@dataclass(frozen=True)
class LowRankInput:
    """A saved linear input x as coefficients and basis (see the module docstring).

    "rows": x.reshape(-1, K) == C @ U.T, C (n, r). "cols": x (B, D, L), x[b] == U @ C[b].T,
    C (B, L, r). U is the (width, r) fp32 basis; C has the coefficient dtype.
    """

    C: torch.Tensor
    U: torch.Tensor
    layout: str
    shape: tuple[int, ...]


def classify(p: object) -> tuple[LowRankInput | None, str]:
    """(x's (C, U), "compressed") when saved tensor p is held compressed in a handled layout,
    else (None, why not): "not held by LASER" (kept raw by rule: excluded, narrow, few rows,
    parameters, ...), "undecided", "stored raw" (fidelity failed, back-off), "pinned",
    "modified in place", "scaled" (extreme magnitudes), "flag off" or "layout"."""
    if not isinstance(p, Packed):
        return None, "not held by LASER"
    e = p.entry
    st = e.stored
    if st is None:
        return None, "undecided"
    if st.raw is not None:
        return None, "stored raw"
    if e.pinned is not None:  # unpack serves exact values
        return None, "pinned"
    if e.modified or e.overwritten is not None:  # unpack serves exact values, or raises
        return None, "modified in place"
    if st.scale is not None:  # C = round(s X U) of an extreme-magnitude site: rebuild instead
        return None, "scaled"
    if not e.tracker.cfg.lowrank_backward:  # the flag also binds direct calls of `linear`
        return None, "flag off"
    size, stride, w = p.size, p.stride, e.region.width
    if not size or 0 in size or p.offset % w:
        return None, "layout"
    C, U = st.C, st.U
    r, (cs0, cs1), row0 = C.shape[1], C.stride(), p.offset // w
    # size-1 axes have no meaningful stride; count them as 0 rows apart
    rows_step = [0 if s == 1 else (st_ // w if st_ % w == 0 else None)
                 for s, st_ in zip(size, stride)]
    if size[-1] == w and stride[-1] == 1 and None not in rows_step[:-1]:
        Cx = C.as_strided(tuple(size[:-1]) + (r,), tuple(k * cs0 for k in rows_step[:-1]) + (cs1,),
                          C.storage_offset() + row0 * cs0)
        return LowRankInput(Cx.reshape(-1, r), U, "rows", size), "compressed"
    if (len(size) == 3 and size[1] == w and stride[1] == 1 and rows_step[0] is not None
            and rows_step[2] is not None):
        Cb = C.as_strided((size[0], size[2], r), (rows_step[0] * cs0, rows_step[2] * cs0, cs1),
                          C.storage_offset() + row0 * cs0)
        return LowRankInput(Cb, U, "cols", size), "compressed"
    return None, "layout"


def lowrank_input(p: Packed) -> LowRankInput | None:
    """x's (C, U) when its entry is held compressed and x is a layout handled here, else None."""
    return classify(p)[0]


def pays(x: LowRankInput, out: int) -> bool:
    """Does dW from (C, U) cost fewer flops than the rebuild path (X_hat = C U^T, then G^T X_hat)
    for a layer with `out` outputs? rows: r out (n + K) < n K (r + out); cols: r out (D + L) <
    D L (r + out), K (or L) being the contracted axis. Rows nearly always pay; the column layout
    loses once r nears D L / (D + L)."""
    r = x.U.shape[1]
    if x.layout == "rows":
        n, K = x.C.shape[0], x.shape[-1]
        return r * out * (n + K) < n * K * (r + out)
    _, D, L = x.shape
    return r * out * (D + L) < D * L * (r + out)


class _Request:
    __slots__ = ("index", "accept", "seen", "handle")

    def __init__(self, index: int, accept: Callable[[LowRankInput, Packed], bool]) -> None:
        self.index, self.accept, self.seen, self.handle = index, accept, 0, None


@contextlib.contextmanager
def request(index: int, accept: Callable[[LowRankInput, Packed], bool]) -> Iterator[_Request]:
    """Around `ctx.saved_tensors` of a Function whose backward can work from (C, U): the
    index-th saved tensor may come back as a placeholder, its (C, U) in `.handle` (None when
    it was unpacked as usual), if `accept(x, packed)` agrees."""
    prev = getattr(_tls, "request", None)
    req = _tls.request = _Request(index, accept)
    try:
        yield req
    finally:
        _tls.request = prev


def served_input() -> LowRankInput | None:
    """The (C, U) served to the innermost open `request` so far, or None."""
    req = getattr(_tls, "request", None)
    return None if req is None else req.handle


def serve(p: object) -> torch.Tensor | None:
    """Called by LASER's unpack hook for every saved tensor: a placeholder for the requested
    one when it is held compressed in a handled layout and accepted, else None (unpack as
    usual)."""
    req = getattr(_tls, "request", None)
    if req is None:
        return None
    i, req.seen = req.seen, req.seen + 1
    if i != req.index or not isinstance(p, Packed):
        return None
    lr = lowrank_input(p)
    if lr is None or not req.accept(lr, p):
        return None
    req.handle = lr
    p.entry.served()  # counts as this view's unpack: a rebuild held for it can go
    # Zero strides: the shape and dtype autograd expects, one element of memory.
    return torch.empty((), dtype=p.entry.dtype, device=lr.C.device).expand(p.size)


def weight_grad(grad_out: torch.Tensor, x: LowRankInput) -> torch.Tensor:
    """dW = G^T X_hat (fp32, out x K) from x's coefficients, without rebuilding X_hat."""
    O = grad_out.shape[-1]
    if x.layout == "rows":
        T = ops.grad_coeff(grad_out.reshape(-1, O), x.C)  # (O, r)
        return T @ x.U.t()
    B, D, L = x.shape
    r = x.U.shape[1]
    G = grad_out.reshape(B, D, O)
    # G_b^T U for every b (and its (O, b r) copy) is 2 B out r fp32 values, more than the
    # B L D input it stands for when out r is large (mlp_t's gate_up): taken over chunks of
    # the batch, each no larger than the rebuild of its rows. The count does not grow with B.
    chunks = max(1, min(B, -(-(2 * O * r * 4) // (L * D * grad_out.element_size()))))
    step = -(-B // chunks)
    dW = None
    for b0 in range(0, B, step):
        n = min(step, B - b0)
        T = ops.grad_coeff(G[b0:b0 + n], x.U.expand(n, D, r))  # T[b] = G_b^T U
        # dW[o, l] = sum over (b, k) of T[b, o, k] C[b, l, k]
        Tm = T.transpose(0, 1).reshape(O, n * r)
        del T  # (each buffer goes as soon as it is used: this is about transient bytes)
        part = Tm @ x.C[b0:b0 + n].float().transpose(1, 2).reshape(n * r, L)
        del Tm
        if dW is None:
            dW = part
        else:
            dW.add_(part)
        del part
    return dW


class _Linear(torch.autograd.Function):
    """F.linear(x, w) with no bias. `cast_saved`: w is the caller's cast copy, saved with x in
    F.linear's order (w, x); else w is the parameter, saved after x (as `trm.lean` does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, cast_saved: bool) -> torch.Tensor:
        ctx.x_index = 1 if cast_saved else 0
        ctx.save_for_backward(*((w, x) if cast_saved else (x, w)))
        return F.linear(x, w.to(x.dtype))

    @staticmethod
    @once_differentiable  # the placeholder input has no values to differentiate through
    def backward(ctx, dout: torch.Tensor):
        i = ctx.x_index
        out = dout.shape[-1]
        with request(i, lambda lr, _p: pays(lr, out)) as req:
            saved = ctx.saved_tensors
        x, w = saved[i], saved[1 - i]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = dout @ w.to(dout.dtype)
        if ctx.needs_input_grad[1]:
            if req.handle is not None:
                dw = weight_grad(dout, req.handle)
            else:  # raw or rebuilt x: the ops plain autograd runs
                dw = dout.reshape(-1, dout.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            dw = dw.to(w.dtype)
        return dx, dw, None


def linear(x: torch.Tensor, weight: torch.Tensor, lean: bool = False) -> torch.Tensor:
    """F.linear(x, weight.to(x.dtype)) (no bias) whose weight gradient comes from LASER's
    (C, U) when x is held compressed (see the module docstring).

    Saves what the layer would save without it: lean=False what F.linear saves (the cast
    weight, then x; a non-contiguous x, which F.linear saves as a 2-D copy, takes F.linear
    itself); lean=True x as given and the weight itself (`trm.lean.linear_lean`).
    """
    if lean:
        return _Linear.apply(x, weight, False)
    w = weight.to(x.dtype)
    if not x.is_contiguous():
        return F.linear(x, w)
    return _Linear.apply(x, w, True)


def norm_grad(dy: torch.Tensor, r: torch.Tensor, y: LowRankInput) -> torch.Tensor:
    """dx = r (dy - y mean(dy y)) (fp32, dy's shape) of a weightless RMSNorm over the last axis,
    y = its output held as (C, U), r = its saved row scales: never builds y (module docstring)."""
    U = y.U
    if y.layout == "rows":
        D = dy.shape[-1]
        C = y.C.float()
        dy2 = dy.reshape(-1, D)
        rr = r.reshape(-1, 1)
        m = (dy2.float() @ U).mul_(C).sum(-1, keepdim=True) / D  # mean(dy y) per row
        dx = torch.mul(dy2, rr)  # fp32 (r is): the one N x D tensor, dx itself
        dx.addmm_(C * (rr * m), U.t(), alpha=-1.0)
        return dx.view(dy.shape)
    B, D, L = y.shape  # y[b] = U C_b^T (D x L), normalized over L
    # Worked in the storage's (B, L, D) layout, where C_b is (L, r): one (L, D) block per b.
    C = y.C.float()
    dyT = dy.transpose(1, 2)
    P = torch.bmm(C.transpose(1, 2), dyT.float())  # (B, r, D): C_b^T dy_b^T
    m = P.mul_(U.t()).sum(1, keepdim=True) / L  # (B, 1, D): mean over L of dy y
    del P
    rT = r.transpose(1, 2)  # (B, 1, D)
    dxT = torch.mul(dyT, rT).contiguous()  # fp32: dx^T itself
    dxT.baddbmm_(C, (U.t() * (rT * m)), alpha=-1.0)  # C_b (r m U)^T, (L, r) @ (r, D)
    return dxT.transpose(1, 2)


def _norm_accepts(_x: LowRankInput, p: Packed) -> bool:
    # With a rebuild of the region alive (another consumer unpacked it), use it: free.
    return p.entry.rebuilt() is None


class RMSNormSavingOutput(torch.autograd.Function):
    """Weightless RMSNorm over the last axis in fp32, returned in x's dtype, that saves its
    output y and the row scales r = rsqrt(mean(x^2) + eps) instead of its input: backward
    needs only dx = r (dy - y mean(dy y)). `trm.lean.rms_norm_lean` applies it; `rms_norm`
    applies its subclass whose backward may take y from (C, U)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        y = (xf * r).to(x.dtype)
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, r = ctx.saved_tensors
        return _rms_norm_input_grad(dy, y, r), None


def _rms_norm_input_grad(dy: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """dx = r (dy - y mean(dy y)), in fp32, returned in dy's dtype."""
    yf, dyf = y.float(), dy.float()
    return (r * (dyf - yf * (dyf * yf).mean(-1, keepdim=True))).to(dy.dtype)


class _RMSNorm(RMSNormSavingOutput):
    """`RMSNormSavingOutput` (same forward and saves) whose backward takes y from (C, U) when
    LASER holds it compressed."""

    @staticmethod
    @once_differentiable  # the placeholder output has no values to differentiate through
    def backward(ctx, dy: torch.Tensor):
        with request(0, _norm_accepts) as req:
            y, r = ctx.saved_tensors
        if req.handle is not None:
            return norm_grad(dy, r, req.handle).to(dy.dtype), None
        # trm.lean's RMSNorm: bit-identical gradients for raw or rebuilt y
        return _rms_norm_input_grad(dy, y, r), None


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm over the last axis in fp32, returned in x's dtype, saving its output
    and row scales (as `trm.lean.rms_norm_lean`); backward works from the output's (C, U)
    when LASER holds it compressed and no rebuild of it is alive (module docstring)."""
    return _RMSNorm.apply(x, eps)
