"""Compile the kernels for Hopper (sm_90) on any machine, GPU or not, as Triton's JIT would
(docs/design.md §8).

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole pipeline to
PTX and cubin without a GPU. What is compiled is each kernel's `KernelSpec.signature` at a
shape, specialized with Triton's own rule (`native_specialize_impl`, the function the JIT
calls at launch): integers equal to 1 become constants, integers divisible by 16 get
`tt.divisibility = 16`; pointers are taken 16-byte aligned (fresh torch allocations are).
So the binary checked here is the one a launch at that shape runs (docs/design.md §8).

`compile_info` gives shared memory and PTX; `_audit.audit` adds registers, spills and SASS
instruction counts read from the cubin with the ptxas tools that ship with Triton.
"""

from __future__ import annotations

import functools
import os
import time

import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from ._common import INTERPRET
from ._spec import SPECS, Shape

__all__ = ["SM90", "compile_info", "shared_bytes", "kernel_names", "specialize", "TRM_N"]

SM90 = GPUTarget("cuda", 90, 32)
TRM_N = 87_000  # rows of a TRM activation (~87k; not a multiple of 16, like most batches)


def kernel_names() -> tuple[str, ...]:
    """Every declared kernel. The registry is full once anything in `laser_triton.kernels` is
    imported: the package's __init__ imports every kernel module first (so this module
    imports none, and there is no cycle)."""
    return tuple(SPECS)


def _int_spec(value: int) -> tuple[str, str]:
    """Triton's launch-time specialization of an integer argument: (type, attribute)."""
    from triton._C.libtriton import native_specialize_impl  # noqa: PLC0415

    return native_specialize_impl(BaseBackend, value, False, True, True)


def specialize(kernel: str, shape: Shape, cfg: dict, flags: dict | None = None) -> tuple:
    """A hashable description of the binary a launch of `cfg` at `shape` runs.

    ((name, type or "constexpr", value or attribute) per argument, options items).
    """
    spec = SPECS[kernel]
    runtime, consts, options = spec.compile_args(shape, cfg, flags)
    args = []
    for name in spec.fn.arg_names:
        if name in consts:
            args.append((name, "constexpr", consts[name]))
            continue
        v = runtime[name]
        if isinstance(v, str):  # a pointer "*dtype" (16-byte aligned), or a TMA descriptor
            args.append((name, v, None if v.startswith("tensordesc") else "D"))
            continue
        ty, attr = _int_spec(int(v))
        args.append((name, ty, int(v) if ty == "constexpr" else attr))
    return kernel, tuple(args), tuple(sorted(options.items()))


@functools.lru_cache(maxsize=512)
def _compile(key: tuple, arch: int):
    kernel, args, options = key
    fn = SPECS[kernel].fn
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, ty, val) in enumerate(args):
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = val
        elif val == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    return compiled, _cpu_seconds() - c0, time.perf_counter() - t0


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas is one): a compile's
    cost that does not depend on how busy a shared machine is (wall time does)."""
    import resource  # noqa: PLC0415

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _summary(key: tuple, arch: int) -> dict:
    compiled, cpu_s, wall_s = _compile(key, arch)
    return {"shared": int(compiled.metadata.shared), "ptx": compiled.asm["ptx"],
            "cubin": compiled.asm["cubin"], "cubin_bytes": len(compiled.asm["cubin"]),
            "num_warps": compiled.metadata.num_warps, "compile_s": cpu_s,
            "compile_wall_s": wall_s, "name": compiled.metadata.name}


_POOL = None


def _worker_pool():
    """One spawned worker without TRITON_INTERPRET (interpreted kernels cannot be compiled)."""
    global _POOL
    if _POOL is None:
        import atexit  # noqa: PLC0415
        import multiprocessing  # noqa: PLC0415
        from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415

        saved = os.environ.pop("TRITON_INTERPRET", None)  # the child inherits the environment
        try:
            _POOL = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            _POOL.submit(int, 0).result()  # start it now, while the variable is unset
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
        atexit.register(_POOL.shutdown)
    return _POOL


@functools.lru_cache(maxsize=1024)
def _cached_summary(key: tuple, arch: int) -> dict:
    if INTERPRET:  # this process's kernels are interpreter objects: compile in a clean child
        return _worker_pool().submit(_summary, key, arch).result()
    return _summary(key, arch)


def compile_info(kernel: str, D: int, r: int, dtype: str, cfg: dict, arch: int = 90,
                 N: int = TRM_N, flags: dict | None = None, coeff: str = "bf16") -> dict:
    """Compile `cfg` for `arch` at the launch specialization of shape (N, D, r, dtype), C
    stored as `coeff` ("bf16", "fp16" or "fp32": LaserConfig.coeff_dtype).

    Returns {shared, ptx, cubin, cubin_bytes, num_warps, compile_s (CPU seconds of compiler
    and ptxas), compile_wall_s, name}; cached on the
    specialization (shapes that specialize alike share one compile). Works under
    TRITON_INTERPRET=1 too (the compile then runs in a spawned process).
    """
    cfg = {**SPECS[kernel].defaults, **cfg}
    key = specialize(kernel, Shape(N, D, r, dtype, coeff), cfg, flags)
    return _cached_summary(key, arch)


def shared_bytes(kernel: str, D: int, r: int, dtype: str, cfg: dict, arch: int = 90) -> int:
    """Shared memory (bytes) one block of this kernel config needs on `arch`."""
    return compile_info(kernel, D, r, dtype, cfg, arch)["shared"]
