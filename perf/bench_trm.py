"""TRM training memory and time: plain, checkpointing, selective checkpointing and LASER.

    python -m perf.bench_trm --out perf/results/trm.csv              # GPU: the paper presets
    python -m perf.bench_trm --out /tmp/trm.csv                      # CPU: tiny, bytes only

Scopes:
- `step`: the full training step, as the trainer runs it: one deep-supervision step (all
  T cycles, the first T-1 without grad), the ACT loss, backward, AdamW + SignSGD, EMA.
- `cycle`: the gradient-carrying cycle alone (n+1 network calls forward, then backward).

Presets: TRMConfig presets, `tiny_att` (CPU attention twin of tiny); a `+lean` suffix turns on
`lean_saves` (RMSNorm and the SwiGLU tail recomputed in backward, laser_triton/trm/lean.py).

Variants (perf/trm_variants.py): plain, ckpt, sac, laser_torch, laser_triton, each also
`+compile` (the network compiled, LASER's hooks outside). All variants of one preset start
from the same weights and data and run side by side in one process.

Measured, per (preset, scope, variant):
- GPU: `peak_mem_mib` = torch.cuda.max_memory_allocated over a step (weights, optimizer state
  and carry included); `act_peak_mib` = that peak minus what was allocated when the step began;
  `activation_mib` = memory allocated between the start of the forward and the loss (what is
  held for backward); `step_ms` = median of timed steps (synchronized), after warm-up.
- CPU: the same memory columns from byte accounting (`LiveBytes`: storages created in the step
  and alive, per storage), `step_ms` = NaN and `valid_timing` = False: no timing claims.
- Forward dtype (`forward_dtype` column): `--forward-dtype`, default bfloat16 everywhere, the
  dtype the TRM runs its forward in on a GPU (bf16 activations, fp32 RMSNorm input copies,
  bf16 weight copies), so that CPU byte accounting predicts GPU bytes. `auto` would run fp32
  on CPU, whose ratios do not carry over to a GPU.
- `saved_mib`: bytes saved for backward by the grad cycle, per storage, by saved-tensor hooks:
  the `SavedTensorCounter` for plain, LASER's report for LASER (NaN where hooks cannot see what
  is held, as inside checkpointing). Per-site bytes go to `<out stem>_sites.csv`.
- LASER's launch budget, from one more step under `laser_triton.launches.LaunchCounter`
  (every ops.* call booked as the Triton launches of its launcher, every other aten op in
  LASER's hooks and decisions as one launch; the same count on CPU and GPU):
  `launches_fwd_per_saved` (forward launches, decisions included, per tensor saved at a
  tracked site, compressed or kept raw by the site's reset back-off; resets, the slow path,
  are left out), `launches_fwd_per_tensor` (the same per tensor LASER compressed),
  `launches_fwd`, `launches_bwd`, `launches_reset` (the step's totals per section),
  `launches_per_step`, `reconstructs_per_region` (backward) and `host_syncs_per_step`
  (reads of device values, data-dependent shapes, linear algebra that reads its status back
  on CUDA such as eigh, waits on decision events whose values had not arrived: none on CPU;
  `host_syncs_reset` of those in resets, the slow path);
  `laser_tensors` = tensors compressed in that step; `held_peak_mib` the most LASER's
  drafted entries held at once (undecided ones raw plus coefficients). One more step under
  `LaunchCounter(device_behind=True)` plays a GPU that never catches up with the host:
  `decision_waits_behind` (waits at network-call ends that `decision_lag` forces),
  `final_waits_behind` (at compress() exit) and `held_peak_behind_mib`.
Ratios compare with `plain` and with `plain+compile` of the same preset and scope.

LASER runs on an untrained network with synthetic data unless `--weights` loads a trained
state dict: ranks on trained activations differ (see the demo and the study).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import laser_triton as lt
from laser_triton.launches import LaunchCounter
from laser_triton.trm import TRMConfig
from laser_triton.trm.savecount import SavedTensorCounter

from .harness import (
    Timeout,
    add_threads_option,
    backend_env,
    cleanup,
    compile_stats,
    parse_value,
    run_meta,
    set_threads,
    time_limit,
)
from .trm_run import (
    CPU_BATCH,
    CPU_PRESETS,
    CPU_VARIANTS,
    DEFAULT_BATCH,
    GPU_PRESETS,
    GPU_VARIANTS,
    Run,
    make_batches,
    measure_step,
    preset_config,
)
from .trm_variants import BASE_VARIANTS, install_variant, parse_variant

MiB = 1 << 20
COLUMNS = ["preset", "scope", "variant", "compiled", "gpu", "batch", "peak_mem_mib",
           "act_peak_mib", "activation_mib", "saved_mib", "step_ms", "step_ms_p20", "step_ms_p80",
           "mem_ratio_vs_plain", "act_ratio_vs_plain", "time_ratio_vs_plain",
           "mem_ratio_vs_compiled_plain", "act_ratio_vs_compiled_plain",
           "time_ratio_vs_compiled_plain", "laser_raw_mib", "laser_stored_mib", "laser_resets",
           "laser_tensors", "launches_fwd_per_saved", "launches_fwd_per_tensor",
           "launches_fwd", "launches_bwd", "launches_reset", "launches_per_step",
           "reconstructs_per_region", "host_syncs_per_step", "host_syncs_reset",
           "decision_waits_behind", "final_waits_behind", "held_peak_mib", "held_peak_behind_mib",
           "valid_timing", "warmup_s", "compile_stats", "weights", "laser_config", "forward_dtype",
           "status",
           "torch_version", "triton_version", "date"]
LAUNCH_COLUMNS = ("launches_fwd_per_saved", "launches_fwd_per_tensor", "launches_fwd",
                  "launches_bwd", "launches_reset", "launches_per_step",
                  "reconstructs_per_region", "host_syncs_per_step", "host_syncs_reset",
                  "decision_waits_behind", "final_waits_behind", "held_peak_mib",
                  "held_peak_behind_mib")
SITE_COLUMNS = ["preset", "scope", "variant", "gpu", "batch", "site", "width", "rank", "tensors",
                "raw_bytes", "stored_bytes", "max_rel_err", "resets", "raw_fallbacks"]
def bench_variant(preset: str, cfg: TRMConfig, scope: str, variant_name: str, batch: int,
                  batches: list[dict], device: torch.device, args) -> tuple[dict, list[dict]]:
    variant = parse_variant(variant_name)
    row = dict(preset=preset, scope=scope, variant=variant.name, compiled=variant.compiled,
               batch=batch, valid_timing=device.type == "cuda")
    run = Run(cfg, scope, batches, device, args.seed, args.weights)
    laser_cfg = lt.LaserConfig(**args.laser_options)
    laser = install_variant(run.model, variant, laser_cfg, args.compile_backend or "inductor")
    sites: list[dict] = []
    # laser_triton on CUDA runs as users run it (auto: the kernels wherever ops picks them);
    # on CPU the kernels only run forced, under TRITON_INTERPRET=1.
    forced = variant.laser_backend
    if forced == "triton" and device.type == "cuda":
        forced = "auto"
    with backend_env(forced):
        t0 = time.perf_counter()
        # LASER builds its bases by resets in the first steps: time the tracked steady state.
        extra = (2 if device.type == "cuda" else 1) if laser is not None else 0
        warmup = args.warmup + extra + (1 if variant.compiled else 0)
        for _ in range(warmup):  # compile, first bases (resets), optimizer state
            run.step(lambda name: None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["warmup_s"] = time.perf_counter() - t0
        results = [measure_step(run, device) for _ in range(args.steps)]
        if laser is not None:  # one more step, through LASER's launch counter
            s, rep = laser.summary(), laser.report()  # of the last measured step
            with LaunchCounter() as counter:
                run.step(lambda name: None)
            launch_row = counter.summary()
            with LaunchCounter(device_behind=True) as behind:  # and as if the GPU lagged
                run.step(lambda name: None)
            launch_row.update(decision_waits_behind=behind.waits,
                              final_waits_behind=behind.final_waits,
                              held_peak_mib=launch_row["held_peak_bytes"] / MiB,
                              held_peak_behind_mib=behind.held_peak / MiB)
    times = sorted(r["ms"] for r in results)
    row.update(peak_mem_mib=max(r["peak"] for r in results) / MiB,
               act_peak_mib=max(r["act_peak"] for r in results) / MiB,
               activation_mib=results[-1]["act"] / MiB, step_ms=statistics.median(times),
               step_ms_p20=times[int(0.2 * (len(times) - 1))],
               step_ms_p80=times[int(0.8 * (len(times) - 1))], status="ok")
    if variant.compiled:
        row["compile_stats"] = compile_stats()
    if laser is not None:
        row.update(saved_mib=s["stored_bytes"] / MiB, laser_raw_mib=s["raw_bytes"] / MiB,
                   laser_stored_mib=s["stored_bytes"] / MiB, laser_resets=int(rep.resets.sum()),
                   laser_tensors=launch_row["tensors"],
                   **{k: launch_row[k] for k in LAUNCH_COLUMNS})
        sites = [dict(site=r.site, width=r.width, rank=r.rank, tensors=r.tensors,
                      raw_bytes=r.raw_bytes, stored_bytes=r.stored_bytes,
                      max_rel_err=r.max_rel_err, resets=r.resets, raw_fallbacks=r.raw_fallbacks)
                 for r in rep.itertuples()]
    elif variant.name == "plain":  # one more, untimed step through the saved-tensor counter
        counter = SavedTensorCounter()
        handles = counter.watch(run.model.net)
        run.model.laser = counter
        run.step(lambda name: None)
        run.model.laser = None
        for h in handles:
            h.remove()
        rep = counter.report()
        row["saved_mib"] = counter.total_bytes() / MiB
        sites = [dict(site=r.site, width=math.nan, rank=math.nan, tensors=r.saves,
                      raw_bytes=r.bytes, stored_bytes=r.bytes, max_rel_err=0.0, resets=0,
                      raw_fallbacks=0) for r in rep.itertuples()]
    return row, sites


def add_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Ratios against plain and plain+compile of the same preset and scope."""
    df = df.copy()
    for base, suffix in (("plain", "plain"), ("plain+compile", "compiled_plain")):
        ref = df[(df.variant == base) & (df.status == "ok")].set_index(["preset", "scope"])
        for col, metric in (("mem", "peak_mem_mib"), ("act", "activation_mib"),
                            ("time", "step_ms")):
            denom = [ref[metric].get((p, s), math.nan) for p, s in zip(df.preset, df.scope)]
            df[f"{col}_ratio_vs_{suffix}"] = df[metric].astype(float) / pd.Series(
                denom, index=df.index, dtype=float)
    return df


