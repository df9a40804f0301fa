"""`laser-triton demo`: train a TRM on generated Sudoku with and without LASER, compare memory.

Both arms start from the same seed, weights and data. The plain arm runs with a
`SavedTensorCounter` in LASER's place, which measures what autograd saves in the gradient-
carrying cycle, per site and per storage; the LASER arm reports what LASER held for the same
sites (`Laser.report()`). Both report the last training step: the bytes held for backward, and
the peak of that step (the CUDA allocator's peak on a GPU; on CPU the byte accounting of
`laser_triton.tools.livebytes.LiveBytes`), above what was allocated when the step began. Then both arms'
held-out accuracy. The command prints a per-site table, the totals and the accuracies side by
side, and writes CSV files and (with matplotlib) a PNG to `--out`.

On CPU the default is the `tiny` preset, 60 steps per arm (about 2.5 minutes of one core);
`--long` trains 200 steps per arm, where the accuracies mean more. On a GPU `--preset
paper_sudoku` (or any preset) works the same way. Coefficients are stored in the activation
dtype by default (`--coeff-dtype auto`: fp32 on CPU, bf16 on GPU) so that the saving comes from
rank alone and not from narrowing fp32 activations to bf16; pass `--coeff-dtype bfloat16` for
LASER's default.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

import pandas as pd

from laser_triton.trm.config import PRESETS
from laser_triton.trm.savecount import SavedTensorCounter

from .cliutil import add_threads_argument, apply_threads, positive_float, positive_int
from .livebytes import StepPeak
from .trainer import Trainer
from .training import TrainConfig, load_data, resolve_device

__all__ = ["cli_main", "site_table"]

MiB = 1024 * 1024

# Training steps per arm when --steps is not given. `tiny`: the default run takes about 2.5
# minutes of one core (README states the measurement); --long is the run where accuracy means
# more. Other presets (meant for a GPU): 200 steps.
DEMO_STEPS = {"tiny": 60}
LONG_STEPS = {"tiny": 200}
DEFAULT_STEPS = 200
HELD_OUT = {"tiny": 128}

# Sites LASER skips by default in the tiny demo: silu(gate) ("...mlp#2", "...mlp_t#2") and
# silu(gate) * up (the down projections' input, "...down_proj#1"). Element-wise nonlinear
# products are full rank: on a trained tiny model they need rank ~250 of 256 for tau = 0.05, so
# LASER resets on each of them and stores them raw anyway. Excluding them stores them raw
# straight away: the same memory, without a futile reset per tensor (which on CPU more than
# doubles the LASER arm's time). `--exclude` with no pattern turns this off.
TINY_ELEMENTWISE_SITES = ("*.mlp#2", "*.mlp_t#2", "*.down_proj#1")

# What each "(raw: ...)" row of the table is: stored raw by rule, the same bytes in both arms.
RAW_RULES = {
    "excluded": "sites matched by LaserConfig.exclude",
    "dtype": "integer and bool tensors (indices, masks): never compressed",
    "weight copy": "weights and their dtype casts: never compressed",
    "leaf": "tensors without autograd history that watch() cannot tell from weights",
    "narrow": "rows narrower than min_width (too narrow for a low-rank basis to pay)",
    "few rows": "too few rows for a basis to pay",
    "raw()": "saved inside laser.raw() (exact by request)",
    "layout": "storages that cannot be compressed as one dense region",
    "aliased": "storages whose contents changed under another saved view",
    "backoff": "a site resting after repeated resets",
}


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


def _plot(path: str, sites: pd.DataFrame, summary: pd.DataFrame, hist: dict[str, pd.DataFrame],
          title: str) -> str:
    """demo.png; returns a note when matplotlib is missing (the plot is the only part that
    needs it: `pip install "laser-triton[plot]"`)."""
    try:
        import matplotlib
    except ImportError:
        return ("demo.png skipped: matplotlib is not installed "
                '(pip install matplotlib, or "laser-triton[plot]")')
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    body = sites[sites.site != "TOTAL"]
    fig = plt.figure(figsize=(14, 7))
    grid = fig.add_gridspec(2, 2, width_ratios=[3, 2])
    ax1, ax2, ax3 = fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[0, 1]), \
        fig.add_subplot(grid[1, 1])
    y = range(len(body))
    ax1.barh([i + 0.2 for i in y], body.plain_bytes / MiB, height=0.4, label="plain")
    ax1.barh([i - 0.2 for i in y], body.laser_bytes / MiB, height=0.4, label="LASER")
    ax1.set_yticks(list(y), [s if len(s) < 40 else s[:37] + "..." for s in body.site], fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("MiB held for backward (last step)")
    ax1.legend()
    ax1.set_title("activation memory per site ((raw: ...) rows: raw in both arms)")
    x = range(len(summary))
    ax2.bar([i - 0.2 for i in x], summary.held_MiB, width=0.4, label="held for backward")
    ax2.bar([i + 0.2 for i in x], summary.step_peak_MiB, width=0.4, label="step peak")
    ax2.set_xticks(list(x), list(summary.arm))
    ax2.set_ylabel("MiB (last step)")
    ax2.set_ylim(0, 1.3 * float(summary[["held_MiB", "step_peak_MiB"]].max().max()))
    ax2.legend(fontsize=8, loc="upper center", ncol=2)
    ax2.set_title("held vs peak memory per arm")
    for name, h in hist.items():
        ax3.plot(h.step, h.loss.rolling(10, min_periods=1).mean(), label=name)
    ax3.set_xlabel("step")
    ax3.set_ylabel("training loss (10-step mean)")
    ax3.legend()
    ax3.set_title("training loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="laser-triton demo", description=__doc__.split("\n\n")[0],
                                epilog="Default run: tiny preset, 60 steps per arm, about 2.5 "
                                "minutes of one CPU core; --long: 200 steps per arm.")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="TRM preset (default: tiny on CPU, paper_sudoku on GPU)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=positive_int, default=None,
                       help=f"training steps per arm (default: {DEMO_STEPS['tiny']} for tiny, "
                       f"{DEFAULT_STEPS} for other presets)")
    steps.add_argument("--long", action="store_true",
                       help=f"the longer run: {LONG_STEPS['tiny']} steps per arm on tiny "
                       "(about 6.5 minutes of one CPU core), where the accuracies mean more")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--test-puzzles", type=positive_int, default=None,
                   help="held-out puzzles evaluated per arm (default: 128 on tiny)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tau", type=positive_float, default=None, help="LASER error bound")
    p.add_argument("--rank", type=positive_int, default=None)
    p.add_argument("--max-rank", type=positive_int, default=None)
    p.add_argument("--coeff-dtype", default="auto",
                   choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto (the activation dtype), bfloat16, float16 or float32")
    p.add_argument("--exclude", nargs="*", default=None,
                   help="site patterns LASER keeps raw (default for tiny: the element-wise "
                   "SwiGLU products, see TINY_ELEMENTWISE_SITES; give none to compress all)")
    p.add_argument("--lean", action="store_true",
                   help="both arms with lean_saves (RMSNorm and the SwiGLU tail recomputed in "
                   "backward; see laser_triton/trm/lean.py)")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true")
    return p


def _raw_notes(sites: pd.DataFrame, excluded: list[str], default_exclude: bool) -> list[str]:
    """One line per "(raw: ...)" row of the table: what it is and why it is raw."""
    notes = []
    for site in sites.site:
        if not site.startswith("(raw: "):
            continue
        rule = site[len("(raw: "):-1]
        line = f"  {site}: {RAW_RULES.get(rule, 'kept raw by rule')}"
        if rule == "excluded":
            line += f" {excluded}"
            if default_exclude:
                line += (". The demo excludes the SwiGLU element-wise products by default: they "
                         "are full rank (rank ~250 of 256 for tau 0.05 on a trained tiny "
                         "model), so LASER would reset on each and store it raw anyway, only "
                         "slower. `--exclude` with no pattern compresses them; `--lean` "
                         "recomputes them in backward instead (both arms)")
        notes.append(line)
    return notes


def cli_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    threads = apply_threads(args.threads, device.type, prog="demo")
    preset = args.preset or ("tiny" if device.type == "cpu" else "paper_sudoku")
    steps = args.steps or (LONG_STEPS if args.long else DEMO_STEPS).get(preset, DEFAULT_STEPS)
    overrides: dict[str, object] = {"seed": args.seed, "device": str(device), "eval_every": 0,
                                    "steps": steps}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.test_puzzles is not None:
        overrides["test_puzzles"] = args.test_puzzles
    base = TrainConfig.for_preset(preset, **overrides)
    if args.lean:
        base.model = {**base.model, "lean_saves": True}
    laser_opts = dict(base.laser)
    for key in ("tau", "rank", "max_rank"):
        if getattr(args, key) is not None:
            laser_opts[key] = getattr(args, key)
    default_exclude = args.exclude is None and preset == "tiny"
    if args.exclude is not None:
        laser_opts["exclude"] = list(args.exclude)
    elif default_exclude:
        laser_opts["exclude"] = list(TINY_ELEMENTWISE_SITES)
    coeff = args.coeff_dtype
    if coeff == "auto":
        coeff = str(base.model_config().resolve_dtype(device)).removeprefix("torch.")
    laser_opts["coeff_dtype"] = coeff
    import laser_triton as lt  # validates the options before any training

    lt.LaserConfig(**laser_opts)
    os.makedirs(args.out, exist_ok=True)

    t0 = time.time()
    data = load_data(base)
    threads_note = "" if device.type != "cpu" else f" ({threads} thread{'s' * (threads != 1)})"
    print(f"demo: preset {preset}{' (lean_saves)' if args.lean else ''} on {device}"
          f"{threads_note}, {base.steps} steps per "
          f"arm, batch {base.batch_size}; {len(data[0])} generated training puzzles and "
          f"{len(data[2])} held-out ones ({base.clues} givens) in {time.time() - t0:.1f}s")
    print(f"LASER options: {laser_opts} (coefficients in {coeff}; LaserConfig defaults "
          "otherwise)")

    arms = {}
    for name, use_laser in (("plain", False), ("LASER", True)):
        cfg = TrainConfig(**{**base.__dict__, "use_laser": use_laser, "laser": laser_opts})
        trainer = Trainer(cfg, data=data)
        counter = None
        if not use_laser:  # same code path as LASER, measuring instead of compressing
            counter = SavedTensorCounter()
            counter.watch(trainer.model.net)
            trainer.model.laser = counter
        meter = StepPeak(device)
        last = cfg.steps

        def measure_last(step: int, meter=meter, last=last):
            return meter if step == last else contextlib.nullcontext()

        t = time.time()
        evals = trainer.train(progress=not args.no_progress, desc=name, step_context=measure_last)
        arms[name] = {"trainer": trainer, "counter": counter, "eval": evals[-1],
                      "seconds": time.time() - t, "peak": meter.peak}

    plain, laser_arm = arms["plain"], arms["LASER"]
    laser = laser_arm["trainer"].laser
    counter_df, laser_df = plain["counter"].report(), laser.report()
    sites = site_table(counter_df, laser_df)
    hist = {k: pd.DataFrame(v["trainer"].history) for k, v in arms.items()}
    held = {"plain": sites.plain_bytes.iloc[-1], "LASER": sites.laser_bytes.iloc[-1]}
    summary = pd.DataFrame([{
        "arm": k, "held_MiB": held[k] / MiB, "step_peak_MiB": v["peak"] / MiB,
        "test_blank_acc": v["eval"]["blank_acc"], "test_cell_acc": v["eval"]["cell_acc"],
        "test_exact_acc": v["eval"]["exact_acc"],
        "final_train_loss": float(hist[k].loss.tail(10).mean()), "train_seconds": v["seconds"]}
        for k, v in arms.items()])

    sites.to_csv(os.path.join(args.out, "sites.csv"), index=False)
    summary.to_csv(os.path.join(args.out, "summary.csv"), index=False)
    laser_df.to_csv(os.path.join(args.out, "laser_report.csv"), index=False)
    counter_df.to_csv(os.path.join(args.out, "plain_saved.csv"), index=False)
    for k, h in hist.items():
        h.to_csv(os.path.join(args.out, f"train_{k.lower()}.csv"), index=False)
    title = (f"TRM {preset}, {base.steps} steps per arm: held for backward {held['plain'] / MiB:.1f}"
             f" MiB plain vs {held['LASER'] / MiB:.1f} MiB LASER (tau {laser.cfg.tau}, "
             f"coefficients {coeff})")
    plot_note = _plot(os.path.join(args.out, "demo.png"), sites, summary, hist, title)

    print()
    print("Activation memory held for backward in the gradient-carrying cycle (last step):")
    print(_format(sites))
    notes = _raw_notes(sites, laser_opts.get("exclude", []), default_exclude)
    if notes:
        print("\nRows '(raw: ...)' are stored raw by rule, the same bytes in both arms:")
        print("\n".join(notes))
    seen = int(laser_df.raw_bytes.sum())
    print(f"\ncheck: the plain arm's counter measured {held['plain']:,} bytes; "
          f"LASER saw {seen:,} bytes before compression")
    print()
    blanks = 81 - base.clues
    print(f"Both arms, last step and held-out accuracy ({len(data[2])} generated puzzles, "
          f"{blanks} blank cells each, EMA weights after {base.steps} steps):")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    p, lz = summary.iloc[0], summary.iloc[1]
    peak_how = "CUDA allocator" if device.type == "cuda" else "byte accounting of the CPU step"
    print(f"\nLASER/plain: held for backward {lz.held_MiB / p.held_MiB:.2f}x, step peak "
          f"{lz.step_peak_MiB / p.step_peak_MiB:.2f}x (peak: {peak_how}, above what was "
          "allocated before the step; it includes the raw activations of a network call until "
          "its fidelity decisions are read, gradients and the optimizer's work space, so it "
          "falls less than held memory).")
    print(f"Accuracy: LASER minus plain blank-cell accuracy {lz.test_blank_acc - p.test_blank_acc:+.4f}"
          f" (chance: 1/9 = 0.11; cell accuracy counts the {base.clues} givens too). After "
          f"{base.steps} steps these are early-training accuracies, not final ones; --long "
          f"trains {LONG_STEPS['tiny']} steps per arm.")
    if plot_note:
        print(plot_note)
    files = "sites.csv, summary.csv, laser_report.csv, plain_saved.csv, train_*.csv"
    files += "" if plot_note else ", demo.png"
    print(f"\nwrote {args.out}/ {files} ({time.time() - t0:.0f}s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main())
