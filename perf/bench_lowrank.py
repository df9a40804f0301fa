"""Backward of the TRM's gradient-carrying cycle with and without the compressed-domain linear
backward (laser_triton/lowrank.py, issue 17), side by side in one process.

    python -m perf.bench_lowrank --out perf/results/cpu/lowrank.csv --presets tiny tiny+lean

Variants, all from the same weights and inputs: `plain` (no LASER), `laser_rebuild`
(`lowrank_backward=False`: every compressed input rebuilt as C U^T in backward) and `laser_lowrank`
(the projections' weight gradients from (C, U)). The two LASER variants see identical forwards,
so they hold identical coefficients; only their backward differs. Per variant, of the cycle's
`loss.backward()` alone:
- `bwd_gflop`: FLOPs counted by torch.utils.flop_counter (one backward);
- `bwd_ms`: median wall-clock over `--reps` backwards (no counter active), and its ratio to
  `laser_rebuild`'s, next to the flop ratio; `bwd_cpu_ms`: the same backwards' median process
  CPU time (one thread: what the backward itself used, less sensitive than wall-clock to
  other processes on a shared machine), and its ratio;
- `bwd_peak_mib`: peak bytes of storages created during backward and alive (LiveBytes), the
  parameter gradients included; `peak_node`: the autograd node running at that peak;
  `linear_node_added_mib`, `norm_node_added_mib`: the most bytes one linear layer's (custom
  Function: lowrank's, or trm.lean's under lean saves) or lean norm's backward added above what
  was alive when it began, its rebuild included (0 for nodes that do not exist in a variant:
  non-lean plain F.linear);
- `norms_served`: lean RMSNorm backwards from (C, U); `served_rebuilt`: served entries that an
  unpack rebuilt anyway for another consumer (0 means no N x D rebuild for them);
- `rebuilds`, `rebuild_mib`: ops.reconstruct calls in backward and the bytes they produced;
- `served`: linear inputs whose weight gradient came from (C, U); `lin_gflop_lowrank` and
  `lin_gflop_rebuild`: for those inputs, the weight-gradient flops this way (2 n out r + 2 out r K
  per layer; the column layout 2 B D out r + 2 B L out r) against the rebuild path's
  (2 n K r + 2 n out K), and `rank_over_width`: their mean r/K;
- `bound_ratio_max`: over the served layers, the largest ||dW - G^T X||_F / (||G||_2 tau ||X||_F)
  with X the activation as it was saved (the stated bound is 1);
- `grad_err_vs_rebuild`, `grad_err_vs_plain`: max over parameters (and the cycle's input) of
  ||g - g_ref|| / ||g_ref||.
`--layers-out`: laser_lowrank's per-layer table (perf/lowrank_layers.py): per projection and
lean norm, calls, width D, compressed calls and their mean rank r, served calls, the flops of the
input-dependent part by the rebuild path and from (C, U), and why the others were not served.
Untrained weights unless `--weights`. On CPU the times are wall-clock of the torch backend on
one thread: they rank the variants on this machine and claim nothing about GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

import laser_triton as lt
from laser_triton.tools.lowrank_probe import SavedRegions, ServedGradients
from laser_triton.trm import TRM

from .harness import add_threads_option, backend_env, run_meta, set_threads
from .lowrank_layers import LayerTable, PeakAt
from .trm_run import make_batches, preset_config

MiB = 1 << 20
VARIANTS = ("plain", "laser_rebuild", "laser_lowrank")
# Custom Function nodes of the lean TRM's projections and norms (lowrank's, and trm.lean's with
# lowrank_backward off): the most bytes one of their backwards adds (PeakAt.added).
NODE_KINDS = ("_LinearBackward", "_RMSNormBackward", "RMSNormSavingOutputBackward")


def _linear_flops(served: ServedGradients) -> tuple[float, float, float]:
    """(low-rank flops, rebuild-path flops, mean r/K) of the served weight gradients."""
    low = full = 0.0
    ratios = []
    for call in served.calls:
        x, out = call.input, call.out
        r = x.U.shape[1]
        if x.layout == "rows":
            n, K = 1, x.shape[-1]
            for s in x.shape[:-1]:
                n *= s
            low += 2 * n * out * r + 2 * out * r * K
        else:
            B, D, K = x.shape
            n = B * D
            low += 2 * B * D * out * r + 2 * B * K * out * r
        full += 2 * n * K * r + 2 * n * out * K
        ratios.append(r / K)
    return low, full, (statistics.mean(ratios) if ratios else float("nan"))


def _setup(preset: str, batch: int, seed: int, weights: dict | None,
           forward_dtype: str = "float32"):
    # the gradient-carrying cycle alone
    cfg = preset_config(preset).replace(H_cycles=1, forward_dtype=forward_dtype)
    torch.manual_seed(seed)
    model = TRM(cfg)
    if weights is not None:
        model.load_state_dict(weights)
    b = make_batches(cfg, batch, 1, seed)[0]
    with torch.no_grad():
        x = model.input_embeddings(b["inputs"], b["puzzle_ids"])
        y = model.initial_carry(b).y
        z = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y.dtype)
    return model, x, y, z


def _forward(model: TRM, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor):
    xg = x.detach().requires_grad_(True)
    yo, _ = model.recurse(y, z, xg)
    # A fixed random readout: mean(y^2) of an RMS-normed y is constant, its gradient only noise.
    probe = torch.randn(yo.shape, generator=torch.Generator().manual_seed(7)).to(yo.device)
    return (yo.float() * probe).mean(), xg


def _grads(model: TRM, xg: torch.Tensor) -> dict[str, torch.Tensor]:
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    g["(input)"] = xg.grad.clone()
    model.zero_grad(set_to_none=True)
    return g


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


def bench_preset(preset: str, batch: int, args) -> list[dict]:
    model, x, y, z = _setup(preset, batch, args.seed, args.weights, args.forward_dtype)
    lasers = {"plain": None,
              "laser_rebuild": lt.Laser(lt.LaserConfig(tau=args.tau, max_rank=args.max_rank,
                                                       lowrank_backward=False)),
              "laser_lowrank": lt.Laser(lt.LaserConfig(tau=args.tau, max_rank=args.max_rank))}
    for laser in lasers.values():
        if laser is not None:
            laser.watch(model.net)
    rows, grads, layer_rows = [], {}, []
    for name, laser in lasers.items():
        model.laser = laser
        for _ in range(args.warmup):  # first bases (resets)
            loss, xg = _forward(model, x, y, z)
            loss.backward()
            _grads(model, xg)
        per_layer = laser is not None and laser.cfg.lowrank_backward
        table = LayerTable(model.net, laser) if per_layer else contextlib.nullcontext()
        with table:  # per-layer outcomes of the counted forward and backward
            with SavedRegions(laser) as saved:  # counted backward
                loss, xg = _forward(model, x, y, z)
            with ServedGradients(saved) as tally, FlopCounterMode(display=False) as flops:
                loss.backward()
        if per_layer:
            layer_rows += [dict(preset=preset, batch=batch, tau=args.tau, max_rank=args.max_rank,
                                forward_dtype=args.forward_dtype, **r) for r in table.rows()]
        # measured after the flop counter closes; then the copies go
        ratios = tally.bound_ratios(laser.cfg.tau) if laser is not None else []
        tally.saved = saved = None
        grads[name] = _grads(model, xg)
        loss, xg = _forward(model, x, y, z)  # peak bytes of a backward
        with PeakAt(NODE_KINDS) as live:
            loss.backward()
        _grads(model, xg)
        times, cpu_times = [], []
        for _ in range(args.reps):
            loss, xg = _forward(model, x, y, z)
            t0, c0 = time.perf_counter(), time.process_time()
            loss.backward()
            times.append((time.perf_counter() - t0) * 1e3)
            cpu_times.append((time.process_time() - c0) * 1e3)
            _grads(model, xg)
        low, full, rk = _linear_flops(tally)
        row = dict(preset=preset, batch=batch, variant=name, tau=args.tau, max_rank=args.max_rank,
                   forward_dtype=args.forward_dtype,
                   bwd_gflop=flops.get_total_flops() / 1e9, bwd_ms=statistics.median(times),
                   bwd_cpu_ms=statistics.median(cpu_times),
                   bwd_peak_mib=live.peak / MiB, peak_node=live.node,
                   linear_node_added_mib=live.added.get("_LinearBackward", 0) / MiB,
                   norm_node_added_mib=max(live.added.get("_RMSNormBackward", 0), live.added.get(
                       "RMSNormSavingOutputBackward", 0)) / MiB, rebuilds=tally.rebuilds,
                   rebuild_mib=tally.rebuild_bytes / MiB, served=len(tally.calls),
                   lin_gflop_lowrank=low / 1e9, lin_gflop_rebuild=full / 1e9,
                   rank_over_width=rk,
                   norms_served=table.norms_served() if per_layer else 0,
                   served_rebuilt=table.served_rebuilt() if per_layer else 0,
                   bound_ratio_max=max(ratios, default=float("nan")))
        if laser is not None:
            s = laser.summary()
            row.update(laser_stored_mib=s["stored_bytes"] / MiB, laser_raw_mib=s["raw_bytes"] / MiB)
        rows.append(row)
        print(f"{preset:18s} {name:14s} {row['bwd_gflop']:8.3f} GFLOP {row['bwd_ms']:9.1f} ms "
              f"peak {row['bwd_peak_mib']:8.2f} MiB  rebuilds {tally.rebuilds:3d}  served "
              f"{len(tally.calls):3d}", flush=True)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        ref = by["laser_rebuild"]
        r["flop_ratio_vs_rebuild"] = r["bwd_gflop"] / ref["bwd_gflop"]
        r["time_ratio_vs_rebuild"] = r["bwd_ms"] / ref["bwd_ms"]
        r["cpu_time_ratio_vs_rebuild"] = r["bwd_cpu_ms"] / ref["bwd_cpu_ms"]
        r["peak_ratio_vs_rebuild"] = r["bwd_peak_mib"] / ref["bwd_peak_mib"]
        r["grad_err_vs_rebuild"] = _max_rel(grads[r["variant"]], grads["laser_rebuild"])
        r["grad_err_vs_plain"] = _max_rel(grads[r["variant"]], grads["plain"])
    return rows, layer_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", nargs="+", default=["tiny", "tiny+lean"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="timed backwards per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tau", type=float, default=0.05, help="LaserConfig.tau of both LASER runs")
    ap.add_argument("--max-rank", type=int, default=128, help="LaserConfig.max_rank of both")
    ap.add_argument("--forward-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--weights", type=Path, default=None,
                    help="trained TRM: a state dict, or a `laser-triton train` checkpoint")
    ap.add_argument("--weights-note", default="", help="how the weights were trained (CSV)")
    ap.add_argument("--layers-out", type=Path, default=None,
                    help="per-layer table of laser_lowrank's backward (perf/lowrank_layers.py)")
    add_threads_option(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads, False)
    args.weights_name = ((f"{args.weights.name} ({args.weights_note})" if args.weights_note
                          else args.weights.name) if args.weights else "initialised (untrained)")
    args.weights = _load_weights(args.weights) if args.weights else None
    rows, layer_rows = [], []
    with backend_env("torch"):
        for preset in args.presets:
            got, layers = bench_preset(preset, args.batch, args)
            rows += got
            layer_rows += layers
    df = pd.DataFrame(rows)
    df["weights"] = args.weights_name
    for k, v in run_meta(torch.device("cpu")).items():
        df[k] = v
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"wrote {len(df)} rows to {args.out}")
    if args.layers_out is not None:
        layers = pd.DataFrame(layer_rows)
        layers["weights"] = args.weights_name
        args.layers_out.parent.mkdir(parents=True, exist_ok=True)
        layers.to_csv(args.layers_out, index=False)
        print(f"wrote {len(layers)} rows to {args.layers_out}")
    return 0


def _load_weights(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "model" in state and isinstance(state["model"], dict):  # a training checkpoint
        return state["model"]
    return state


if __name__ == "__main__":
    sys.exit(main())
