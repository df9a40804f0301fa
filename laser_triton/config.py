"""LaserConfig: every knob of the algorithm, validated on construction."""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .validation import DTYPES_BY_NAME, FLOAT_DTYPES

__all__ = ["LaserConfig", "rounding_error"]

# Names accepted for coeff_dtype besides the torch dtypes themselves (JSON, command lines):
# torch's ("bfloat16"), the short ones ("bf16") and two aliases.
_DTYPE_NAMES = {**{str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}, **DTYPES_BY_NAME,
                "half": torch.float16, "float": torch.float32}
_MODES = ("lagged", "refresh")
_INT_FIELDS = ("rank", "max_rank", "min_rank", "power_iters", "min_width", "oversample",
               "reset_power_iters", "shrink_every", "batch_size", "decision_lag", "seed")
_FLOAT_FIELDS = ("tau", "reset_target", "shrink_target", "exact_below")
# Fields that act on the whole step (or the whole Laser), never per site.
_GLOBAL_ONLY = frozenset({"batch_size", "decision_lag", "include", "exclude", "site_overrides",
                          "seed", "sync_basis", "lowrank_backward"})


def _as_int(name: str, v: object) -> int:
    """v as a Python int: ints and numpy integers, never bools or floats (even 2.0)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"LaserConfig: {name} must be an int, got {type(v).__name__} {v!r}")
    return int(v)


def _as_float(name: str, v: object) -> float:
    """v as a Python float: ints, floats and numpy scalars of either, never bools or strings."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"LaserConfig: {name} must be a float, got {type(v).__name__} {v!r}")
    return float(v)


def _as_coeff_dtype(v: object) -> torch.dtype:
    names = ", ".join(repr(k) for k in _DTYPE_NAMES)
    if isinstance(v, str):
        dt = _DTYPE_NAMES.get(v.strip().lower().removeprefix("torch."))
        if dt is None:
            raise TypeError(f"LaserConfig: coeff_dtype {v!r} is not a known name; use "
                            f"torch.bfloat16, torch.float16 or torch.float32, or one of {names}")
        return dt
    if v not in FLOAT_DTYPES:
        raise TypeError(f"LaserConfig: coeff_dtype must be torch.bfloat16, torch.float16 or "
                        f"torch.float32 (or one of {names}), got {v!r}")
    return v  # type: ignore[return-value]


def _as_patterns(name: str, pats: object) -> tuple[str, ...]:
    """A tuple of fnmatch patterns; rejects what cannot be one (None, a bare string, non-str
    items) and malformed globs that would silently match nothing intended."""
    if isinstance(pats, str) or not isinstance(pats, (Sequence, set, frozenset)):
        raise TypeError(f"LaserConfig: {name} must be a sequence of glob strings, "
                        f"got {type(pats).__name__} {pats!r}")
    out = tuple(pats)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"LaserConfig: {name} must hold glob strings, got "
                            f"{type(p).__name__} {p!r}")
        if not p:
            raise ValueError(f"LaserConfig: {name} has an empty pattern, which matches no site")
        if _unclosed_bracket(p):
            raise ValueError(f"LaserConfig: {name} pattern {p!r} has an unclosed '['; fnmatch "
                             "would read it as a literal '[' (write '[[]' for one)")
    return out


