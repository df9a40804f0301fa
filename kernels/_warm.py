"""Warm Triton's on-disk cache with the kernel variants a LASER run launches; time each compile.

A GPU run JIT-compiles every kernel variant on its first launch (the fused compress kernel
took 23-33 s per variant for sm_90, measured on CPU), and the ranks LASER picks decide which
variants appear. This tool records the launches LASER's launchers make for the given widths,
ranks and row counts (through `_contract.recording`: nothing executes, CPU tensors suffice),
binds each one as `JITFunction.run` does, and compiles every distinct variant with
`triton.compile` in parallel processes. The JIT's first launch compiles the same ASTSource
with the same target and options, so its cache key is the same and it loads the result from
disk. The CSV gives the compile cost of each variant (wall seconds, and CPU seconds of the
compiler and its ptxas child, which do not depend on how busy the machine is).

    python -m laser_triton.kernels._warm --hidden 512 1536 --rank 16 32 64 128 136 \\
        --rows 776 1552 --jobs 16 --csv compile_times.csv --time-budget 150

Which int arguments are divisible by 16 is part of a variant (Triton specializes on it), so
pass ranks and row counts both ways (e.g. r = 64 and 63) to cover what a run meets.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

import torch
from triton.backends.compiler import GPUTarget

from ..validation import DTYPES_BY_NAME
from . import _contract, configs
from ._spec import SIGNATURE_SMS

__all__ = ["laser_variants", "compile_variants", "main"]



def _gpu_target() -> tuple[GPUTarget, str, int]:
    """The current GPU's target, name and SM count, else sm_90 and an H200's."""
    if torch.cuda.is_available():
        from triton.runtime import driver  # noqa: PLC0415

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return (driver.active.get_current_target(), torch.cuda.get_device_name(),
                props.multi_processor_count)
    return GPUTarget("cuda", 90, 32), "NVIDIA H200", SIGNATURE_SMS


def laser_variants(hidden: list[int], ranks: list[int], rows: list[int], dtype: str,
                   coeff_dtype: str, gpu: str, target: GPUTarget, sms: int) -> list[tuple]:
    """(module, kernel name, signature, constexprs, attrs, options) of every distinct variant
    LASER launches at these shapes with `gpu`'s configs: compress_pass with Y (tracking and
    resets), reconstruct (unpack), grad_coeff (weight gradients from (C, U)) and the batched
    orthonormalization (basis updates). Output widths of grad_coeff are taken from `hidden`."""
    store = configs.ConfigStore(gpu, os.environ.get("LASER_TRITON_CONFIG_DIR"),
                                interpreter=False)
    sink: list = []
    binder = _contract._Binder(target)
    # Grids follow the SM count, and so do some int arguments (slab counts) that Triton
    # specializes on: the launchers must see the GPU's, not the CPU's stand-in.
    patched = [(m, m.num_sms) for m in _contract._kernel_modules() if hasattr(m, "num_sms")]
    with _contract.recording(sink):
        configs._STORES[configs.gpu_name(torch.device("cpu"))] = store
        try:
            for mod, _ in patched:
                mod.num_sms = lambda device: sms
            _record_laser_calls(hidden, ranks, rows, DTYPES_BY_NAME[dtype], DTYPES_BY_NAME[coeff_dtype])
        finally:
            for mod, orig in patched:
                mod.num_sms = orig
        for launch in sink:
            binder.bind(launch)
    return [(fn.__module__, fn.__name__, sig, consts, attrs, opts.__dict__)
            for fn, sig, consts, attrs, opts in binder.front_ends.values()]


def _record_laser_calls(hidden: list[int], ranks: list[int], rows: list[int],
                        dt: torch.dtype, ct: torch.dtype) -> None:
    from . import (  # noqa: PLC0415
        compress_pass,
        grad_coeff,
        orthonormalize_batched,
        reconstruct,
        supports,
    )

    for D in hidden:
        for r in (r for r in ranks if r <= D):
            # Row-major U, as the hooks' bases are (Triton orthonormalize, reset slices). Only
            # what `ops` sends to the kernels (`supports`: e.g. ranks <= 128 for the
            # orthonormalization; larger ones run in torch).
            U = torch.linalg.qr(torch.randn(D, r))[0].contiguous()
            Y = torch.randn(D, r)
            if supports("orthonormalize", Y):
                orthonormalize_batched([Y])
            for N in rows:
                X, C = torch.randn(N, D).to(dt), torch.randn(N, r).to(ct)
                if supports("compress_pass", X, U):
                    compress_pass(X, U, True, ct)
                if supports("reconstruct", C, U):
                    reconstruct(C, U, dt)
                # Weight gradients from (C, U) (lowrank_backward, on by default): G^T C for
                # row-compressed inputs, G_b^T U for column-compressed ones (U shared).
                G = torch.randn(1, N, D).to(dt)
                if supports("grad_coeff", G, C[None]):
                    grad_coeff(G, C[None])
                G2 = torch.randn(2, D, D).to(dt)
                if supports("grad_coeff", G2, U.expand(2, D, r)):
                    grad_coeff(G2, U.expand(2, D, r))


def _compile_one(module: str, name: str, signature: dict, constexprs: dict, attrs: dict,
                 options: dict, target: GPUTarget) -> tuple[float, float, int]:
    """Compile one variant (into Triton's cache); (wall seconds, CPU seconds, shared bytes)."""
    import importlib  # noqa: PLC0415

    import triton  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    fn = getattr(importlib.import_module(module), name)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=options)
    return time.perf_counter() - t0, _cpu_seconds() - c0, int(compiled.metadata.shared)


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas runs as a child): a
    compile's cost independent of how busy the machine is."""
    import resource  # noqa: PLC0415

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _describe(variant: tuple) -> str:
    _, name, sig, consts, attrs, _ = variant
    names = list(sig)
    shown = {names[k[0]]: v for k, v in consts.items() if not names[k[0]].startswith("stride")}
    aligned = [names[k[0]] for k, v in attrs.items() if v and not sig[names[k[0]]].startswith("*")]
    ptrs = ",".join(t for t in sig.values() if t.startswith("*"))
    return f"{name} {shown} div16={aligned} ptrs={ptrs}"


