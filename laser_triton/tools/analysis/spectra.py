"""The linear algebra of the activation-manifold analysis (issue 6), on plain (N, D) matrices.

Conventions:
- Spectra are singular values of X (N rows = samples x positions, D = the contiguous row width),
  computed from the fp64 Gram X^T X (eigenvalues = sigma^2). Energy fractions are accurate to
  fp64 rounding relative to sigma_1^2, far below any tau of interest.
- Errors are relative Frobenius errors ||X - X_hat|| / ||X||. By Eckart-Young the best rank-r
  error is sqrt(sum_{i>r} sigma_i^2 / sum_i sigma_i^2); a relative error tau needs the rank that
  holds 1 - tau^2 of the energy.
- Effective rank is Roy & Vetterli's (2007): exp of the Shannon entropy of the normalized
  singular values p_i = sigma_i / sum_j sigma_j (sigma, not sigma^2). The participation ratio is
  (sum sigma^2)^2 / sum sigma^4, the effective number of covariance eigenvalues.
- Uncentred vs centred: LASER compresses X itself, so its ranks come from the uncentred
  spectrum; but a trained site's top singular direction is often nearly the column mean, and
  then the uncentred participation ratio mostly counts the mean. `mean_profile` reports the
  centred ratio (of X minus its column mean), the mean's share of the energy and the cosine
  between the top singular direction and the mean, so that both readings are available.
- Principal angles between subspaces come from the singular values of U1^T U2 (cosines) and of
  (I - U1 U1^T) U2 (sines), each used where it is accurate (Bjorck & Golub 1973).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from laser_triton import magnitude
from laser_triton.config import LaserConfig
from laser_triton.tracker import SiteTracker

__all__ = ["Spectrum", "spectrum", "energy_rank", "effective_rank", "participation_ratio",
           "rank_for_error", "optimal_error", "mean_profile", "basis_error", "row_errors", "principal_angles", "top_subspace",
           "FixedRankTracker", "LaserTrackerProbe"]


@dataclass
class Spectrum:
    """Singular values (descending, fp64) and the top right singular vectors of one matrix."""

    sigma: torch.Tensor  # (min(N, D),)
    V: torch.Tensor  # (D, k) right singular vectors, descending; fp64

    @property
    def energy(self) -> torch.Tensor:
        return self.sigma.square()

    def top(self, r: int) -> torch.Tensor:
        return self.V[:, :r]


def spectrum(X: torch.Tensor) -> Spectrum:
    """Singular values and right singular vectors of X from its fp64 Gram matrix."""
    Xd = X.detach().to(torch.float64)
    G = Xd.t() @ Xd
    lam, V = torch.linalg.eigh(0.5 * (G + G.t()))
    lam, V = lam.flip(0).clamp_min(0), V.flip(1)
    k = min(X.shape)
    return Spectrum(lam[:k].sqrt(), V[:, :k])


def _as_sigma(s: Spectrum | torch.Tensor | Sequence[float]) -> torch.Tensor:
    if isinstance(s, Spectrum):
        return s.sigma
    return torch.as_tensor(s, dtype=torch.float64).flatten()


def energy_rank(s: Spectrum | torch.Tensor | Sequence[float], fraction: float) -> int:
    """Smallest r whose top-r singular values hold at least `fraction` of sum sigma^2
    (0 for a zero matrix)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    e = _as_sigma(s).double().square()
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total
    # A tiny tolerance keeps exact fractions (e.g. 1.0 on a rank-r matrix) from spilling over.
    r = int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=torch.float64)))
    return min(r + 1, e.numel())


def rank_for_error(s: Spectrum | torch.Tensor | Sequence[float], tau: float) -> int:
    """Smallest r with optimal relative error <= tau (the rank holding 1 - tau^2 energy)."""
    return energy_rank(s, 1.0 - tau * tau) if tau > 0 else _as_sigma(s).numel()


def effective_rank(s: Spectrum | torch.Tensor | Sequence[float]) -> float:
    """Roy & Vetterli's effective rank exp(H(sigma / sum sigma)); 0 for a zero matrix."""
    sig = _as_sigma(s).double()
    total = float(sig.sum())
    if total == 0.0:
        return 0.0
    p = sig[sig > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def participation_ratio(s: Spectrum | torch.Tensor | Sequence[float]) -> float:
    """(sum sigma^2)^2 / sum sigma^4; 0 for a zero matrix."""
    e = _as_sigma(s).double().square()
    den = float(e.square().sum())
    return float(e.sum()) ** 2 / den if den > 0 else 0.0


def mean_profile(X: torch.Tensor, s: Spectrum | None = None) -> dict[str, float]:
    """How much of X's spectrum is its column mean:

    - participation_centred: participation ratio of X - 1 mean^T (fp64);
    - mean_energy: N ||mean||^2 / ||X||^2, the share of the energy in the mean (0 for X = 0);
    - top_mean_cos: |cos| between the top right singular vector and the mean (0 if either is 0).
    """
    Xd = X.detach().to(torch.float64)
    s = spectrum(Xd) if s is None else s
    mu = Xd.mean(dim=0)
    total = float(Xd.square().sum())
    nmu = float(torch.linalg.vector_norm(mu))
    cos = abs(float(s.V[:, 0] @ mu)) / nmu if nmu > 0 and s.V.shape[1] else 0.0
    return {"participation_centred": participation_ratio(spectrum(Xd - mu)),
            "mean_energy": Xd.shape[0] * nmu * nmu / total if total > 0 else 0.0,
            "top_mean_cos": min(cos, 1.0)}


def optimal_error(s: Spectrum | torch.Tensor | Sequence[float], r: int) -> float:
    """Eckart-Young: the smallest relative Frobenius error of any rank-r approximation."""
    e = _as_sigma(s).double().square()
    total = float(e.sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(0.0, float(e[r:].sum()) / total))


def basis_error(X: torch.Tensor, U: torch.Tensor) -> float:
    """||X - X U U^T|| / ||X|| for orthonormal U (D, r), computed from the residual in fp64."""
    Xd, Ud = X.detach().double(), U.detach().double()
    nx = float(torch.linalg.vector_norm(Xd))
    if nx == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(Xd - (Xd @ Ud) @ Ud.t())) / nx