def _unclosed_bracket(p: str) -> bool:
    """True when a '[' in glob p opens a class that never closes (fnmatch's rules)."""
    i, n = 0, len(p)
    while i < n:
        if p[i] == "[":
            j = i + 1
            if j < n and p[j] == "!":
                j += 1
            if j < n and p[j] == "]":
                j += 1
            while j < n and p[j] != "]":
                j += 1
            if j >= n:
                return True
            i = j
        i += 1
    return False


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
    """Settings of LASER (docs/design.md §2), validated on construction. Sizes are per site.

    Attributes:
        rank: starting rank (default 32). A site's first tensor builds its basis with a
            randomized sketch of about this width (widened up to max_rank when it is not
            enough); rank selection then picks the smallest rank that meets `tau`.
        max_rank: ceiling (default 128); a tensor that needs more is stored raw. Regions with
            fewer rows than max_rank are stored raw too.
        min_rank: floor for rank selection and shrinking (default 1).
        tau: relative Frobenius error bound per stored activation (default 0.05), in [0, 1);
            0 turns compression off (bit-identical gradients).
        power_iters: block power steps per tensor (default 1 = one fused pass per tensor).
        mode: 'lagged' (default: compress with the current basis, then update it from the
            same pass) or 'refresh' (update the basis from X first, then compress: one more
            pass, better fit).
        min_width: tensors whose contiguous row is narrower are stored raw (default 128).
        coeff_dtype: dtype of the stored coefficients C (default torch.bfloat16); its rounding
            is part of the error bound. Also accepts a name ("bfloat16", "bf16", "float16",
            "fp16", "float32", ...).
        oversample: extra sketch columns of the randomized range finder of resets (default 8).
        reset_power_iters: power steps of that range finder (default 2).
        reset_target: resets pick the rank for reset_target * tau (default 0.85), leaving room
            for drift before the next reset.
        shrink_target: every `shrink_every` tensors a site checks its Ritz values and drops
            the columns it does not need to reach shrink_target * tau (default 0.6; at most
            reset_target).
        shrink_every: tensors between two shrink checks of a site (default 8).
        exact_below: for tau below this (default 0.02) the error is measured from the
            residual directly, because 1 - e_C/e_X cannot resolve it in fp32.
        batch_size: fidelity decisions are resolved per network call, or after this many
            tensors (default 64).
        decision_lag: batches (network calls) whose decisions may still be on their way to
            the host (default 1); with more outstanding, the host waits for the oldest (an
            event wait, not a device synchronization). Undecided tensors are held raw, so
            this bounds them to about decision_lag + 1 calls even when the host runs far
            ahead of the GPU.
        include: fnmatch patterns of the site names LASER may compress (default ("*",)).
        exclude: fnmatch patterns of sites stored raw (default none); exclude wins.
        site_overrides: {pattern: {field: value}} applied to matching sites (first match wins
            per field), e.g. {"y/*": {"tau": 0.03, "max_rank": 64}}. Every field may be
            overridden except those acting on the whole step (batch_size, decision_lag,
            include, exclude, seed, sync_basis, lowrank_backward), which are rejected; each
            pattern's values are
            validated here. A site whose tau is 0 is stored raw, like an excluded one.
        seed: seeds the random sketches of resets, per site (default 0).
        sync_basis: share bases across torch.distributed ranks (default False): power
            products and Gram matrices are summed over ranks and reset decisions all-reduced
            first (see laser_triton.distributed).
        lowrank_backward: linear layers that support it (`laser_triton.lowrank.linear`, the
            TRM's projections) take their weight gradient from a compressed input's (C, U) as
            (G^T C) U^T, without rebuilding the input, where that costs fewer flops (default
            True); False rebuilds every input in backward (laser_triton/lowrank.py).

    Integers and floats may be numpy scalars, in site_overrides too.

    Warning:
        - `tau` bounds the error of each stored activation, ||X - X_hat||_F <= tau ||X||_F for
          every tensor rebuilt in backward (or X is kept exactly), not of the gradients (in
          practice a small multiple of tau). It must leave room for the rounding of
          `coeff_dtype`: tau * reset_target must exceed twice its half-ulp, or construction
          raises (e.g. fp16 or fp32 coefficients for very small tau).
        - A config does not make attention safe: run SDPA inside `Laser.raw()` (or exclude
          its sites), since its backward needs exact q and k.
        - The rules of use belong to `Laser`: one thread per Laser, no `fullgraph=True` around
          `compress()`, and a saved tensor modified in place must not feed backward.
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
    lowrank_backward: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"LaserConfig: {msg}")

        for name in _INT_FIELDS:
            object.__setattr__(self, name, _as_int(name, getattr(self, name)))
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        object.__setattr__(self, "coeff_dtype", _as_coeff_dtype(self.coeff_dtype))
        if not isinstance(self.sync_basis, (bool, np.bool_)):
            raise TypeError(f"LaserConfig: sync_basis must be a bool, got {self.sync_basis!r}")
        object.__setattr__(self, "sync_basis", bool(self.sync_basis))
        if not isinstance(self.lowrank_backward, (bool, np.bool_)):
            raise TypeError(f"LaserConfig: lowrank_backward must be a bool, got "
                            f"{self.lowrank_backward!r}")
        object.__setattr__(self, "lowrank_backward", bool(self.lowrank_backward))
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
        need(isinstance(self.mode, str) and self.mode in _MODES,
             f"mode must be one of {_MODES}, got {self.mode!r}")
        need(0.0 <= self.tau < 1.0, f"tau must be in [0, 1), got {self.tau}")
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
            object.__setattr__(self, name, _as_patterns(name, getattr(self, name)))
        object.__setattr__(self, "site_overrides", self._checked_overrides())

    def _checked_overrides(self) -> dict[str, dict[str, object]]:
        """site_overrides with each pattern's fields validated (and normalized, e.g. dtype
        names) by building the config it gives, so a bad value fails here, not in a hook."""
        overrides = self.site_overrides
        if not isinstance(overrides, Mapping):
            raise TypeError("LaserConfig: site_overrides must be a dict {pattern: {field: value}}, "
                            f"got {type(overrides).__name__}")
        out: dict[str, dict[str, object]] = {}
        for pat, over in overrides.items():
            _as_patterns("site_overrides", (pat,))
            where = f"site_overrides[{pat!r}]"
            if not isinstance(over, Mapping):
                raise TypeError(f"LaserConfig: {where} must be a dict {{field: value}}, "
                                f"got {type(over).__name__}")
            unknown = sorted(set(over) - _PER_SITE - _GLOBAL_ONLY)
            if unknown:
                raise ValueError(f"LaserConfig: {where} names unknown fields {unknown}; "
                                 f"per-site fields: {sorted(_PER_SITE)}")
            global_ = sorted(set(over) & _GLOBAL_ONLY)
            if global_:
                raise ValueError(f"LaserConfig: {where} sets {global_}, which apply to the whole "
                                 f"step and cannot be set per site; per-site fields: "
                                 f"{sorted(_PER_SITE)}")
            try:
                site = dataclasses.replace(self, **over, site_overrides={})
            except (TypeError, ValueError) as exc:
                msg = str(exc).removeprefix("LaserConfig: ")
                raise type(exc)(f"LaserConfig: {where}: {msg}") from None
            out[pat] = {k: getattr(site, k) for k in over}
        return out

    @property
    def enabled(self) -> bool:
        """True when some site compresses (tau > 0 globally or in a site override)."""
        return self.tau > 0 or any(float(o.get("tau", 0.0)) > 0  # type: ignore[arg-type]
                                   for o in self.site_overrides.values())

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
        try:
            return dataclasses.replace(self, **changes, site_overrides={})
        except (TypeError, ValueError) as exc:  # overrides from several patterns that conflict
            msg = str(exc).removeprefix("LaserConfig: ")
            raise type(exc)(f"LaserConfig: site {site!r} (site_overrides combined): {msg}") from None


# Every field a site override may set; each is read from the site's own config.
_PER_SITE = frozenset(f.name for f in dataclasses.fields(LaserConfig)) - _GLOBAL_ONLY
