"""One declaration per kernel: `KernelSpec`, written next to its `@triton.jit` function.

Everything the rest of the package needs to know about a kernel lives in its spec:
- `defaults` (GPU) and `interpreter` (overrides under TRITON_INTERPRET=1, where every tl op
  costs Python time and big blocks are faster);
- `tuning`: candidate values per config field for the autotune sweep;
- `signature(shape, cfg)`: the kernel's arguments at a launch of that shape, as the launcher
  passes them (pointers as "*dtype", integers as their values, constexprs as values), from
  which `_hopper` compiles the same specialization Triton's JIT would (integers equal to 1
  become constants, integers divisible by 16 get `tt.divisibility = 16`);
- `grid(shape, cfg, n_sms)`: the launch grid;
- `tensor_cores`: whether the static audit requires HMMA/HGMMA in its SASS.

The config store (`configs`), the sm_90 compile checks and audit (`_hopper`, `_audit`) and the
sweep (`laser_triton.tools.autotune`) read the registry `SPECS`; this module imports no kernel, so
there is no import cycle (kernel modules import `configs`, which imports only this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Shape", "KernelSpec", "SPECS", "declare", "LAUNCH_OPTIONS", "SIGNATURE_SMS"]

LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # config fields that are compile options
# SMs of the GPU the compile signatures, grids and audit models assume (H100 SXM / H200)
SIGNATURE_SMS = 132


@dataclass(frozen=True)
class Shape:
    """One launch's problem size: N rows of width D, rank r, activation and C dtype names."""

    N: int
    D: int
    r: int
    dtype: str  # "bf16", "fp16" or "fp32"
    # Dtype name of the stored coefficients C (LaserConfig.coeff_dtype): compress kernels
    # store C through a pointer of this type, so it selects a different binary.
    coeff: str = "bf16"


Signature = Callable[[Shape, dict], tuple[dict[str, Any], dict[str, Any]]]


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: Any  # the @triton.jit function
    defaults: dict
    signature: Signature
    grid: Callable[[Shape, dict, int], tuple[int, ...]]
    interpreter: dict = field(default_factory=dict)
    tuning: dict[str, tuple] = field(default_factory=dict)
    block_keys: tuple[str, ...] = ()  # fields halved, largest first, when a config does not fit
    launch_fields: tuple[str, ...] = ()  # fields that size the grid only (not kernel arguments)
    tensor_cores: bool = False  # the audit requires HMMA/HGMMA instructions
    # Overrides of `defaults` that the untimed prune (`autotune --prune-only`) tries first,
    # per shape, before the defaults and their fallback ladder: configs predicted faster
    # that do not fit every shape (they ship only where they pass the static audit).
    preferred: tuple[dict, ...] = ()
    flags: tuple[str, ...] = ()  # mode constexprs a caller may override (each a compiled variant)
    # The store key of a shape (orthonormalize keys on fp32 and the padded rank).
    key: Callable[[Shape], tuple[int, int, str]] = lambda s: (s.D, s.r, s.dtype)
    keyed_on_n: bool = True  # whether the store key includes the row-count bucket
    stored: bool = True  # launch configs come from the config store (False: fixed config)

    def interpreter_defaults(self) -> dict:
        return {**self.defaults, **self.interpreter}

    def kernel_config(self, cfg: dict) -> dict:
        """`cfg` without the grid-only fields: what the kernel itself is launched with."""
        return {k: v for k, v in cfg.items() if k not in self.launch_fields}

    def compile_args(self, shape: Shape, cfg: dict, flags: dict | None = None):
        """(runtime args, constexprs, options) for compiling `cfg` at `shape`."""
        runtime, consts = self.signature(shape, cfg)
        for k, v in (flags or {}).items():
            if k not in self.flags:
                raise KeyError(f"{self.name}: {k!r} is not a mode flag ({self.flags})")
            consts[k] = v
        missing = set(self.fn.arg_names) - set(runtime) - set(consts)
        if missing:
            raise KeyError(f"{self.name}: signature misses arguments {sorted(missing)}")
        options = {k: cfg[k] for k in LAUNCH_OPTIONS if k in cfg}
        return runtime, consts, options


SPECS: dict[str, KernelSpec] = {}


def declare(spec: KernelSpec) -> KernelSpec:
    """Register `spec` (module import time) and return it."""
    if spec.name in SPECS and SPECS[spec.name].fn is not spec.fn:
        raise ValueError(f"kernel {spec.name!r} is declared twice")
    SPECS[spec.name] = spec
    return spec
