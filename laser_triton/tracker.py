"""The LASER algorithm for one site (docs/design.md §2.3-§2.5), on plain (N, D) matrices.

A `SiteTracker` owns the basis U (fp32, orthonormal columns) of one computational site. For
each activation matrix X it produces a `Draft`: the coefficients C = X U, the estimated relative
error, and the next power-iteration product, all on the device with no host synchronization.
The caller decides drafts in batches (one host read per network call) and calls `finalize`:
drafts within `tau` are stored as (C, U); the others go through a reset (randomized range
finder, Ritz-value rank selection, recompression), which may synchronize, and fall back to raw
storage when even `max_rank` cannot meet `tau`. No stored tensor exceeds `tau`.

The basis is never written in place: every update makes a fresh tensor, since packed tensors
still reference older bases.
"""

from __future__ import annotations

import math
import zlib

import torch

from . import launches, magnitude, ops, reference
from .config import LaserConfig, rounding_error
from .distributed import LocalSync
from .drafts import Draft, Stored
from .estimates import (  # noqa: F401  (re-exported: the tracker's public estimates)
    NO_BASIS,
    batch_error,
    error_consts,
    host_error,
    output_rounding,
    plan_shrinks,
    relative_error,
)
from .results import CompressOut
from .util import mm_fp32, to_device_async

__all__ = ["SiteTracker", "Draft", "Stored", "relative_error", "host_error", "batch_error",
           "error_consts", "plan_shrinks"]


