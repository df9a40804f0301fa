"""LaserConfig: every knob of the algorithm, validated on construction."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["LaserConfig", "rounding_error"]

_COEFF_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MODES = ("lagged", "refresh")


def rounding_error(dtype: torch.dtype) -> float:
    """Bound on ||round(C) - C|| / ||C|| for round-to-nearest into `dtype` (half an ulp).

    bf16 keeps 8 significant bits (2^-9), fp16 11 (2^-12), fp32 24 (2^-25). The rounding error
    of the coefficients lies in span(U), orthogonal to the projection residual, so the two add
    in quadrature.
    """
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    return 2.0 ** -(bits + 1)


@dataclass(frozen=True)
class LaserConfig:
    """Settings of LASER (DESIGN §2). All sizes are per site.

    rank: starting rank. A site's first tensor builds its basis with a randomized sketch of
        about this width (widened up to max_rank when it is not enough); rank selection then
        picks the smallest rank that meets `tau`.
    max_rank: ceiling; a tensor that needs more is stored raw.
    min_rank: floor for rank selection and shrinking (default 1).
    tau: relative Frobenius error bound per stored activation; 0 turns compression off.
    power_iters: block power steps per tensor (1 = one fused pass per tensor).
    mode: 'lagged' (compress with the current basis, then update it from the same pass) or
        'refresh' (update the basis from X first, then compress: one more pass, better fit).
    min_width: tensors whose contiguous row is narrower are stored raw.
    coeff_dtype: dtype of the stored coefficients C.
    oversample, reset_power_iters: randomized range finder used by resets.
    reset_target: resets pick the rank for reset_target * tau, leaving room for drift.
    shrink_target, shrink_every: every `shrink_every` tensors a site checks its Ritz values and
        drops columns it does not need to reach shrink_target * tau.
    exact_below: for tau below this, the error is measured from the residual directly, because
        1 - e_C/e_X cannot resolve it in fp32.
    batch_size: fidelity decisions are resolved per network call, or after this many tensors.
    decision_lag: batches (network calls) whose decisions may still be on their way to the
        host; with more outstanding, the host waits for the oldest (an event wait, not a device
        synchronization). Undecided tensors are held raw, so this bounds them to about
        decision_lag + 1 calls even when the host runs far ahead of the GPU.
    include, exclude: fnmatch patterns on site names (exclude wins); excluded sites store raw.
    site_overrides: {pattern: {field: value}} applied to matching sites (first match wins per
        field), e.g. {"y/*": {"tau": 0.03, "max_rank": 64}}.
    seed: seeds the random sketches of resets, per site.
    sync_basis: share bases across torch.distributed ranks: power products and Gram matrices
        are summed over ranks and reset decisions all-reduced first (see laser_triton.distributed).
    """

    rank: int = 32
    max_rank: int = 128
    min_rank: int = 1
    tau: float = 0.05
    power_iters: int = 1
    mode: str = "lagged"
    min_width: int = 128
    coeff_dtype: torch.dtype = torch.bfloat16
    oversample: int = 8
    reset_power_iters: int = 2
    reset_target: float = 0.85
    shrink_target: float = 0.6
    shrink_every: int = 8
    exact_below: float = 0.02
    batch_size: int = 64
    decision_lag: int = 1
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    site_overrides: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    seed: int = 0
    sync_basis: bool = False

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"LaserConfig: {msg}")

        for name in ("rank", "max_rank", "min_rank", "power_iters", "min_width", "oversample",
                     "shrink_every", "batch_size", "decision_lag"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"LaserConfig: {name} must be an int, got {type(v).__name__}")
        need(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        need(self.min_rank >= 1, f"min_rank must be >= 1, got {self.min_rank}")
        need(self.max_rank >= self.rank, f"max_rank ({self.max_rank}) must be >= rank ({self.rank})")
        need(self.min_rank <= self.rank, f"min_rank ({self.min_rank}) must be <= rank ({self.rank})")
        need(self.power_iters >= 1, f"power_iters must be >= 1, got {self.power_iters}")
        need(self.reset_power_iters >= 0, "reset_power_iters must be >= 0")
        need(self.min_width >= 1, f"min_width must be >= 1, got {self.min_width}")
        need(self.oversample >= 0, f"oversample must be >= 0, got {self.oversample}")
        need(self.shrink_every >= 1, "shrink_every must be >= 1")
        need(self.batch_size >= 1, "batch_size must be >= 1")
        need(self.decision_lag >= 0, f"decision_lag must be >= 0, got {self.decision_lag}")
        need(self.mode in _MODES, f"mode must be one of {_MODES}, got {self.mode!r}")
        if not isinstance(self.tau, (int, float)) or isinstance(self.tau, bool):
            raise TypeError(f"LaserConfig: tau must be a float, got {type(self.tau).__name__}")
        need(0.0 <= self.tau < 1.0, f"tau must be in [0, 1), got {self.tau}")
        if self.coeff_dtype not in _COEFF_DTYPES:
            raise TypeError(f"LaserConfig: coeff_dtype must be bfloat16, float16 or float32, "
                            f"got {self.coeff_dtype}")
        if self.tau > 0:
            rho = rounding_error(self.coeff_dtype)
            need(self.tau * self.reset_target > 2 * rho,
                 f"tau={self.tau} is below what {self.coeff_dtype} coefficients can hold "
                 f"(rounding alone adds {rho:.2e}); use a wider coeff_dtype or a larger tau")
        for name in ("reset_target", "shrink_target"):
            v = getattr(self, name)
            need(0.0 < v <= 1.0, f"{name} must be in (0, 1], got {v}")
        need(self.shrink_target <= self.reset_target,
             "shrink_target must be <= reset_target, or shrinking would undo every reset")
        need(0.0 <= self.exact_below < 1.0, "exact_below must be in [0, 1)")
        for name in ("include", "exclude"):
            pats = getattr(self, name)
            if isinstance(pats, str) or not all(isinstance(p, str) for p in pats):
                raise TypeError(f"LaserConfig: {name} must be a sequence of glob strings")
            object.__setattr__(self, name, tuple(pats))
        valid = {f.name for f in dataclasses.fields(self)} - {"include", "exclude",
                                                               "site_overrides", "seed",
                                                               "sync_basis"}
        for pat, over in self.site_overrides.items():
            bad = set(over) - valid
            need(not bad, f"site_overrides[{pat!r}] names unknown fields {sorted(bad)}")

    @property
    def enabled(self) -> bool:
        return self.tau > 0

    def for_site(self, site: str) -> LaserConfig | None:
        """The config that applies to `site`, or None when the site is excluded."""
        if not any(fnmatch.fnmatchcase(site, p) for p in self.include):
            return None
        if any(fnmatch.fnmatchcase(site, p) for p in self.exclude):
            return None
        changes: dict[str, object] = {}
        for pat, over in self.site_overrides.items():
            if fnmatch.fnmatchcase(site, pat):
                for k, v in over.items():
                    changes.setdefault(k, v)
        if not changes:
            return self
        return dataclasses.replace(self, **changes, site_overrides={})
