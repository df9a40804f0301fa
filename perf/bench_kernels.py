"""Kernel benchmarks: each LASER op against the best torch composition and its roofline.

    python perf/bench_kernels.py --out perf/results/kernels.csv          # GPU: full grid
    python perf/bench_kernels.py --out /tmp/k.csv --quick                # CPU: tiny, no claims

Copy bandwidth and the bf16 matrix rate are measured in the same run, so every ratio in the
CSV compares numbers taken side by side. On CPU the script runs a tiny grid through the same
code paths (Triton under the interpreter if TRITON_INTERPRET=1) and marks gpu='cpu': those
rows prove the script works, not how fast anything is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from laser_triton import ops

COLUMNS = ["kernel", "provider", "gpu", "N", "D", "r", "dtype", "ms_median", "ms_p20", "ms_p80",
           "gbps", "frac_of_copy_bw", "frac_of_roofline", "speedup_vs_torch", "copy_gbps",
           "matmul_tflops", "torch_version", "triton_version", "date"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timer(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) in ms. GPU: triton.testing.do_bench; CPU: wall clock."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=max(50, reps))
        return float(q[0]), float(q[1]), float(q[2])
    fn()
    samples = []
    for _ in range(max(3, reps // 20)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return (statistics.median(samples), samples[int(0.2 * (len(samples) - 1))],
            samples[int(0.8 * (len(samples) - 1))])


def machine_rates(device: torch.device, reps: int) -> tuple[float, float]:
    """Measured copy bandwidth (GB/s, read+write) and bf16 matmul rate (TFLOP/s)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = timer(lambda: dst.copy_(src), device, reps)
    copy_gbps = 2 * n / ms / 1e6
    m = 8192 if device.type == "cuda" else 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    ms, _, _ = timer(lambda: a @ b, device, reps)
    return copy_gbps, 2 * m**3 / ms / 1e9


def torch_compress(X: torch.Tensor, U: torch.Tensor) -> None:
    """The best plain torch composition of the compress pass (separate kernels)."""
    Uc = U.to(X.dtype)
    C = X @ Uc
    X.t() @ C
    torch.linalg.vector_norm(X, dtype=torch.float32)
    torch.linalg.vector_norm(C, dtype=torch.float32)


def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        old = os.environ.get("LASER_TRITON_BACKEND")
        os.environ["LASER_TRITON_BACKEND"] = name
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("LASER_TRITON_BACKEND", None)
            else:
                os.environ["LASER_TRITON_BACKEND"] = old
    return run


def triton_available(device: torch.device) -> bool:
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return ops._triton_kernels() is not None and (device.type == "cuda" or interpret)


def bench_shape(N: int, D: int, r: int, dtype: torch.dtype, device: torch.device, rates, reps):
    copy_gbps, tflops = rates
    X = torch.randn(N, D, device=device).to(dtype)
    U = torch.linalg.qr(torch.randn(D, r, device=device, dtype=torch.float32))[0].contiguous()
    C = (X.float() @ U).to(dtype)
    s = X.element_size()
    cases = {
        "compress_pass": dict(
            bytes=N * D * s + N * r * s + 2 * D * r * 4, flops=4 * N * D * r,
            torch=lambda: torch_compress(X, U),
            triton=with_backend("triton", lambda: ops.compress_pass(X, U, True, dtype)),
            reference=with_backend("torch", lambda: ops.compress_pass(X, U, True, dtype))),
        "reconstruct": dict(
            bytes=N * r * s + N * D * s + D * r * 4, flops=2 * N * D * r,
            torch=lambda: C @ U.to(dtype).t(),
            triton=with_backend("triton", lambda: ops.reconstruct(C, U, dtype)),
            reference=with_backend("torch", lambda: ops.reconstruct(C, U, dtype))),
    }
    rows = []
    for kernel, c in cases.items():
        roofline_ms = max(c["bytes"] / copy_gbps / 1e6, c["flops"] / tflops / 1e9)
        t_torch = None
        for provider in ("torch", "reference", "triton"):
            if provider == "triton" and not triton_available(device):
                continue
            med, p20, p80 = timer(c[provider], device, reps)
            if provider == "torch":
                t_torch = med
            gbps = c["bytes"] / med / 1e6
            rows.append(dict(kernel=kernel, provider=provider, N=N, D=D, r=r,
                             ms_median=med, ms_p20=p20, ms_p80=p80, gbps=gbps,
                             frac_of_copy_bw=gbps / copy_gbps, frac_of_roofline=roofline_ms / med,
                             speedup_vs_torch=t_torch / med))
    return rows


def bench_orthonormalize(D: int, r: int, batch: int, device: torch.device, reps: int):
    Ys = [torch.randn(D, r, device=device) for _ in range(batch)]
    cases = {"torch": lambda: [torch.linalg.qr(Y) for Y in Ys],
             "reference": with_backend("torch", lambda: ops.orthonormalize_batched(Ys)),
             "triton": with_backend("triton", lambda: ops.orthonormalize_batched(Ys))}
    rows, t_torch = [], None
    for provider, fn in cases.items():
        if provider == "triton" and not triton_available(device):
            continue
        med, p20, p80 = timer(fn, device, reps)
        t_torch = med if provider == "torch" else t_torch
        rows.append(dict(kernel="orthonormalize" if batch == 1 else f"orthonormalize_x{batch}",
                         provider=provider, N=batch, D=D, r=r, ms_median=med, ms_p20=p20,
                         ms_p80=p80, speedup_vs_torch=t_torch / med))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="tiny grid (CPU dry run)")
    ap.add_argument("--rows", type=int, nargs="*", default=None)
    ap.add_argument("--hidden", type=int, nargs="*", default=None)
    ap.add_argument("--rank", type=int, nargs="*", default=None)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds; stops the grid")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    Ns = args.rows or ([200, 333] if quick else [65536, 262144])
    Ds = args.hidden or ([64, 96] if quick else [512, 1536, 3072, 2048, 4096])
    rs = args.rank or ([4, 16] if quick else [8, 16, 32, 64, 128])
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    reps = 5 if quick else args.reps
    rates = machine_rates(device, reps)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    meta = dict(gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                dtype=str(dtype).replace("torch.", ""), copy_gbps=rates[0],
                matmul_tflops=rates[1], torch_version=torch.__version__,
                triton_version=triton_version, date=dt.date.today().isoformat())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start, rows = time.time(), []

    def flush():
        pd.DataFrame([{**meta, **r} for r in rows], columns=COLUMNS).to_csv(args.out, index=False)

    for D in Ds:
        for r in rs:
            for N in Ns:
                if time.time() - start > args.time_budget:
                    print(f"time budget reached; wrote {len(rows)} rows", file=sys.stderr)
                    flush()
                    return 0
                rows += bench_shape(N, D, r, dtype, device, rates, reps)
                flush()  # incremental: a killed run keeps what it measured
    for D, r, batch in ([(64, 8, 1), (64, 8, 4)] if quick else
                        [(512, 16, 1), (512, 64, 1), (512, 128, 1), (4096, 64, 1), (512, 64, 32)]):
        rows += bench_orthonormalize(D, r, batch, device, reps)
        flush()
    print(f"wrote {len(rows)} rows to {args.out} ({time.time() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
