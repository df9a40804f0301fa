"""Pure-torch twins of every LASER kernel (docs/design.md §2, §6).

These are the numerical ground truth: the Triton kernels are tested against them, and
`laser_triton.ops` falls back to them wherever Triton is unavailable. Nothing here validates
input (ops does that) and nothing here synchronizes with the host.

Conventions
- X is an (N, D) activation matrix in its storage dtype (fp32/bf16/fp16).
- U is a (D, r) fp32 basis with orthonormal columns.
- C = X U are the coefficients; Y = X^T C = X^T X U is the block power-iteration product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .numerics import DEGENERATE_REL, ORTH_TOL, completion_matrix
from .results import CompressOut
from .util import mm_fp32

__all__ = [
    "compress_pass",
    "orthonormalize",
    "orthonormalize_batched",
    "reconstruct",
    "grad_coeff",
    "range_finder",
    "ritz",
    "completion_matrix",
    "select_rank",
]


def compress_pass(
    X: torch.Tensor,
    U: torch.Tensor,
    need_y: bool = True,
    coeff_dtype: torch.dtype | None = None,
) -> CompressOut:
    """One logical pass over X: C = X U (in coeff_dtype), ||X||^2, ||C||^2, Y = X^T C.

    Everything accumulates in fp32 with an fp32 U (never a bf16 U: ||U^T U - I|| ~ 2e-3 would
    hide a 1% error). `row_err_max` is the largest per-row relative projection error
    sqrt(1 - ||c_i||^2 / ||x_i||^2) over rows with ||x_i|| > 0. `c_amax` is max |C| in fp32,
    so callers can detect coefficients that overflow a narrow coeff_dtype.
    """
    coeff_dtype = X.dtype if coeff_dtype is None else coeff_dtype
    Xf = X.float()
    C32 = _mm_fp32(Xf, U)
    row_x = Xf.square().sum(dim=1)
    row_c = C32.square().sum(dim=1)
    e_X = row_x.sum()
    e_C = row_c.sum()
    rel = torch.where(row_x > 0, (1.0 - row_c / row_x).clamp_min(0.0), torch.zeros_like(row_x))
    row_err_max = rel.max().sqrt()
    c_amax = C32.abs().amax() if C32.numel() else torch.zeros((), device=X.device)
    Y = _mm_fp32(Xf.t(), C32) if need_y else None
    return CompressOut(C32.to(coeff_dtype), e_X, e_C, Y, row_err_max, c_amax)


def reconstruct(C: torch.Tensor, U: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """X_hat = C U^T, computed in fp32 and cast to `dtype` (default C's dtype)."""
    dtype = C.dtype if dtype is None else dtype
    return _mm_fp32(C.float(), U.t()).to(dtype)


# fp32 matmul at full fp32 accuracy whatever the caller's TF32 settings (old or new API).
_mm_fp32 = mm_fp32


# Rows of G widened to fp32 at a time by grad_coeff: bounds its transient to ~4 MiB instead of
# an fp32 copy of the whole gradient (torch has no bf16 x bf16 -> fp32 matmul on CPU).
_GRAD_COEFF_ELEMS = 1 << 20


def grad_coeff(G: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """T[b] = G[b]^T C[b] in fp32 for G (B, N, O) and C (B, N, R): fp32 (B, O, R).

    A linear layer's weight gradient in coefficient space (dW = G^T C U^T). Rows are widened to
    fp32 in chunks, so the transient stays small whatever N is.
    """
    B, N, O = G.shape
    step = max(1, _GRAD_COEFF_ELEMS // max(B * O, 1))
    T = None
    for i in range(0, N, step):
        part = _mm_fp32(G[:, i:i + step].float().transpose(1, 2), C[:, i:i + step].float())
        T = part if T is None else T.add_(part)
    return T


# ----------------------------------------------------------------------------- orthonormalize


def _chol_factor(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor R of A^T A (fp64 Gram, tiny relative shift) and its info code."""
    G = A.transpose(-2, -1) @ A
    r = G.shape[-1]
    shift = torch.finfo(torch.float64).eps * r * G.diagonal(dim1=-2, dim2=-1).sum(-1)
    G = G + shift[..., None, None] * torch.eye(r, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    return L.transpose(-2, -1), info


def _apply_rinv(A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """A R^{-1} (right triangular solve) in fp64."""
    return torch.linalg.solve_triangular(R, A, upper=True, left=False)


def orthonormalize(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QR-free orthonormal basis of span(Y) for a D x r matrix: returns (Q fp32, ok bool scalar).

    CholeskyQR2 with column scaling, the Gram and its r x r Cholesky in fp64. Steps:
      1. scale columns to unit norm (power-iteration columns have norms ~ sigma_j^2, so this
         removes most of kappa(Y)); zero or non-finite columns count as degenerate;
      2. one Cholesky pass flags columns whose new direction is below DEGENERATE_REL and
         replaces them by fixed random directions (completion), never NaN;
      3. CholeskyQR2 on the repaired matrix.
    `ok` is False when the result is not orthonormal to ORTH_TOL (1e-4) or not finite; callers keep their
    previous basis with torch.where(ok, Q, U_prev), on the device.
    """
    Q, ok = _orthonormalize_stacked(Y.unsqueeze(0))
    return Q[0], ok[0]


def orthonormalize_batched(Ys: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Orthonormalize many bases at once (the sites of one network call).

    Bases of equal shape are processed as one stacked batch. Returns the list of Q (same order)
    and a bool tensor `ok` of length len(Ys) on the device of the first input.
    """
    if len(Ys) == 0:
        return [], torch.zeros(0, dtype=torch.bool)
    groups: dict[tuple, list[int]] = {}
    for i, Y in enumerate(Ys):
        groups.setdefault((tuple(Y.shape), Y.device), []).append(i)
    Qs: list[torch.Tensor | None] = [None] * len(Ys)
    oks: list[torch.Tensor | None] = [None] * len(Ys)
    for idx in groups.values():
        Qb, okb = _orthonormalize_stacked(torch.stack([Ys[i] for i in idx]))
        for j, i in enumerate(idx):
            Qs[i], oks[i] = Qb[j], okb[j]
    device = Ys[0].device
    return Qs, torch.stack([o.to(device) for o in oks])  # type: ignore[union-attr]


def _orthonormalize_stacked(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, D, r = Y.shape
    A = Y.double()
    finite_col = torch.isfinite(A).all(dim=1)  # (B, r)
    A = torch.where(finite_col[:, None, :], A, torch.zeros((), dtype=A.dtype, device=A.device))
    norms = A.norm(dim=1)  # (B, r)
    tiny = torch.finfo(torch.float32).tiny
    live = finite_col & (norms > tiny)
    A = A / torch.where(live, norms, torch.ones_like(norms))[:, None, :]
    Z = completion_matrix(D, r, Y.device).expand(B, D, r)
    A = torch.where(live[:, None, :], A, Z)

    # Pass 0: detect numerically dependent columns from the Cholesky diagonal.
    R0, _ = _chol_factor(A)
    new_dir = R0.diagonal(dim1=-2, dim2=-1).abs()  # relative, since columns have unit norm
    degenerate = ~(new_dir > DEGENERATE_REL)  # NaN-safe
    A = torch.where(degenerate[:, None, :], Z, A)

    # CholeskyQR2 on the repaired matrix.
    R1, info1 = _chol_factor(A)
    Q1 = _apply_rinv(A, R1)
    R2, info2 = _chol_factor(Q1)
    Q = _apply_rinv(Q1, R2)

    eye = torch.eye(r, dtype=torch.float64, device=Y.device)
    orth_err = (Q.transpose(-2, -1) @ Q - eye).abs().amax(dim=(-2, -1))
    ok = (info1 == 0) & (info2 == 0) & (orth_err <= ORTH_TOL) & torch.isfinite(Q).all(dim=(-2, -1))
    return Q.float(), ok


# ----------------------------------------------------------------------------- range finder


def range_finder(
    X: torch.Tensor,
    k: int,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    compress=None,
    orth=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized range finder for the row space of X (an orthonormal D x k basis Q).

    Q0 = orth(Omega), then `power_iters` block power steps Q <- orth(X^T X Q). The products go
    through `compress` (default: this module's compress_pass) so the kernels serve resets too.
    Returns (Q, Y) with Y = X^T X Q from the final pass, ready for the Ritz step.
    """
    compress = compress_pass if compress is None else compress
    orth = orthonormalize if orth is None else orth
    D = X.shape[1]
    omega = torch.randn(D, k, generator=generator, dtype=torch.float32, device="cpu")
    Q, _ = orth(omega.to(X.device))
    for _ in range(power_iters):
        Q, _ = orth(compress(X, Q, True).Y)
    return Q, compress(X, Q, True).Y


def ritz(Q: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values and vectors of X^T X on span(Q), given Y = X^T X Q.

    Returns (theta descending, fp64) and the rotated basis Q W (fp32, orthonormal). The energy
    ||X (QW)[:, :j]||^2 equals theta[:j].sum() exactly, which makes rank selection exact.
    """
    G = Q.double().t() @ Y.double()
    G = 0.5 * (G + G.t())
    theta, W = torch.linalg.eigh(G)
    theta, W = theta.flip(0), W.flip(1)
    return theta.clamp_min(0.0), (Q.double() @ W).float()


def select_rank(theta: torch.Tensor, e_X: float, target_err: float) -> int | None:
    """Smallest j with theta[:j].sum() >= (1 - target_err^2) e_X, or None if no j reaches it."""
    need = (1.0 - target_err * target_err) * e_X
    cum = torch.cumsum(theta.double().cpu(), 0)
    hits = torch.nonzero(cum >= need)
    return int(hits[0, 0]) + 1 if hits.numel() else None
