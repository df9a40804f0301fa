"""`laser-triton autotune`: the launch-config sweep, and the config store's public face.

    laser-triton autotune --hidden 512 1536 --rank 8 16 32 64 128 --dtype bf16 [--out DIR]
        [--coeff bf16 fp32 fp16]

For every kernel and (D, r): the candidates (its `KernelSpec.tuning` grid, tensor-core
"bf16x3" products; `--ieee` for exact fp32 FMA ones) are pruned on the CPU by the static audit
(compiled for the GPU's architecture, sm_90 without a GPU, at the launch specialization: no
spills or local memory, registers and shared memory in budget, tensor cores); survivors are
timed with `triton.testing.do_bench` through the real launchers, the winner is checked against
the torch reference, and the JSON file `<DIR>/<sanitized GPU name>.json` is rewritten after
every entry (an interrupted sweep keeps what it finished). Without a GPU nothing can be timed:
the command says so and stops after pruning, unless `--prune-only` asks for a file of untimed,
audit-validated configs (how `autotune_configs/default.json` is made).

`--coeff`: the dtypes of the stored coefficients C (LaserConfig.coeff_dtype) to tune for. The
kernels whose binary depends on C (`configs.keyed_on_coeff`: compress_fused and compress_coeff
store it, reconstruct reads it) are pruned and written per C dtype (keys `...,C=fp32`; bf16,
the default, keeps the plain key); the others once.

The store itself (lookup order, logging, validation by fit) lives in
`laser_triton.kernels.configs`, beside the launchers that use it; it is re-exported here.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.resources
import itertools
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from laser_triton.validation import DTYPES_BY_NAME

__all__ = ["cli_main", "candidates", "prune", "ConfigStore", "get_store", "config_key",
           "sanitize_gpu_name", "SHARED_LIMIT_SM90"]

try:  # the store needs Triton; the CLI reports a missing Triton itself
    from laser_triton.kernels.configs import (
        DEFAULT_COEFF,
        DEFAULTS,
        PATH_TABLE,
        SHARED_LIMIT_SM90,
        ConfigStore,
        config_key,
        get_store,
        keyed_on_coeff,
        sanitize_gpu_name,
    )
except ImportError:  # pragma: no cover - exercised only without Triton
    DEFAULTS = {}

# The tunable kernels (their specs hold the grids), in sweep order: a one-pass design before
# the designs it falls back to when no config of it fits.
KERNELS = ("compress_tma", "compress_fused", "compress_coeff", "compress_y", "reconstruct",
           "orth_gram", "orth_factor", "orth_apply")
# compress_pass's designs (`compress_pass.choose_path`) and the kernels each launches
PATH_KERNELS = {"fused": ("compress_fused",), "tma": ("compress_tma",),
                "split": ("compress_coeff", "compress_y")}


def _spec(kernel: str):
    from laser_triton.kernels._spec import SPECS  # noqa: PLC0415

    return SPECS[kernel]


def candidates(kernel: str, allow_split: bool = True) -> list[dict]:
    """The defaults first, then the spec's tuning grid. Precision: the tensor-core split
    ("bf16x3", the default) and, with allow_split=False, exact fp32 FMA ("ieee") only."""
    spec = _spec(kernel)
    grid = dict(spec.tuning)
    if "PRECISION" in spec.defaults:
        grid["PRECISION"] = ("bf16x3",) if allow_split else ("ieee",)
    names = list(grid)
    out = [] if not allow_split and spec.defaults.get("PRECISION") == "bf16x3" else \
        [dict(spec.defaults)]
    for values in itertools.product(*(grid[n] for n in names)):
        cfg = {**spec.defaults, **dict(zip(names, values))}
        if cfg not in out:
            out.append(cfg)
    return out


def ladder(kernel: str) -> list[dict]:
    """The spec's preferred configs (faster where they fit), the defaults, then what the
    launcher falls back to on an out-of-resource error (`shrink_config`: fewer stages, then
    the largest block halved), smallest last."""
    from laser_triton.kernels._common import shrink_config  # noqa: PLC0415

    spec = _spec(kernel)
    out = [dict(spec.defaults)]
    while (smaller := shrink_config(out[-1], spec.block_keys)) is not None:
        out.append(smaller)
    return [{**spec.defaults, **p} for p in spec.preferred] + out


def shape_key(kernel: str, D: int, r: int, dtype: str) -> tuple[int, int, str]:
    """The (D, r, dtype) a launcher uses as key (orthonormalize: fp32 and padded r)."""
    from laser_triton.kernels._spec import Shape  # noqa: PLC0415

    return _spec(kernel).key(Shape(0, D, r, dtype))


def applies(kernel: str, D: int, r: int, dtype: str = "bf16") -> bool:
    """Whether a kernel is worth tuning at (D, r) (the fused design only where it may fit,
    the TMA design where it covers the shape)."""
    import importlib  # noqa: PLC0415

    cp = importlib.import_module("laser_triton.kernels.compress_plan")
    if kernel == "compress_tma":
        return importlib.import_module("laser_triton.kernels.compress_tma").tma_fits(D, r, dtype)
    if kernel == "compress_fused":
        return cp.pow2(D) * cp.pow2(r) <= 2 * cp.FUSED_MAX_ELEMS  # at most two rank tiles
    if kernel.startswith("orth"):
        from laser_triton.kernels import MAX_ORTH_RANK  # noqa: PLC0415

        return r <= MAX_ORTH_RANK
    return True


def _audit_or_error(args) -> tuple[int | None, str]:
    """(shared bytes, "") for a candidate that passes the static audit, else (None, why)."""
    kernel, D, r, dtype, cfg, arch, coeff = args
    from laser_triton.kernels._audit import audit, check  # noqa: PLC0415

    shared = 0
    for flags in _mode_variants(kernel):  # every variant a launcher runs must fit
        try:
            facts = audit(kernel, D, r, dtype, cfg, flags=flags or None, coeff=coeff)
        except Exception as exc:  # a candidate that does not compile is pruned like one too big
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        bad = check(facts)
        if bad:
            return None, "; ".join(bad)
        shared = max(shared, facts.shared)
    return shared, ""


def _mode_variants(kernel: str) -> list[dict]:
    """The mode-flag variants the launchers compile of `kernel` ([{}]: the spec's signature
    alone). The orthonormalization kernels run in several modes per call (a mode can spill
    where the default does not: orth_apply REPAIR=False at r = 16, BLOCK_D = 32)."""
    if kernel.startswith("orth"):
        import importlib  # noqa: PLC0415

        return list(importlib.import_module(
            "laser_triton.kernels.orthonormalize").MODE_VARIANTS[kernel])
    return [{}]


def prune(kernel: str, D: int, r: int, dtype: str, cands: list[dict], arch: int = 90,
          limit: int = 232_448, jobs: int = 1, first_only: bool = False,
          coeff: str = "bf16") -> list[tuple[dict, int]]:
    """[(config, shared bytes)] of the candidates that pass the static sm_90 audit (compile,
    no spills or local memory, registers and shared memory within `limit`, tensor cores
    where the kernel needs them) at the launch specialization with C stored as `coeff`,
    before anything is timed.

    `first_only`: audit in order and stop at the first that passes.
    """
    work = [(kernel, D, r, dtype, c, arch, coeff) for c in cands]
    if first_only:
        for w in work:
            shared, _ = _audit_or_error(w)
            if shared is not None and shared <= limit:
                return [(w[4], shared)]
        return []
    if jobs > 1 and len(work) > 1:
        import multiprocessing  # noqa: PLC0415

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(_audit_or_error, work))
    else:
        results = [_audit_or_error(w) for w in work]
    return [(c, s) for c, (s, _) in zip(cands, results) if s is not None and s <= limit]


def spread(items: list, k: int) -> list:
    """The first item and an even spread of the others, k in all."""
    if len(items) <= k or k < 2:
        return items[: max(k, 1)]
    step = (len(items) - 1) / (k - 1)
    return [items[round(i * step)] for i in range(k)]


# ----------------------------------------------------------------------------- GPU timing


def _bench_op(kernel: str, D: int, r: int, dtype: torch.dtype, N: int, device,
              coeff: torch.dtype = torch.bfloat16):
    """A closure running the op that `kernel` belongs to (C stored as `coeff`), and a check
    of its result."""
    from laser_triton import reference  # noqa: PLC0415
    from laser_triton.kernels import compress_pass, orthonormalize, reconstruct  # noqa: PLC0415

    g = torch.Generator(device="cpu").manual_seed(0)
    U = torch.linalg.qr(torch.randn(D, r, generator=g))[0].to(device)
    if kernel.startswith("compress"):
        X = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
        ref = reference.compress_pass(X, U, True, coeff)

        def check() -> bool:
            out = compress_pass(X, U, True, coeff)
            y_err = (out.Y - ref.Y).norm() / ref.Y.norm()
            e_err = abs(out.e_C - ref.e_C) / ref.e_X
            return bool(y_err < 1e-4 and e_err < 1e-6)
        return (lambda: compress_pass(X, U, True, coeff)), check
    if kernel == "reconstruct":
        C = torch.randn(N, r, generator=g).to(device=device, dtype=coeff)
        ref = reference.reconstruct(C, U, dtype).float()
        return (lambda: reconstruct(C, U, dtype)), lambda: bool(
            (reconstruct(C, U, dtype).float() - ref).norm() <= 1e-2 * ref.norm())
    Y = (torch.randn(N, D, generator=g).to(device).t() @ torch.randn(N, r, generator=g).to(device))

    def check_orth() -> bool:
        Q, ok = orthonormalize(Y)
        eye = torch.eye(r, device=device, dtype=torch.float64)
        return bool(ok) and float((Q.double().t() @ Q.double() - eye).abs().max()) <= 1e-5
    return (lambda: orthonormalize(Y)), check_orth


def _time_kernel(store, kernel, D, r, dtype_name, N, fitting, best, device,
                 coeff: str = "bf16") -> tuple[dict, float]:
    """Time each fitting config through the launchers (C stored as `coeff`); (fastest that
    checks out, ms)."""
    from triton.testing import do_bench  # noqa: PLC0415

    kD, kr, kdt = shape_key(kernel, D, r, dtype_name)
    n_key = None if kernel.startswith("orth") else N
    run, check = _bench_op(kernel, D, r, DTYPES_BY_NAME[dtype_name], N, device,
                           DTYPES_BY_NAME[coeff])
    timed = []
    for cfg, _shared in fitting:
        store._cache.clear()
        for other, other_cfg in best.items():  # the winners so far for the other kernels
            oD, orr, odt = shape_key(other, D, r, dtype_name)
            store.remember(other, oD, orr, odt, None if other.startswith("orth") else N,
                           other_cfg, coeff)
        store.remember(kernel, kD, kr, kdt, n_key, cfg, coeff)
        if kernel.startswith("compress"):
            design = next(d for d, ks in PATH_KERNELS.items() if kernel in ks)
            store.remember_path(D, r, dtype_name, design, coeff)
        try:
            timed.append((do_bench(run, warmup=10, rep=50), len(timed), cfg))
        except Exception as exc:  # e.g. out of resources on this GPU despite the compile check
            print(f"  {kernel} {cfg}: failed ({type(exc).__name__})", file=sys.stderr)
    for ms, _, cfg in sorted(timed, key=lambda t: t[:2]):
        store.remember(kernel, kD, kr, kdt, n_key, cfg, coeff)
        if check():
            return cfg, ms
        print(f"  {kernel} {cfg}: fast but inaccurate, skipped", file=sys.stderr)
    raise RuntimeError(f"no {kernel} candidate ran correctly at D={D}, r={r}")


# ----------------------------------------------------------------------------- CLI


def _default_out_dir() -> Path:
    shipped = importlib.resources.files("laser_triton.autotune_configs")
    path = Path(str(shipped))
    return path if path.is_dir() and os.access(path, os.W_OK) else Path.cwd()


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="laser-triton autotune", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 1536])
    p.add_argument("--rank", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--dtype", choices=sorted(DTYPES_BY_NAME), default="bf16")
    p.add_argument("--coeff", nargs="+", choices=sorted(DTYPES_BY_NAME), default=["bf16"],
                   help="dtypes of the stored coefficients C (LaserConfig.coeff_dtype): the "
                        "kernels whose binary depends on C get an entry per C dtype")
    p.add_argument("--rows", type=int, default=65536, help="N of the timed activations")
    p.add_argument("--out", type=Path, default=None, help="output dir (default: the package's)")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--prune-only", action="store_true",
                   help="no timing: write to default.json, per shape, the first config of the "
                        "launcher's fallback ladder that passes the static audit (untimed)")
    p.add_argument("--ieee", action="store_true",
                   help="tune exact fp32 FMA products instead of the tensor-core split "
                        "(bf16x3, the default; kept only if it passes the accuracy check)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--max-candidates", type=int, default=8,
                   help="time at most this many fitting candidates per kernel and shape "
                        "(the defaults and an even spread of the rest): every timed config "
                        "is JIT-compiled again at its first launch, about 1-30 s each")
    args = p.parse_args(argv)
    if not DEFAULTS:
        print("laser-triton autotune: error: Triton is not importable, so there are no kernels "
              'to tune (pip install "laser-triton[triton]")', file=sys.stderr)
        return 1
    import triton  # noqa: PLC0415

    from laser_triton.kernels import configs  # noqa: PLC0415

    choose_path = importlib.import_module("laser_triton.kernels.compress_pass").choose_path
    fused_by_size = importlib.import_module("laser_triton.kernels.compress_pass").fused_by_size

    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.prune_only:
        print("laser-triton autotune: error: no CUDA GPU here, so nothing can be timed "
              "(triton.testing.do_bench needs one); --prune-only writes compile-validated, "
              "untimed configs without one", file=sys.stderr)
        return 1
    device = torch.device("cuda") if has_gpu else torch.device("cpu")
    gpu = torch.cuda.get_device_name(device) if has_gpu else "sm_90 (compiled on CPU)"
    arch, limit = 90, SHARED_LIMIT_SM90
    if has_gpu:
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
        props = torch.cuda.get_device_properties(device)
        limit = int(getattr(props, "shared_memory_per_block_optin", limit))
    out_dir = args.out or _default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("default.json" if args.prune_only else sanitize_gpu_name(gpu) + ".json")
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc.update(schema=configs.SCHEMA, gpu=gpu, triton_version=triton.__version__,
               torch_version=torch.__version__, timed=not args.prune_only,
               updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               note=("safe defaults proven to fit, never timed: per shape, the first config of "
                     "the ladder (the spec's preferred configs, then the built-in defaults, "
                     "fewer stages and halved blocks: the launcher's fallback) that passes "
                     f"the static sm_{arch} audit at N=87000 (no "
                     f"spills, registers and {limit} bytes of shared memory, tensor cores)"
                     if args.prune_only else
                     f"fastest of the fitting candidates by do_bench at N={args.rows}"))
    tables = doc.setdefault("kernels", {})
    shared_tab = doc.setdefault("shared_bytes", {})
    timing_tab = doc.setdefault("timings_ms", {}) if has_gpu and not args.prune_only else None
    store = configs.ConfigStore(gpu, interpreter=False)
    if has_gpu and not args.prune_only:
        configs._STORES[configs.gpu_name(device)] = store  # the launchers read this store
    print(f"autotune: {gpu}, sm_{arch}, limit {limit} B, writing {path}")
    coeffs = list(dict.fromkeys(args.coeff))
    for D, r, coeff in itertools.product(args.hidden, args.rank, coeffs):
        if r > D:
            continue
        best: dict[str, dict] = {}
        fused_ms = None
        forced = None  # the design this C falls back to when the chosen one has no fit
        for kernel in (k for k in KERNELS if k in args.kernels):
            if not applies(kernel, D, r, args.dtype):
                continue
            c_key = coeff if keyed_on_coeff(kernel) else DEFAULT_COEFF
            if c_key != coeff and coeff != coeffs[0] and forced is None and config_key(
                    *shape_key(kernel, D, r, args.dtype)) in tables.get(kernel, {}):
                continue  # C-independent: tuned in an earlier C pass
            design = forced or choose_path(D, r, args.dtype, None, store, coeff)
            if args.prune_only and kernel in KERNELS[:4] and kernel not in PATH_KERNELS[design]:
                continue  # untimed: prove the design the launcher picks (shipped table, size)
            kD, kr, kdt = shape_key(kernel, D, r, args.dtype)
            key = config_key(kD, kr, kdt, None if args.prune_only or kernel.startswith("orth")
                             else args.rows, c_key)
            cands = ladder(kernel) if args.prune_only else candidates(kernel, not args.ieee)
            if args.prune_only:
                # First the store's configs of the neighbouring binaries: for bf16 C, and at
                # the padded rank (hand-picked entries may lie off the ladder)
                seeds = [store.lookup(kernel, kD, kr, kdt)] if c_key != DEFAULT_COEFF else []
                if kr % 16:
                    seeds.append(store.lookup(kernel, kD, 1 << (kr - 1).bit_length(), kdt,
                                              None, c_key))
                cands = [c for i, c in enumerate(seeds + cands) if c not in (seeds + cands)[:i]]
            fitting = prune(kernel, kD, kr, kdt, cands, arch, limit, args.jobs,
                            first_only=args.prune_only, coeff=c_key)
            print(f"  {kernel:15s} {key}: {len(fitting)} candidates fit", flush=True)
            if not fitting:
                if kernel in ("compress_tma", "compress_fused"):  # the launcher's pick: forbid it
                    forced = "fused" if kernel == "compress_tma" and fused_by_size(D, r) \
                        else "split"
                    tables.setdefault(PATH_TABLE, {})[config_key(D, r, args.dtype, None,
                                                                 coeff)] = forced
                    _write(path, doc)  # and prove the design that replaces it
                continue
            if args.prune_only:
                cfg, ms = fitting[0][0], None
            else:
                fitting = spread(fitting, args.max_candidates)
                cfg, ms = _time_kernel(store, kernel, D, r, args.dtype, args.rows, fitting,
                                       best, device, coeff)
                timing_tab.setdefault(kernel, {})[key] = round(ms, 5)
                print(f"  {'':15s} best {ms:.4f} ms: {cfg}", flush=True)
            best[kernel] = cfg
            tables.setdefault(kernel, {})[key] = cfg
            shared_tab.setdefault(kernel, {})[key] = next(sh for c, sh in fitting if c == cfg)
            if kernel == "compress_fused":
                fused_ms = ms
            if kernel == "compress_y" and "compress_coeff" in best and not args.prune_only:
                # The compress_y timings ran the whole split op (with the best coeff config).
                tables.setdefault(PATH_TABLE, {})[config_key(D, r, args.dtype, None, coeff)] = (
                    "fused" if fused_ms is not None and fused_ms <= ms else "split")
            _write(path, doc)
    print(f"autotune: wrote {path}")
    return 0