class SiteTracker:
    """Basis state and statistics of one site. Not thread-safe (one per site per Laser)."""

    def __init__(self, name: str, width: int, cfg: LaserConfig, sync: LocalSync | None = None):
        self.name = name
        self.sync = sync or LocalSync()
        self.width = width
        self.cfg = cfg
        self.U: torch.Tensor | None = None
        self.pending_Y: torch.Tensor | None = None  # next power product, orthonormalized in batch
        self.pending_shrink: torch.Tensor | None = None  # rotation W[:, :r''] awaiting apply
        self.since_shrink_check = 0
        self.gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(name.encode()))
        # Cumulative statistics. Errors stay on the device; report() reads them.
        self.tensors = 0
        self.resets = 0
        self.raw_fallbacks = 0
        self.shrinks = 0
        self.nonfinite = 0  # tensors with NaN/Inf, stored raw
        self.scale: float | None = None  # power-of-two input scale chosen by the last reset
        # After a reset finds that even max_rank misses tau, the next `_skip` tensors are stored
        # raw without trying (the gap doubles on each such reset, up to 64): a site that does
        # not compress should not pay a range finder per tensor.
        self.backoff = 0
        self._skip = 0
        self.skipped = 0
        # Site maxima of the estimated errors, on the host (decisions arrive there anyway).
        self.max_err: float | None = None
        self.max_row_err: float | None = None
        # Set by Laser: bases advance and shrink in its batched decision points, not per draft.
        self.batched = False

    @property
    def rank(self) -> int:
        return 0 if self.U is None else self.U.shape[1]

    # ------------------------------------------------------------------ checkpointing

    _COUNTERS = ("tensors", "resets", "raw_fallbacks", "shrinks", "nonfinite", "backoff", "_skip",
                 "skipped", "since_shrink_check")

    def state_dict(self) -> dict[str, object]:
        """Everything that decides this site's next tensors: basis, planned shrink, counters,
        back-off and the reset sketch generator. Tensors are detached references (no copy)."""
        if self.pending_Y is not None:
            raise RuntimeError(f"site {self.name}: state_dict() in the middle of a step")
        return {"name": self.name, "width": self.width, "U": self.U,
                "pending_shrink": self.pending_shrink, "gen": self.gen.get_state(),
                "max_err": self.max_err, "max_row_err": self.max_row_err,
                "scale": self.scale, **{k: getattr(self, k) for k in self._COUNTERS}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a state_dict(). Tensors move to the activations' device on first use."""
        if int(state["width"]) != self.width:
            raise ValueError(f"site {self.name}: saved width {state['width']} != {self.width}")
        U = state["U"]
        if U is not None:
            if U.dim() != 2 or U.shape[0] != self.width or U.dtype != torch.float32:
                raise ValueError(f"site {self.name}: saved basis has shape {tuple(U.shape)} and "
                                 f"dtype {U.dtype}; expected ({self.width}, r) float32")
            if U.shape[1] > self.cfg.max_rank:
                U = None  # the config now forbids this rank: the next tensor resets
        self.U = U
        shrink = state["pending_shrink"]
        self.pending_shrink = shrink if U is not None else None
        self.pending_Y = None
        self.gen.set_state(state["gen"])
        self.max_err, self.max_row_err = _host(state["max_err"]), _host(state["max_row_err"])
        for k in self._COUNTERS:
            setattr(self, k, int(state[k]))
        scale = state.get("scale")  # absent in states saved before scales existed
        self.scale = None if scale is None else float(scale)

    def _to_device(self, device: torch.device) -> None:
        """Move restored state to the activations' device (a no-op once there)."""
        for k in ("U", "pending_shrink"):
            v = getattr(self, k)
            if v is not None and v.device != device:
                setattr(self, k, v.to(device))

    # ------------------------------------------------------------------ hot path (no sync)

    def _compress(self, X: torch.Tensor, U: torch.Tensor, need_y: bool) -> CompressOut:
        return ops.compress_pass(X, U, need_y, self.cfg.coeff_dtype)

    def _err(self, out: CompressOut, U: torch.Tensor, X: torch.Tensor,
             out_dtype: torch.dtype | None = None, scale: float | None = None) -> torch.Tensor:
        return relative_error(out, self.cfg, X, U, out_dtype, scale)

    def take_skip(self) -> bool:
        """True when this tensor is to be stored raw without trying (reset back-off)."""
        if self._skip <= 0:
            return False
        self._skip -= 1
        self.tensors += 1
        self.skipped += 1
        return True

    def draft(self, X: torch.Tensor) -> Draft:
        """Compress X with the tracked basis and advance the basis; no host synchronization."""
        self._to_device(X.device)
        self.apply_pending(shrink=not self.batched)
        self.tensors += 1
        U = self.U
        if U is None:  # first tensor at this site: only a reset can build a basis
            e_X = torch.linalg.vector_norm(X, dtype=torch.float32).square()
            stats = torch.cat([e_X.reshape(1), torch.full((3,), math.inf, device=X.device)])
            return Draft(X, None, None, stats, NO_BASIS)
        cfg = self.cfg
        X_raw, scale = X, self.scale
        X = magnitude.scaled(X, scale)  # the site's scale from its last reset (no host read)
        if cfg.mode == "refresh":
            # Refine U on X first (power_iters steps), then compress with the refined basis.
            for _ in range(cfg.power_iters):
                Q, ok = ops.orthonormalize(self._compress(X, U, True).Y)
                U = torch.where(ok, Q, U)
            out = self._compress(X, U, True)
        else:
            out = self._compress(X, U, True)
            Y = out.Y
            for _ in range(cfg.power_iters - 1):  # extra power steps for the next basis only
                Q, ok = ops.orthonormalize(Y)
                Y = self._compress(X, torch.where(ok, Q, U), True).Y
            out = CompressOut(out.C, out.e_X, out.e_C, Y, out.row_err_max, out.c_amax, out.stats)
        N, D = X.shape
        consts = error_consts(cfg, N, D, U.shape[1], X_raw.dtype, scale)
        if cfg.tau < cfg.exact_below:  # measured per tensor (a rebuild): below fp32's resolution
            err = self._err(out, U, X, X_raw.dtype, scale)
            d = Draft(X_raw, out.C, U, torch.stack([out.e_X, err, out.row_err_max, out.c_amax]),
                      consts, measured=True, scale=scale, _err=err)
        else:
            d = Draft(X_raw, out.C, U, out.stats, consts, scale=scale)
        self.since_shrink_check += 1
        if self.since_shrink_check >= cfg.shrink_every and U.shape[1] > cfg.min_rank:
            self.since_shrink_check = 0
            d.shrink_due = True
            if not self.batched:  # Ritz matrix U^T X^T X U, read with the decision
                d.shrink_gram = mm_fp32(U.t(), out.Y)
        self.pending_Y = d.Y = out.Y
        return d

    def apply_pending(self, Q: torch.Tensor | None = None, ok: torch.Tensor | None = None,
                      shrink: bool = True) -> None:
        """Install the next basis from pending_Y (orthonormalized here or given, batched), then
        a planned shrink (unless `shrink` is False: the Laser applies it in its batch)."""
        if self.pending_Y is not None:
            if Q is None:
                Q, ok = ops.orthonormalize(self.sync.sum(self.pending_Y))
            self.U = torch.where(ok, Q, self.U)  # fresh tensor; keeps U_prev where not ok
            self.pending_Y = None
        if shrink and self.pending_shrink is not None and self.U is not None:
            W = self.pending_shrink
            if W.shape[0] == self.U.shape[1]:
                Q, ok = ops.orthonormalize(mm_fp32(self.U, W))
                self.U = torch.where(ok, Q, self.U[:, : W.shape[1]].contiguous())
                self.shrinks += 1
            self.pending_shrink = None

    # ------------------------------------------------------------------ decisions

    def finalize(self, d: Draft, passed: bool,
                 shrink: tuple[torch.Tensor, float] | None = None,
                 target_scale: float = 1.0, *, err: float | None = None,
                 row_err: float | None = None, rotation: torch.Tensor | None = None) -> Stored:
        """Turn a decided draft into what is stored. `passed` came from `err <= tau` on the host.

        The Laser's batches pass the host values `err`, `row_err` and, when a shrink check
        chose fewer columns, the device `rotation` W[:, :r''] (planned for the whole batch by
        `plan_shrinks`). Standalone callers may pass `shrink`, the host copy of (U^T Y, e_X),
        instead; without `err`, the draft's device estimate is read (a synchronization)."""
        if passed:
            if rotation is not None:
                self.pending_shrink = rotation
            elif shrink is not None:
                self._plan_shrink(*shrink, device=d.X.device, dtype=d.X.dtype)
            st = Stored(C=d.C, U=d.U, err=d.err if err is None else err,
                        row_err=d.row_err if row_err is None else row_err, scale=d.scale)
            self._note(st)
        else:
            st = self._reset_noted(d.X, d.e_X, target_scale)
        st.err = st.row_err = None  # folded into the site maxima; entries need not hold them
        return st

    @launches.counted(launches.RESET)
    def _reset_noted(self, X: torch.Tensor, e_X: torch.Tensor, target_scale: float) -> Stored:
        """A reset, and the host read of its device errors into the site maxima: part of the
        slow path (which has synchronized already), booked with it."""
        st = self.reset(X, e_X, target_scale)
        self._note(st)
        return st

    def _note(self, st: Stored) -> None:
        """Fold a stored tensor's errors into the site maxima (host floats; NaN counts)."""
        if st.err is None:
            return
        self.max_err = _host_max(self.max_err, _host(st.err))
        if st.row_err is not None:
            self.max_row_err = _host_max(self.max_row_err, _host(st.row_err))

    def _plan_shrink(self, gram: torch.Tensor, e_X: float, device: torch.device,
                     dtype: torch.dtype) -> None:
        """Drop columns when fewer Ritz directions meet shrink_target * tau (host values)."""
        cfg = self.cfg
        G = gram.double()
        if not (e_X > 0) or not math.isfinite(e_X) or not bool(torch.isfinite(G).all()):
            return
        theta, W = torch.linalg.eigh(0.5 * (G + G.t()))
        theta, W = theta.flip(0).clamp_min(0), W.flip(1)
        target = self._projection_target(cfg.shrink_target, dtype)
        r_new = reference.select_rank(theta, e_X, target) if target > 0 else None
        if r_new is None:
            return
        r_new = max(r_new, cfg.min_rank)
        if r_new < W.shape[0]:
            self.pending_shrink = to_device_async(W[:, :r_new].float(), device)

    def _projection_target(self, frac: float, dtype: torch.dtype) -> float:
        """Projection error allowed so that, with both roundings, err <= frac * tau."""
        rho_c = rounding_error(self.cfg.coeff_dtype)
        t = frac * self.cfg.tau - output_rounding(dtype)
        t2 = t * t - rho_c * rho_c if t > 0 else 0.0
        return math.sqrt(t2) if t2 > 0 else 0.0

    # ------------------------------------------------------------------ slow path (may sync)

    @launches.counted(launches.RESET)
    def reset(self, X: torch.Tensor, e_X: torch.Tensor | None = None,
              target_scale: float = 1.0) -> Stored:
        """Rebuild the basis from X itself and recompress; raw when max_rank cannot meet tau.

        target_scale < 1 asks for a tighter fit (used when sub-views of X must meet tau too).
        With a distributed sync, every collective below runs on all ranks in the same order
        whatever the local data: branches depend only on all-reduced values.
        """
        cfg, sync = self.cfg, self.sync
        self.resets += 1
        launches.note("reset")
        self.pending_Y = None
        self.pending_shrink = None
        # max|X| tells non-finite X (NaN/Inf) from finite X whose ||X||^2 overflows fp32, and
        # picks the site's scale (magnitude.py): one host read, resets synchronize anyway.
        # (e_X, the draft's ||X||^2, may be of another scale: recomputed below.)
        amax = float(X.abs().amax())
        finite = math.isfinite(amax)
        if not finite:
            self.nonfinite += 1
            if not sync.active:
                return self._raw(X, count=True)
        N, D = X.shape
        scale = None
        if finite:
            scale = magnitude.choose_scale(amax, N, D, self._rank_cap(N, D, X.element_size()),
                                           cfg.tau, cfg.coeff_dtype, X.dtype)
            self.scale = scale  # later tensors at this site are read at this scale
        # a faulty rank adds nothing to the basis
        X_work = magnitude.scaled(X, scale) if finite else torch.zeros_like(X)
        e_loc = torch.linalg.vector_norm(X_work, dtype=torch.float32).square()
        e_glob = float(sync.sum(e_loc))
        r_cap = sync.min_int(self._rank_cap(N, D, X.element_size()), X.device)
        target = self._projection_target(cfg.reset_target * target_scale, X.dtype)
        if e_glob == 0.0 and finite:  # all-zero X: any basis is exact
            U = self.U if self.U is not None else reference.completion_matrix(D, 1, X.device).float()
            out = self._compress(X, U, False)
            return Stored(C=out.C, U=U, err=torch.zeros((), device=X.device),
                          row_err=torch.zeros((), device=X.device))
        if not (e_glob > 0.0) or r_cap < 1 or target <= 0:
            return self._raw(X, count=True)

        def power(A: torch.Tensor, B: torch.Tensor, need_y: bool) -> CompressOut:
            out = ops.compress_pass(A, B, need_y, cfg.coeff_dtype)
            Y = sync.sum(out.Y) if need_y else None
            return CompressOut(out.C, out.e_X, out.e_C, Y, out.row_err_max, out.c_amax)

        k_full = min(D, N, r_cap + cfg.oversample)
        k = min(k_full, max(cfg.rank, 2 * self.rank) + cfg.oversample)
        while True:
            Q, Y = reference.range_finder(X_work, k, cfg.reset_power_iters, self.gen,
                                          compress=power, orth=ops.orthonormalize)
            theta, V = reference.ritz(Q, Y)
            r_new = reference.select_rank(theta[: min(k, r_cap)], e_glob, target)
            if r_new is not None or k >= k_full:
                break
            k = k_full
        if r_new is None:
            # Even max_rank misses tau: keep the best basis for tracking, store X raw, and back
            # off (the decision is global under sync_basis, so ranks stay in step).
            self.U = V[:, :r_cap].contiguous()
            self.backoff = min(64, 2 * self.backoff or 1)
            self._skip = self.backoff
            return self._raw(X, count=True)
        self.backoff = 0
        U = V[:, : max(r_new, min(cfg.min_rank, r_cap))].contiguous()
        out = power(X_work, U, True)
        err = self._err(out, U, X_work, X.dtype, scale)
        if bool(sync.any(~(err <= cfg.tau))) and U.shape[1] < r_cap:
            # Ritz energies are exact, so this is rare (rounding, or another rank's data).
            U = V[:, : min(r_cap, U.shape[1] + max(1, U.shape[1] // 4))].contiguous()
            out = power(X_work, U, True)
            err = self._err(out, U, X_work, X.dtype, scale)
        Q, ok = ops.orthonormalize(out.Y)
        self.U = torch.where(ok, Q, U)
        self.since_shrink_check = 0
        if not (finite and bool(err <= cfg.tau)):
            return self._raw(X, count=True)
        return Stored(C=out.C, U=U, err=err, row_err=out.row_err_max, scale=scale)

    def _rank_cap(self, N: int, D: int, itemsize: int) -> int:
        """Largest rank allowed: max_rank, D, N, and strictly fewer bytes than storing X raw."""
        coeff = torch.empty((), dtype=self.cfg.coeff_dtype).element_size()
        by_bytes = (N * D * itemsize - 1) // (N * coeff + D * 4)
        return max(0, min(self.cfg.max_rank, D, N, by_bytes))

    def fallback_raw(self, X: torch.Tensor) -> Stored:
        """Store X raw after all (a caller found the compressed form inadequate)."""
        return self._raw(X, count=True)

    def _raw(self, X: torch.Tensor, count: bool) -> Stored:
        if count:
            self.raw_fallbacks += 1
        return Stored(raw=X, err=0.0, row_err=0.0)


def _host(v: float | torch.Tensor | None) -> float | None:
    return None if v is None else float(v)


def _host_max(a: float | None, b: float) -> float:
    if a is None or b != b:
        return b
    return a if a >= b else b