def failure_status(exc: BaseException) -> str:
    """The CSV status of a failed run. A timeout or OOM can surface as a later exception
    raised while unwinding (e.g. in a context manager's exit), so the chain is searched."""
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, torch.OutOfMemoryError):
            return "oom"
        if isinstance(e, Timeout):
            return f"timeout: {e}"
    msg = (str(exc).splitlines() or [""])[0][:160]
    return f"error: {type(exc).__name__}: {msg}"


def plan(presets: list[str], scopes: list[str], variants: list[str]) -> list[tuple[str, str, str]]:
    """(preset, scope, variant) in priority order, so a time budget drops the least useful:
    every variant of the first preset's first scope (the headline), then the core variants
    (eager, and compiled plain and LASER-Triton) of the other pairs, then the rest."""
    core = {"plain", "ckpt", "sac", "laser_torch", "laser_triton", "plain+compile",
            "laser_triton+compile"}
    keyed = []
    for si, scope in enumerate(scopes):
        for pi, preset in enumerate(presets):
            for vi, v in enumerate(variants):
                tier = 0 if si == pi == 0 else 1 if v in core else 2
                keyed.append(((tier, si, pi, vi), (preset, scope, v)))
    return [item for _, item in sorted(keyed)]


def auto_batch(preset: str, cfg: TRMConfig, device: torch.device, args) -> int:
    """Largest batch at which plain eager's full step fits: a probe at a small batch gives
    the per-sample peak; the estimate is verified (and shrunk on OOM) by bench_variant."""
    if device.type != "cuda":
        return 2
    probe = 16
    row, _ = bench_variant(preset, cfg, "step", "plain", probe,
                           make_batches(cfg, probe, 2, args.seed), device,
                           argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1}))
    free, total = torch.cuda.mem_get_info()
    state = (row["peak_mem_mib"] - row["act_peak_mib"]) * MiB
    per_sample = row["act_peak_mib"] * MiB / probe
    batch = max(probe, min(int((0.85 * total - state) / per_sample) // 64 * 64, args.max_batch))
    check = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0})
    for _ in range(4):  # verify: one plain eager step at that batch, shrinking on OOM
        try:
            bench_variant(preset, cfg, "step", "plain", batch,
                          make_batches(cfg, batch, 1, args.seed), device, check)
            return batch
        except torch.OutOfMemoryError:
            cleanup(True)
            batch = max(probe, int(batch * 0.8) // 64 * 64)
    return batch


AUTO_BATCH_FALLBACK = 64


def safe_auto_batch(preset: str, cfg: TRMConfig, device: torch.device, args) -> int:
    """auto_batch within at most 90 s; any failure falls back to a small fixed batch (logged)
    rather than losing the whole benchmark before its first CSV row."""
    try:
        with time_limit(min(90.0, args.time_budget / 4)):
            return auto_batch(preset, cfg, device, args)
    except Exception as exc:  # noqa: BLE001 - recorded on stdout, the run goes on
        print(f"{preset}: automatic batch failed ({failure_status(exc)}); using batch "
              f"{AUTO_BATCH_FALLBACK}", flush=True)
        cleanup(device.type == "cuda")
        return AUTO_BATCH_FALLBACK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", nargs="+", default=None,
                    help=f"default: {' '.join(GPU_PRESETS)} on GPU, {' '.join(CPU_PRESETS)} "
                         "on CPU; '+lean' suffix: lean_saves")
    ap.add_argument("--scopes", nargs="+", default=["step", "cycle"], choices=["step", "cycle"])
    ap.add_argument("--variants", nargs="+", default=None,
                    help=f"from {BASE_VARIANTS}, each optionally '+compile'")
    ap.add_argument("--batch", nargs="*", default=[], metavar="PRESET=B",
                    help="override a preset's batch (B or 'auto')")
    ap.add_argument("--max-batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=None, help="measured steps (GPU 5, CPU 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (GPU 2, CPU 1)")
    ap.add_argument("--laser", nargs="*", default=[], metavar="KEY=VALUE",
                    help="LaserConfig overrides, e.g. tau=0.05 max_rank=128")
    ap.add_argument("--weights", type=Path, default=None, help="trained TRM state dict")
    ap.add_argument("--forward-dtype", default="bfloat16",
                    choices=["bfloat16", "float32", "float16", "auto"],
                    help="activation dtype of the forward (default bfloat16: the GPU's, also on "
                         "CPU so that byte accounting predicts GPU memory; auto: fp32 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default inductor); on CPU compiled variants run "
                         "only when given, e.g. aot_eager to check the autograd path quickly")
    ap.add_argument("--time-budget", type=float, default=600.0, help="seconds for all runs")
    ap.add_argument("--variant-timeout", type=float, default=180.0)
    add_threads_option(ap)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    set_threads(args.threads, cuda)
    presets = args.presets or (list(GPU_PRESETS) if cuda else list(CPU_PRESETS))
    variants = args.variants or list(GPU_VARIANTS if cuda else CPU_VARIANTS)
    for v in variants:
        parse_variant(v)  # fail early on a typo
    args.steps = args.steps or (5 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.laser_options = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.laser)}
    args.weights_name = args.weights.name if args.weights else "initialised (untrained)"
    args.weights = torch.load(args.weights, map_location="cpu") if args.weights else None
    batches_override = dict(kv.split("=", 1) for kv in args.batch)
    meta = dict(**run_meta(device), weights=args.weights_name, laser_config=" ".join(args.laser) or "defaults",
                forward_dtype=str(TRMConfig(forward_dtype=args.forward_dtype).resolve_dtype(
                    device)).removeprefix("torch."))
    sites_path = args.out.with_name(args.out.stem + "_sites.csv")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    site_rows: list[dict] = []
    start = time.time()

    def flush() -> None:
        df = add_ratios(pd.DataFrame([{**meta, **r} for r in rows], columns=COLUMNS))
        df.to_csv(args.out, index=False)
        pd.DataFrame([{**meta, **r} for r in site_rows], columns=SITE_COLUMNS).to_csv(
            sites_path, index=False)

    setups: dict[str, tuple[TRMConfig, int, list[dict]]] = {}
    for preset, scope, name in plan(presets, args.scopes, variants):
        if preset not in setups:
            cfg = preset_config(preset).replace(forward_dtype=args.forward_dtype)
            spec = batches_override.get(preset, DEFAULT_BATCH.get(preset, 8) if cuda
                                        else CPU_BATCH)
            batch = safe_auto_batch(preset, cfg, device, args) if spec == "auto" else int(spec)
            setups[preset] = (cfg, batch, make_batches(cfg, batch, 4, args.seed))
        cfg, batch, batches = setups[preset]
        remaining = args.time_budget - (time.time() - start)
        base = dict(preset=preset, scope=scope, variant=name, batch=batch,
                    compiled=name.endswith("+compile"), valid_timing=cuda)
        if name.endswith("+compile") and not cuda and not args.compile_backend:
            rows.append({**base, "status": "skipped: compiled variants run on CUDA "
                                           "(--compile-backend to force)"})
            continue
        if remaining < 5:
            rows.append({**base, "status": "skipped: time budget"})
            continue
        try:
            with time_limit(min(args.variant_timeout, remaining)):
                row, sites = bench_variant(preset, cfg, scope, name, batch, batches,
                                           device, args)
            rows.append(row)
            site_rows += [{**base, **s} for s in sites]
        except Exception as exc:  # noqa: BLE001 - recorded in the CSV, run goes on
            rows.append({**base, "status": failure_status(exc)})
        finally:
            cleanup(cuda)
        r = rows[-1]
        print(f"{preset:16s} {scope:5s} {name:22s} B={batch:<5d} "
              f"peak {r.get('peak_mem_mib', math.nan):9.1f} MiB  "
              f"act {r.get('activation_mib', math.nan):9.1f} MiB  "
              f"{r.get('step_ms', math.nan):8.2f} ms  {r['status']}", flush=True)
        flush()
    flush()
    print(f"wrote {len(rows)} rows to {args.out} and {sites_path} ({time.time() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
