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
from .util import mm_fp32, to_device_async

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
    N, D = X.shape
    r = U.shape[1]
    # Rows are widened to fp32 a block at a time (peak memory, issue 15): an fp32 copy of a
    # whole bf16 X (and its squares) is 4x X: it set `paper_sudoku`'s step peak in a reset once
    # the orthonormalization's workspace had shrunk (perf/peak_breakdown.py, 441 MiB). One
    # block when X is fp32 (X.float() is X) or small.
    step = N if X.dtype == torch.float32 else max(1, _WIDEN_ELEMS // max(D, 1))
    if step >= N:
        return _compress_block_out(X.float(), U, need_y, coeff_dtype)
    C = torch.empty(N, r, dtype=coeff_dtype, device=X.device)
    row_x = torch.empty(N, dtype=torch.float32, device=X.device)
    row_c = torch.empty(N, dtype=torch.float32, device=X.device)
    c_amax = torch.zeros((), device=X.device)
    Y = torch.zeros(D, r, dtype=torch.float32, device=X.device) if need_y else None
    for i in range(0, N, step):
        Xf = X[i:i + step].float()
        C32 = _mm_fp32(Xf, U)
        row_x[i:i + step] = Xf.square().sum(dim=1)
        row_c[i:i + step] = C32.square().sum(dim=1)
        c_amax = torch.maximum(c_amax, C32.abs().amax())
        if Y is not None:
            Y += _mm_fp32(Xf.t(), C32)
        C[i:i + step] = C32
    return _compress_stats(C, row_x, row_c, c_amax, Y)


# Rows of a bf16/fp16 X widened to fp32 at a time by compress_pass (2 MiB of fp32; with its squares 4 MiB).
_WIDEN_ELEMS = 1 << 19


def _compress_block_out(Xf: torch.Tensor, U: torch.Tensor, need_y: bool,
                        coeff_dtype: torch.dtype) -> CompressOut:
    """compress_pass of an fp32 X in one block."""
    C32 = _mm_fp32(Xf, U)
    row_x = Xf.square().sum(dim=1)
    row_c = C32.square().sum(dim=1)
    c_amax = C32.abs().amax() if C32.numel() else torch.zeros((), device=Xf.device)
    Y = _mm_fp32(Xf.t(), C32) if need_y else None
    return _compress_stats(C32.to(coeff_dtype), row_x, row_c, c_amax, Y)


def _compress_stats(C: torch.Tensor, row_x: torch.Tensor, row_c: torch.Tensor,
                    c_amax: torch.Tensor, Y: torch.Tensor | None) -> CompressOut:
    e_X = row_x.sum()
    e_C = row_c.sum()
    rel = torch.where(row_x > 0, (1.0 - row_c / row_x).clamp_min(0.0), torch.zeros_like(row_x))
    row_err_max = rel.max().sqrt()
    stats = torch.stack([e_X, e_C, row_err_max, c_amax])  # one buffer, as the kernels return
    return CompressOut(C, stats[0], stats[1], Y, stats[2], stats[3], stats)


def reconstruct(C: torch.Tensor, U: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """X_hat = C U^T, computed in fp32 and cast to `dtype` (default C's dtype)."""
    dtype = C.dtype if dtype is None else dtype
    N, D = C.shape[0], U.shape[0]
    step = max(1, _WIDEN_ELEMS // max(D, 1))
    if dtype == torch.float32 or step >= N:
        return _mm_fp32(C.float(), U.t()).to(dtype)
    # A narrow output is filled a block of rows at a time (peak memory, issue 15): the fp32
    # product of the whole region was twice the rebuild, alive next to it in backward.
    out = torch.empty(N, D, dtype=dtype, device=C.device)
    for i in range(0, N, step):
        out[i:i + step] = _mm_fp32(C[i:i + step].float(), U.t())
    return out


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


def _chol_factor(A: torch.Tensor, real: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor R of A^T A (fp64 Gram, tiny relative shift) and its info code.

    `real` (B, R) marks the columns of rank-padded inputs: padded columns are zero, so the
    Gram is block diagonal; they get a unit diagonal (R = diag(R_real, I), leaving the real
    columns' factor as without padding) and the shift uses each input's own rank."""
    G = A.transpose(-2, -1) @ A
    r = G.shape[-1]
    trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    # The shift goes onto G's diagonal in place: no second (B, r, r) copy.
    if real is None:
        G.diagonal(dim1=-2, dim2=-1).add_((torch.finfo(torch.float64).eps * r * trace)[:, None])
        return _cholesky_upper(G)
    shift = torch.finfo(torch.float64).eps * real.sum(-1) * trace
    diag = torch.where(real, shift[:, None], torch.ones((), dtype=G.dtype, device=G.device))
    G.diagonal(dim1=-2, dim2=-1).add_(diag)
    return _cholesky_upper(G)


def _cholesky_upper(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    Bases of equal width D are processed as one stacked batch whatever their ranks: ranks that
    differ are zero-padded to the largest (padded columns are kept out of every factor, so each
    basis comes out as it would alone), so the torch ops per call depend on the number of
    distinct widths, not on the mix of ranks. Returns the list of Q (same order; views) and a
    bool tensor `ok` of length len(Ys) on the device of the first input.
    """
    if len(Ys) == 0:
        return [], torch.zeros(0, dtype=torch.bool)
    groups: dict[tuple, list[int]] = {}
    for i, Y in enumerate(Ys):
        groups.setdefault((Y.shape[0], Y.device), []).append(i)
    Qs: list[torch.Tensor | None] = [None] * len(Ys)
    order: list[int] = []
    group_ok = []
    for idx in groups.values():
        ranks = [Ys[i].shape[1] for i in idx]
        if len(set(ranks)) == 1:
            Qb, okb = _orthonormalize_stacked(torch.stack([Ys[i] for i in idx]))
        else:
            Qb, okb = _orthonormalize_padded([Ys[i] for i in idx], ranks)
        for j, i in enumerate(idx):
            Qs[i] = Qb[j, :, : ranks[j]]
        order += idx
        group_ok.append(okb)
    device = Ys[0].device
    ok = torch.cat([o.to(device) for o in group_ok]) if len(group_ok) > 1 else group_ok[0]
    if order != sorted(order):
        ok = ok[to_device_async(torch.tensor(order).argsort(), device)]
    return Qs, ok  # type: ignore[return-value]


def _orthonormalize_padded(Ys: list[torch.Tensor], ranks: list[int]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bases of one width D and different ranks as one (B, D, R) batch, R = max rank: the
    inputs side by side (one cat), spread into padded slots by one index_select."""
    D, R, device = Ys[0].shape[0], max(ranks), Ys[0].device
    cols, real, o = [], [], 0
    for r in ranks:
        cols += [o + min(c, r - 1) for c in range(R)]
        real.append([c < r for c in range(R)])
        o += r
    cols_t = to_device_async(torch.tensor(cols), device)
    real_t = to_device_async(torch.tensor(real), device)

    def spread(M: torch.Tensor) -> torch.Tensor:
        P = M.index_select(1, cols_t).view(D, len(ranks), R).permute(1, 0, 2)
        return P.masked_fill_(~real_t[:, None, :], 0.0)  # in place: no second padded copy

    # Passed without holding them here: the callee frees A and Z before its factor passes.
    return _orthonormalize_stacked(
        spread(torch.cat(list(Ys), dim=1)),
        spread(torch.cat([completion_matrix(D, r, device) for r in ranks], dim=1)), real_t)


def _orthonormalize_stacked(Y: torch.Tensor, Z: torch.Tensor | None = None,
                            real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CholeskyQR2 of a (B, D, r) batch; `Z` the completion directions (default: this shape's),
    `real` the (B, r) mask of rank-padded inputs (padded columns are zero in Y and Z)."""
    B, D, r = Y.shape
    device = Y.device
    # Workspace (peak memory, issue 15): one fp64 copy of the batch is repaired in place, and
    # each factor pass frees its input, so at most two fp64 (B, D, r) copies are alive at once.
    A = Y.double()
    del Y  # the caller's stack/spread is not held here either
    # Columns with a NaN/inf have a non-finite sum (|values| < 3.4e38 * D cannot overflow
    # fp64): no (B, D, r) bool mask.
    finite_col = torch.isfinite(A.sum(dim=1))  # (B, r)
    A.masked_fill_(~finite_col[:, None, :], 0.0)
    norms = torch.linalg.vector_norm(A, dim=1)  # (B, r)
    tiny = torch.finfo(torch.float32).tiny
    live = finite_col & (norms > tiny)
    A.div_(torch.where(live, norms, torch.ones_like(norms))[:, None, :])
    Z = completion_matrix(D, r, device).expand(B, D, r) if Z is None else Z
    torch.where(live[:, None, :], A, Z, out=A)  # padded columns: Z is zero there too

    # Pass 0: detect numerically dependent columns from the Cholesky diagonal.
    R0, _ = _chol_factor(A, real)
    new_dir = R0.diagonal(dim1=-2, dim2=-1).abs()  # relative, since columns have unit norm
    degenerate = ~(new_dir > DEGENERATE_REL)  # NaN-safe
    torch.where(degenerate[:, None, :], Z, A, out=A)
    del Z, R0  # before the factor passes: a padded batch's Z is as large as A

    # CholeskyQR2 on the repaired matrix.
    R1, info1 = _chol_factor(A, real)
    Q1 = _apply_rinv(A, R1)
    del A, R1
    R2, info2 = _chol_factor(Q1, real)
    Q = _apply_rinv(Q1, R2)
    del Q1, R2

    eye = torch.eye(r, dtype=torch.float64, device=device)
    if real is not None:
        eye = torch.diag_embed(real.double())  # padded columns stay zero
    orth_err = (Q.transpose(-2, -1) @ Q - eye).abs().amax(dim=(-2, -1))
    # A non-finite entry makes the sum non-finite (no (B, D, r) mask); orth_err fails too.
    ok = (info1 == 0) & (info2 == 0) & (orth_err <= ORTH_TOL) & torch.isfinite(Q.sum(dim=(-2, -1)))
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