def row_errors(X: torch.Tensor, X_hat: torch.Tensor) -> torch.Tensor:
    """Per-row relative errors ||x_i - x_hat_i|| / ||x_i|| (0 where x_i = 0 = x_hat_i)."""
    Xd, Hd = X.detach().double(), X_hat.detach().double()
    num = torch.linalg.vector_norm(Xd - Hd, dim=1)
    den = torch.linalg.vector_norm(Xd, dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-300),
                       torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)))


def principal_angles(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(U1) and span(U2), both with
    orthonormal columns; min(r1, r2) angles."""
    A, B = U1.detach().double(), U2.detach().double()
    if A.shape[1] > B.shape[1]:
        A, B = B, A
    k = A.shape[1]
    cos = torch.linalg.svdvals(B.t() @ A).clamp(0.0, 1.0)[:k]  # descending cosines
    sin = torch.linalg.svdvals(A - B @ (B.t() @ A)).clamp(0.0, 1.0).flip(0)[:k]  # ascending
    by_cos = torch.arccos(cos)
    by_sin = torch.arcsin(sin)
    return torch.where(by_cos < math.pi / 4, by_sin, by_cos)


def top_subspace(X: torch.Tensor, r: int) -> torch.Tensor:
    """The top-r right singular subspace of X (D, r), fp64."""
    return spectrum(X).top(r)


class FixedRankTracker:
    """Subspace iteration at a fixed rank r, the ideal form of LASER's tracking (no resets, no
    rank changes, fp64), in both modes:

    - 'lagged': compress X_t with U_t, then U_{t+1} = orth(X_t^T X_t U_t);
    - 'refresh': U' = orth(X_t^T X_t U_t) first, compress X_t with U', then
      U_{t+1} = orth(X_t^T X_t U').

    The first matrix starts the basis from its own top-r subspace (what a reset would build).
    `power_iters` extra steps per matrix run before compressing in refresh mode.
    """

    def __init__(self, rank: int, mode: str = "lagged", power_iters: int = 1):
        if mode not in ("lagged", "refresh"):
            raise ValueError(f"mode must be 'lagged' or 'refresh', got {mode!r}")
        if rank < 1 or power_iters < 1:
            raise ValueError("rank and power_iters must be >= 1")
        self.rank, self.mode, self.power_iters = rank, mode, power_iters
        self.U: torch.Tensor | None = None

    @staticmethod
    def _power(X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        # Householder QR in fp64: the ideal iteration, free of the kernels' rounding.
        return torch.linalg.qr(X.t() @ (X @ U)).Q

    def step(self, X: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Compress X; returns (relative error, the basis it was compressed with)."""
        Xd = X.detach().double()
        r = min(self.rank, *Xd.shape)
        if self.U is None:
            self.U = top_subspace(Xd, r)
        U = self.U
        if self.mode == "refresh":
            for _ in range(self.power_iters):
                U = self._power(Xd, U)
        err = basis_error(Xd, U)
        self.U = self._power(Xd, U)
        return err, U


class LaserTrackerProbe:
    """Drives a real `SiteTracker` (with its resets, rank selection and shrinking) over a
    sequence of matrices, as the hooks would one tensor per network call, and measures what
    unpack would return."""

    def __init__(self, name: str, width: int, cfg: LaserConfig):
        self.cfg = cfg
        self.tracker = SiteTracker(name, width, cfg)

    def step(self, X: torch.Tensor, period: int = 0) -> dict[str, float]:
        """Compress X. `period`: rows per sample when rows are (sample, position) pairs, so that
        rows i*period are position 0 (the halting head's); 0 when rows are not positions."""
        tr, cfg = self.tracker, self.cfg
        resets, fallbacks = tr.resets, tr.raw_fallbacks
        with torch.no_grad():
            d = tr.draft(X)
            passed = bool(d.err <= cfg.tau)
            shrink = None if d.shrink_gram is None else (d.shrink_gram, float(d.e_X))
            st = tr.finalize(d, passed, shrink)
            raw = st.is_raw
            X_hat = X if raw else magnitude.rebuild(st.C, st.U, X.dtype, st.scale)
        rows = row_errors(X, X_hat)
        nx = float(torch.linalg.vector_norm(X.double()))
        err = float(torch.linalg.vector_norm(X.double() - X_hat.double())) / nx if nx > 0 else 0.0
        pos0 = rows[::period] if period and X.shape[0] % period == 0 else None
        return {
            "rank": 0 if raw else int(st.U.shape[1]),
            "err": err,
            "reset": float(tr.resets > resets),
            "raw": float(raw or tr.raw_fallbacks > fallbacks),
            "row_err_max": float(rows.max()),
            "row0_err": float(rows[0]),
            "pos0_row_err_max": float(pos0.max()) if pos0 is not None else math.nan,
            "stored_bytes": X.numel() * X.element_size() if raw
            else st.C.numel() * st.C.element_size() + st.U.numel() * 4,
        }
