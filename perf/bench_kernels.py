"""Kernel benchmarks: each LASER op against the best torch composition and its roofline.

    python -m perf.bench_kernels --out perf/results/kernels.csv          # GPU: TRM grid
    python -m perf.bench_kernels --out /tmp/k.csv --quick                # CPU: tiny, no claims

Copy bandwidth and the bf16 matrix rate are measured in the same run, so every ratio in the
CSV compares numbers taken side by side. Providers: `torch` (the best plain composition:
X@U, X^T@C, fp32 norms / C@U^T / torch.linalg.qr), `reference` (LASER's torch backend through
`laser_triton.ops`) and `triton` (the kernels through `laser_triton.ops`).

On a GPU every provider is timed twice (`mode`): `eager` with `triton.testing.do_bench`
(L2 flushed before each call; host launch overhead included, as an eager caller sees it) and
`graph` (device time per call from CUDA-graph replays of many captured calls over rotating
inputs; what the roofline is about). A capture that fails leaves an `error` row, never a guess.

On CPU the script runs a tiny grid through the same code paths (Triton under the interpreter
if TRITON_INTERPRET=1), mode `cpu-wall`, `valid_timing=False`: those rows prove the script
works, not how fast anything is.

Grid (GPU default, most important shapes first so a time budget cuts the least useful):
- `channel` layouts of the attention/channel-MLP sites: D in 512, 1536, 3072 at N = 65,536
  and 262,144;
- `mlp_t` layouts of the Sudoku preset at batch 768: rows B*512 = 393,216 of width 97 (the
  token-mixing output), 512 (its SwiGLU inner) and 1024 (its gate/up output);
- `stretch`: D = 2048, 4096;
- r in 32, 64, 16, 128, 8; orthonormalize single D x r and batched over 32 sites.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from laser_triton import ops
from laser_triton.validation import DTYPES_BY_NAME

from .harness import add_threads_option, backend_env, run_meta, set_threads

COLUMNS = ["kernel", "provider", "mode", "layout", "gpu", "N", "D", "r", "dtype", "coeff_dtype",
           "ms_median", "ms_p20", "ms_p80", "gbps", "frac_of_copy_bw", "roofline_ms",
           "frac_of_roofline", "speedup_vs_torch", "target_ms", "rel_err", "bytes", "flops",
           "copy_gbps", "matmul_tflops", "valid_timing", "torch_version", "triton_version", "date",
           "error"]
PROVIDERS = ("torch", "reference", "triton")
RANK_PRIORITY = (32, 64, 16, 128, 8)
# (layout, D, Ns): rows of the mlp_t layouts are batch 768 x hidden 512 of the Sudoku preset.
GPU_LAYOUTS = (("channel", 512, (65536, 262144)), ("mlp_t", 512, (393216,)),
               ("mlp_t", 1024, (393216,)), ("mlp_t", 97, (393216,)),
               ("channel", 1536, (65536, 262144)), ("channel", 3072, (65536,)))
STRETCH = (("stretch", 2048, (65536,)), ("stretch", 4096, (65536,)))
QUICK_LAYOUTS = (("channel", 64, (200,)), ("channel", 96, (333,)), ("mlp_t", 97, (256,)))
# Orthonormalize goals (kernels issue): one D x r basis, and 32 bases of 512 x 64 in one call.
ORTH_SINGLE = [(D, r) for r in (16, 32, 64, 128) for D in (512, 1536, 3072, 4096)]
ORTH_BATCHED = [(32, 512, 64), (8, 1536, 64)]
ORTH_TARGET_MS = {"single_r<=64": 0.025, "single_r128": 0.060, "x32_512x64": 0.060}


def orth_target(batch: int, D: int, r: int) -> float:
    if batch == 1:
        return ORTH_TARGET_MS["single_r<=64"] if r <= 64 else ORTH_TARGET_MS["single_r128"]
    return ORTH_TARGET_MS["x32_512x64"] if (batch, D, r) == (32, 512, 64) else math.nan


def rotating(make: Callable[[int], Callable[[], object]], copies: int) -> Callable[[], object]:
    """Cycle over `copies` input sets, so repeated (or graph-captured) calls miss the L2."""
    fns = itertools.cycle([make(i) for i in range(copies)])
    return lambda: next(fns)()


GRAPH_MEMORY = 4 << 30  # bytes the calls captured in one graph may allocate together
Y_PARTIAL_BYTES = 64 << 20  # the compress pass's cap on its Y partial slabs (compress_pass.py)


def graph_timer(fn: Callable[[], object], rep_ms: int, out_bytes: int
                ) -> tuple[float, float, float]:
    """Device time per call of `fn` from CUDA-graph replays of n captured calls.

    Like triton's do_bench_cudagraph, but n is also bounded by the outputs the calls allocate
    (a graph keeps what its calls allocated), so wide reconstructs cannot fill the GPU.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        n = int(min(max(5, rep_ms / estimate), 1000, max(2, GRAPH_MEMORY // max(out_bytes, 1))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / n)
    del graph
    samples.sort()
    return statistics.median(samples), samples[2], samples[7]


def timer(fn: Callable[[], object], device: torch.device, mode: str, rep_ms: int,
          out_bytes: int = 0) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    if device.type == "cuda":
        from triton.testing import do_bench

        if mode == "graph":
            return graph_timer(fn, rep_ms, out_bytes)
        q = do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    fn()
    samples = []
    for _ in range(4):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[0], samples[-1]


def machine_rates(device: torch.device) -> tuple[float, float]:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 22)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = timer(lambda: dst.copy_(src), device, "eager", 200)
    copy_gbps = 2 * n / ms / 1e6
    m = 8192 if device.type == "cuda" else 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(m, m, device=device, dtype=dtype)  # random data: zeros run faster
    b = torch.randn(m, m, device=device, dtype=dtype)
    ms, _, _ = timer(lambda: a @ b, device, "eager", 200)
    return copy_gbps, 2 * m**3 / ms / 1e9


def triton_available(device: torch.device) -> bool:
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return ops._triton_kernels() is not None and (device.type == "cuda" or interpret)


def copies_for(nbytes: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    return max(1, min(8, math.ceil(4 * l2 / max(nbytes, 1))))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def low_rank_input(N: int, D: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Activations with a decaying spectrum (as LASER sees them), never zeros."""
    k = min(D, 64)
    basis = torch.linalg.qr(torch.randn(D, k, device=device))[0]
    coef = torch.randn(N, k, device=device) * torch.logspace(0, -2, k, device=device)
    return (coef @ basis.t() + 1e-3 * torch.randn(N, D, device=device)).to(dtype)


def compress_cases(N: int, D: int, r: int, dtype: torch.dtype, device: torch.device):
    """Per kernel: bytes, flops, a maker of the timed call per provider, and its error."""
    s = torch.finfo(dtype).bits // 8
    U = torch.linalg.qr(torch.randn(D, r, device=device))[0].contiguous()
    n_copies = copies_for(N * D * s, device)
    Xs = [low_rank_input(N, D, dtype, device) for _ in range(n_copies)]
    Cs = [(X.float() @ U).to(dtype) for X in Xs]
    C_ref = Xs[0].double() @ U.double()
    X_ref = Cs[0].double() @ U.double().t()

    def torch_compress(X):
        C = X @ U.to(X.dtype)
        X.t() @ C
        torch.linalg.vector_norm(X, dtype=torch.float32)
        torch.linalg.vector_norm(C, dtype=torch.float32)
        return (C,)

    return {
        "compress_pass": dict(
            bytes=N * D * s + N * r * s + 2 * D * r * 4, flops=4 * N * D * r,
            make={"torch": lambda i: lambda: torch_compress(Xs[i]),
                  "reference": lambda i: lambda: ops.compress_pass(Xs[i], U, True, dtype),
                  "triton": lambda i: lambda: ops.compress_pass(Xs[i], U, True, dtype)},
            check=lambda out: rel_err(out[0], C_ref), copies=n_copies,
            out_bytes=N * r * (s + 4) + Y_PARTIAL_BYTES),
        "reconstruct": dict(
            bytes=N * r * s + N * D * s + D * r * 4, flops=2 * N * D * r,
            make={"torch": lambda i: lambda: Cs[i] @ U.to(dtype).t(),
                  "reference": lambda i: lambda: ops.reconstruct(Cs[i], U, dtype),
                  "triton": lambda i: lambda: ops.reconstruct(Cs[i], U, dtype)},
            check=lambda out: rel_err(out, X_ref), copies=n_copies, out_bytes=N * D * s),
    }


def orth_cases(batch: int, D: int, r: int, device: torch.device):
    # Condition number 1e4: the regime a power-iteration product lives in.
    sv = torch.logspace(0, -4, r, device=device)
    Ys = [torch.linalg.qr(torch.randn(D, r, device=device))[0] * sv for _ in range(batch)]

    def orth_err(out) -> float:
        Qs = out[0] if isinstance(out, tuple) else out
        Qs = Qs if isinstance(Qs, list) else [Qs]
        eye = torch.eye(r, dtype=torch.float64, device=device)
        return max(float((Q.double().t() @ Q.double() - eye).abs().max()) for Q in Qs)

    # CholeskyQR2: two Gram products and two triangular applies, 2 D r^2 flops each.
    return dict(bytes=2 * batch * D * r * 4, flops=8 * batch * D * r * r, copies=1,
                out_bytes=8 * batch * D * r * 4,
                make={"torch": lambda i: lambda: [torch.linalg.qr(Y)[0] for Y in Ys],
                      "reference": lambda i: lambda: ops.orthonormalize_batched(Ys),
                      "triton": lambda i: lambda: ops.orthonormalize_batched(Ys)},
                check=orth_err)


def run_case(kernel: str, case: dict, shape: dict, device: torch.device, rates, rep_ms: int,
             target_ms: float, providers: tuple[str, ...] = PROVIDERS) -> list[dict]:
    copy_gbps, tflops = rates
    roofline_ms = max(case["bytes"] / copy_gbps / 1e6, case["flops"] / tflops / 1e9)
    modes = ("eager", "graph") if device.type == "cuda" else ("cpu-wall",)
    rows, t_torch = [], {}
    for provider in providers:
        if provider == "triton" and not triton_available(device):
            continue
        forced = {"reference": "torch", "triton": "triton"}.get(provider)
        with backend_env(forced):
            make = case["make"][provider]
            try:
                err = case["check"](make(0)())
            except Exception as exc:  # e.g. out of resources: a row that says so
                rows.append(dict(kernel=kernel, provider=provider, **shape,
                                 error=f"{type(exc).__name__}: {exc}"[:200]))
                continue
            for mode in modes:
                row = dict(kernel=kernel, provider=provider, mode=mode, **shape,
                           roofline_ms=roofline_ms, target_ms=target_ms, rel_err=err,
                           bytes=case["bytes"], flops=case["flops"])
                try:
                    fn = rotating(make, case["copies"] if mode == "graph" else 1)
                    med, p20, p80 = timer(fn, device, mode, rep_ms, case["out_bytes"])
                except Exception as exc:  # a capture that syncs, say
                    rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                if provider == "torch":
                    t_torch[mode] = med
                gbps = case["bytes"] / med / 1e6
                rows.append({**row, "ms_median": med, "ms_p20": p20, "ms_p80": p80, "gbps": gbps,
                             "frac_of_copy_bw": gbps / copy_gbps,
                             "frac_of_roofline": roofline_ms / med,
                             "speedup_vs_torch": t_torch.get(mode, math.nan) / med})
    return rows


def compress_grid(args: argparse.Namespace, quick: bool) -> list[tuple[str, int, int, int]]:
    """(layout, N, D, r) in priority order."""
    if args.hidden or args.rank or args.rows:
        Ns = args.rows or ([200] if quick else [65536])
        Ds = args.hidden or ([64] if quick else [512])
        rs = args.rank or ([4] if quick else [32])
        return [("custom", N, D, r) for r in rs for D in Ds for N in Ns if r <= D]
    ranks, layouts = ((4, 16), QUICK_LAYOUTS) if quick else (RANK_PRIORITY, GPU_LAYOUTS + STRETCH)
    # Rank-major: every TRM layout at r=32 before any at r=64, and so on (a basis of rank r
    # needs r <= D: the 97-wide mlp_t layout stops at r=64).
    grid = [(lay, N, D, r) for r in ranks for lay, D, Ns in layouts for N in Ns
            if r <= D and lay != "stretch"]
    return grid + [(lay, N, D, r) for r in ranks for lay, D, Ns in layouts for N in Ns
                   if lay == "stretch"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="tiny grid (CPU dry run)")
    ap.add_argument("--rows", type=int, nargs="*", default=None, help="custom grid: N values")
    ap.add_argument("--hidden", type=int, nargs="*", default=None, help="custom grid: D values")
    ap.add_argument("--rank", type=int, nargs="*", default=None, help="custom grid: r values")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES_BY_NAME))
    ap.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per point")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds; stops the grid")
    ap.add_argument("--no-orth", action="store_true", help="skip orthonormalize")
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    add_threads_option(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads, torch.cuda.is_available())

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    dtype = DTYPES_BY_NAME[args.dtype] if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    rates = machine_rates(device)
    meta = dict(**run_meta(device), dtype=str(dtype).replace("torch.", ""), copy_gbps=rates[0],
                matmul_tflops=rates[1], valid_timing=device.type == "cuda")
    print(f"bench_kernels: {meta['gpu']}, copy {rates[0]:.0f} GB/s, matmul {rates[1]:.1f} "
          f"TFLOP/s, torch {meta['torch_version']}, triton {meta['triton_version']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start, rows, skipped = time.time(), [], 0

    def flush() -> None:
        df = pd.DataFrame([{**meta, **r} for r in rows], columns=COLUMNS)
        df.to_csv(args.out, index=False)  # incremental: a killed run keeps what it measured

    def over_budget() -> bool:
        return time.time() - start > args.time_budget

    orth = [] if args.no_orth else (
        [(1, 64, 8), (2, 96, 16)] if quick else
        [(1, D, r) for D, r in ORTH_SINGLE[:8]] + [(b, D, r) for b, D, r in ORTH_BATCHED]
        + [(1, D, r) for D, r in ORTH_SINGLE[8:]])
    grid = compress_grid(args, quick)
    # Interleave: a budget cut keeps the most important shapes of both kinds.
    jobs = [("c", g) for g in grid[:12]] + [("o", o) for o in orth[:10]] + \
        [("c", g) for g in grid[12:]] + [("o", o) for o in orth[10:]]
    for kind, spec in jobs:
        if over_budget():
            skipped += 1
            continue
        if kind == "c":
            layout, N, D, r = spec
            # compress_pass stores C in X's dtype here, and reconstruct reads that C
            shape = dict(layout=layout, N=N, D=D, r=r, coeff_dtype=meta["dtype"])
            for kernel, case in compress_cases(N, D, r, dtype, device).items():
                rows += run_case(kernel, case, shape, device, rates, args.rep_ms, math.nan,
                                 tuple(args.providers))
        else:
            batch, D, r = spec
            name = "orthonormalize" if batch == 1 else f"orthonormalize_x{batch}"
            shape = dict(layout="single" if batch == 1 else "batched", N=batch, D=D, r=r)
            rows += run_case(name, orth_cases(batch, D, r, device), shape, device, rates,
                             args.rep_ms, orth_target(batch, D, r), tuple(args.providers))
        flush()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flush()
    note = f", {skipped} shapes skipped by the time budget" if skipped else ""
    print(f"wrote {len(rows)} rows to {args.out} ({time.time() - start:.1f}s{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