def compile_variants(variants: list[tuple], target: GPUTarget, jobs: int,
                     time_budget: float | None = None, log=print) -> list[dict]:
    """Compile the variants in `jobs` spawned processes (no TRITON_INTERPRET there); returns
    one row per variant: kernel, variant, seconds (None when the budget ran out first)."""
    import multiprocessing  # noqa: PLC0415

    saved = os.environ.pop("TRITON_INTERPRET", None)  # the children inherit the environment
    try:
        pool = ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn"))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    t_start = time.monotonic()
    rows = [{"kernel": v[1], "variant": _describe(v), "seconds": None, "cpu_seconds": None,
             "shared": None, "error": ""} for v in variants]
    futures: dict[Future, int] = {pool.submit(_compile_one, *v, target): i
                                  for i, v in enumerate(variants)}
    pending = set(futures)
    try:
        while pending:
            left = None if time_budget is None else time_budget - (time.monotonic() - t_start)
            if left is not None and left <= 0:
                log(f"warm: time budget spent, {len(pending)} variants not compiled")
                break
            done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            for fut in done:
                row = rows[futures[fut]]
                try:
                    row["seconds"], row["cpu_seconds"], row["shared"] = fut.result()
                except Exception as exc:  # reported, never fatal: the run compiles it anyway
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                log(f"warm: {row['seconds'] or 0:6.1f} s ({row['cpu_seconds'] or 0:6.1f} s CPU)"
                    f"  {row['variant']}"
                    + (f"  ERROR {row['error']}" if row["error"] else ""))
    finally:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()  # do not wait for compiles the budget cut off
        pool.shutdown(wait=False, cancel_futures=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", required=True, help="activation widths D")
    ap.add_argument("--rank", type=int, nargs="+", required=True, help="basis ranks r")
    ap.add_argument("--rows", type=int, nargs="+", default=[776, 1552], help="row counts N")
    ap.add_argument("--dtype", choices=sorted(DTYPES_BY_NAME), default="bf16", help="activation dtype")
    ap.add_argument("--coeff-dtype", choices=sorted(DTYPES_BY_NAME), default="bf16")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--time-budget", type=float, default=None, help="seconds, then stop")
    ap.add_argument("--csv", default=None, help="write one row per variant here")
    ap.add_argument("--list", action="store_true", help="only count the variants")
    ap.add_argument("--representative", action="store_true",
                    help="one variant per kernel and constexpr set (to time compiles, not to "
                         "warm: which ints are divisible by 16 changes the variant)")
    args = ap.parse_args(argv)
    target, gpu, sms = _gpu_target()
    variants = laser_variants(args.hidden, args.rank, args.rows, args.dtype, args.coeff_dtype,
                              gpu, target, sms)
    if args.representative:
        seen: dict[tuple, tuple] = {}
        for v in variants:
            seen.setdefault((v[1], str(sorted(v[3].items()))), v)
        variants = list(seen.values())
    print(f"warm: {len(variants)} variants for {gpu} (sm_{target.arch}), {args.jobs} jobs",
          flush=True)
    if args.list:
        for v in variants:
            print("  ", _describe(v))
        return 0
    rows = compile_variants(variants, target, args.jobs, args.time_budget,
                            log=lambda m: print(m, flush=True))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["kernel"])
            w.writeheader()
            w.writerows(rows)
    timed = [r for r in rows if r["seconds"] is not None]
    if timed:
        slow = max(timed, key=lambda r: r["cpu_seconds"])
        print(f"warm: compiled {len(timed)}/{len(rows)}, slowest {slow['cpu_seconds']:.1f} s "
              f"CPU ({slow['seconds']:.1f} s wall): {slow['variant']}")
    return 0 if all(not r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
