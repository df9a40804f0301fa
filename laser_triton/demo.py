"""`laser-triton demo`: train a TRM on generated Sudoku with and without LASER, compare memory.

Both arms start from the same seed, weights and data. The plain arm runs with a
`SavedTensorCounter` in LASER's place, which measures what autograd saves in the gradient-
carrying cycle, per site and per storage; the LASER arm reports what LASER held for the same
sites (`Laser.report()`). Both report the last training step. The command prints a per-site
table, the totals and the held-out accuracy of both arms, and writes CSV files and a PNG to
`--out`.

On CPU the default is the `tiny` preset for a few minutes; on a GPU `--preset paper_sudoku`
(or any preset) works the same way. Coefficients are stored in the activation dtype by default
(`--coeff-dtype auto`: fp32 on CPU, bf16 on GPU) so that the saving comes from rank alone and
not from narrowing fp32 activations to bf16; pass `--coeff-dtype bfloat16` for LASER's default.
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd
import torch

from .train import Trainer
from .training import TrainConfig, load_data, resolve_device
from .trm.savecount import SavedTensorCounter

__all__ = ["cli_main", "site_table"]

MiB = 1024 * 1024

# Training steps per arm when --steps is not given: a few minutes on 2 CPU cores for `tiny`.
DEMO_STEPS = {"tiny": 80}
DEFAULT_STEPS = 200

# Sites LASER skips by default in the tiny demo: silu(gate) ("...mlp#2", "...mlp_t#2") and
# silu(gate) * up (the down projections' input, "...down_proj#1"). Element-wise nonlinear
# products are full rank: on a trained tiny model they need rank ~250 of 256 for tau = 0.05, so
# LASER resets on each of them and stores them raw anyway. Excluding them stores them raw
# straight away: the same memory, without a futile reset per tensor (which on CPU more than
# doubles the LASER arm's time). `--exclude` with no pattern turns this off.
TINY_ELEMENTWISE_SITES = ("*.mlp#2", "*.mlp_t#2", "*.down_proj#1")


def site_table(counter: pd.DataFrame, laser: pd.DataFrame) -> pd.DataFrame:
    """Per-site bytes of both arms: LASER's tracked sites, then what LASER keeps raw by rule
    (narrow rows, too few rows, excluded sites, ...: raw in both arms, so the same bytes), then
    the total. A row "(unattributed)" would show any bytes the counter saw that LASER's report
    does not account for; it is absent when the two agree."""
    plain = dict(zip(counter.site, counter.bytes))
    tracked = laser[laser.width > 0]
    rows = []
    for r in tracked.itertuples():
        rows.append({"site": r.site, "width": r.width, "rank": r.rank,
                     "plain_bytes": int(plain.get(r.site, 0)), "laser_bytes": int(r.stored_bytes),
                     "max_rel_err": r.max_rel_err, "resets": r.resets,
                     "raw_fallbacks": r.raw_fallbacks})
    for r in laser[laser.width == 0].itertuples():
        rows.append({"site": r.site, "width": 0, "rank": 0, "plain_bytes": int(r.raw_bytes),
                     "laser_bytes": int(r.stored_bytes), "max_rel_err": 0.0, "resets": 0,
                     "raw_fallbacks": 0})
    plain_total = int(counter.bytes.sum())
    rest = plain_total - sum(r["plain_bytes"] for r in rows)
    if rest:
        rows.append({"site": "(unattributed)", "width": 0, "rank": 0, "plain_bytes": rest,
                     "laser_bytes": 0, "max_rel_err": 0.0, "resets": 0, "raw_fallbacks": 0})
    rows.append({"site": "TOTAL", "width": 0, "rank": 0, "plain_bytes": plain_total,
                 "laser_bytes": int(laser.stored_bytes.sum()),
                 "max_rel_err": float(tracked.max_rel_err.max()) if len(tracked) else 0.0,
                 "resets": int(tracked.resets.sum()),
                 "raw_fallbacks": int(tracked.raw_fallbacks.sum())})
    df = pd.DataFrame(rows)
    df["ratio"] = df.laser_bytes / df.plain_bytes.where(df.plain_bytes > 0)
    return df


def _format(df: pd.DataFrame) -> str:
    out = df.copy()
    out["plain_MiB"] = (out.pop("plain_bytes") / MiB).map("{:.2f}".format)
    out["laser_MiB"] = (out.pop("laser_bytes") / MiB).map("{:.2f}".format)
    out["ratio"] = out["ratio"].map(lambda v: "-" if pd.isna(v) else f"{v:.2f}")
    out["max_rel_err"] = out["max_rel_err"].map("{:.4f}".format)
    cols = ["site", "width", "rank", "plain_MiB", "laser_MiB", "ratio", "max_rel_err", "resets",
            "raw_fallbacks"]
    return out[cols].to_string(index=False)


def _plot(path: str, sites: pd.DataFrame, hist_plain: pd.DataFrame, hist_laser: pd.DataFrame,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    body = sites[sites.site != "TOTAL"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [2, 1]})
    y = range(len(body))
    ax1.barh([i + 0.2 for i in y], body.plain_bytes / MiB, height=0.4, label="plain")
    ax1.barh([i - 0.2 for i in y], body.laser_bytes / MiB, height=0.4, label="LASER")
    ax1.set_yticks(list(y), [s if len(s) < 40 else s[:37] + "..." for s in body.site], fontsize=6)
    ax1.invert_yaxis()
    ax1.set_xlabel("MiB saved for backward (last step)")
    ax1.legend()
    ax1.set_title("activation memory per site")
    for name, h in (("plain", hist_plain), ("LASER", hist_laser)):
        ax2.plot(h.step, h.loss.rolling(10, min_periods=1).mean(), label=name)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (10-step mean)")
    ax2.legend()
    ax2.set_title("training loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _auto_threads(device: torch.device) -> int:
    """1 on a CPU run whose cores are busy with other processes, else 0 (keep the default)."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and cores > 1 and os.getloadavg()[0] > 0.5 * cores:
        print(f"demo: load average {os.getloadavg()[0]:.1f} on {cores} cores: using 1 thread "
              "(--threads N to override)")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="laser-triton demo", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="TRM preset (default: tiny on CPU, "
                   "paper_sudoku on GPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps per arm")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--tau", type=float, default=None, help="LASER error bound")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--max-rank", type=int, default=None)
    p.add_argument("--coeff-dtype", default="auto",
                   help="auto (the activation dtype), bfloat16, float16 or float32")
    p.add_argument("--exclude", nargs="*", default=None,
                   help="site patterns LASER keeps raw (default for tiny: the element-wise "
                   "SwiGLU products, see TINY_ELEMENTWISE_SITES; give none to compress all)")
    p.add_argument("--lean", action="store_true",
                   help="both arms with lean_saves (RMSNorm and the SwiGLU tail recomputed in "
                   "backward; see laser_triton/trm/lean.py)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads; 0 (auto): torch's default, or 1 when the load "
                   "average shows the cores already busy, where OpenMP spin-waiting makes "
                   "several threads many times slower than one")
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    threads = args.threads or _auto_threads(device)
    if threads:
        torch.set_num_threads(threads)
    preset = args.preset or ("tiny" if device.type == "cpu" else "paper_sudoku")
    overrides: dict[str, object] = {"seed": args.seed, "device": str(device), "eval_every": 0,
                                    "steps": args.steps or DEMO_STEPS.get(preset, DEFAULT_STEPS)}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    base = TrainConfig.for_preset(preset, **overrides)
    if args.lean:
        base.model = {**base.model, "lean_saves": True}
    laser_opts = dict(base.laser)
    for key in ("tau", "rank", "max_rank"):
        if getattr(args, key) is not None:
            laser_opts[key] = getattr(args, key)
    if args.exclude is not None:
        laser_opts["exclude"] = list(args.exclude)
    elif preset == "tiny":
        laser_opts["exclude"] = list(TINY_ELEMENTWISE_SITES)
    coeff = args.coeff_dtype
    if coeff == "auto":
        coeff = str(base.model_config().resolve_dtype(device)).removeprefix("torch.")
    laser_opts["coeff_dtype"] = coeff
    os.makedirs(args.out, exist_ok=True)

    t0 = time.time()
    data = load_data(base)
    print(f"demo: preset {preset}{' (lean_saves)' if args.lean else ''} on {device}, "
          f"{base.steps} steps per arm, batch "
          f"{base.batch_size}; {len(data[0])} generated training puzzles and {len(data[2])} "
          f"held-out ones ({base.clues} givens) in {time.time() - t0:.1f}s")
    shown = {k: v for k, v in laser_opts.items()}
    print(f"LASER options: {shown} (coefficients in {coeff}; LaserConfig defaults otherwise)")

    arms = {}
    for name, use_laser in (("plain", False), ("LASER", True)):
        cfg = TrainConfig(**{**base.__dict__, "use_laser": use_laser, "laser": laser_opts})
        trainer = Trainer(cfg, data=data)
        counter = None
        if not use_laser:  # same code path as LASER, measuring instead of compressing
            counter = SavedTensorCounter()
            counter.watch(trainer.model.net)
            trainer.model.laser = counter
        t = time.time()
        evals = trainer.train(progress=not args.no_progress, desc=name)
        arms[name] = {"trainer": trainer, "counter": counter, "eval": evals[-1],
                      "seconds": time.time() - t}

    plain, laser_arm = arms["plain"], arms["LASER"]
    laser = laser_arm["trainer"].laser
    counter_df, laser_df = plain["counter"].report(), laser.report()
    sites = site_table(counter_df, laser_df)
    hist = {k: pd.DataFrame(v["trainer"].history) for k, v in arms.items()}
    summary = pd.DataFrame([{
        "arm": k, "saved_MiB": (sites.plain_bytes.iloc[-1] if k == "plain"
                                else sites.laser_bytes.iloc[-1]) / MiB,
        "test_cell_acc": v["eval"]["cell_acc"], "test_blank_acc": v["eval"]["blank_acc"],
        "test_exact_acc": v["eval"]["exact_acc"], "final_train_loss":
            float(hist[k].loss.tail(10).mean()), "train_seconds": v["seconds"]}
        for k, v in arms.items()])

    sites.to_csv(os.path.join(args.out, "sites.csv"), index=False)
    summary.to_csv(os.path.join(args.out, "summary.csv"), index=False)
    laser_df.to_csv(os.path.join(args.out, "laser_report.csv"), index=False)
    counter_df.to_csv(os.path.join(args.out, "plain_saved.csv"), index=False)
    for k, h in hist.items():
        h.to_csv(os.path.join(args.out, f"train_{k.lower()}.csv"), index=False)
    title = (f"TRM {preset}, {base.steps} steps: saved activations {sites.plain_bytes.iloc[-1] / MiB:.1f}"
             f" MiB plain vs {sites.laser_bytes.iloc[-1] / MiB:.1f} MiB LASER (tau "
             f"{laser.cfg.tau}, coefficients {coeff})")
    _plot(os.path.join(args.out, "demo.png"), sites, hist["plain"], hist["LASER"], title)

    print()
    print("Activation memory saved for backward in the gradient-carrying cycle (last step):")
    print(_format(sites))
    seen = int(laser_df.raw_bytes.sum())
    print(f"\ncheck: the plain arm's counter measured {sites.plain_bytes.iloc[-1]:,} bytes; "
          f"LASER saw {seen:,} bytes before compression")
    print()
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nwrote {args.out}/sites.csv, summary.csv, laser_report.csv, plain_saved.csv, "
          f"train_*.csv, demo.png ({time.time() - t0:.0f}s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main())
