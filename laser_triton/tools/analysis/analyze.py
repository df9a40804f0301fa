"""`laser-triton analyze`: is a TRM's saved activation low-rank, and can LASER track it? (issue 6)

For each control model (untrained, baseline-trained, LASER-trained) the command runs a few
training steps with an `ActivationRecorder` in LASER's place and analyses every matrix LASER
would compress, per site and per recursion step, as it arrives:

- spectrum: ranks holding 90/95/99% of the energy and 1 - tau^2 (the rank LASER needs for
  tau, by Eckart-Young), effective rank (Roy-Vetterli, entropy of sigma / sum sigma) and
  participation ratio, uncentred (what LASER compresses) and centred (spread around the
  column mean), the mean's share of the energy and its cosine with the top direction;
- drift: principal angles between the top-r subspaces of consecutive matrices of a site;
- tracking, ideal: fixed-rank subspace iteration (r = the rank the site's first matrix needs
  for tau) in lagged and refresh modes, against the optimal rank-r error;
- tracking, real: a `SiteTracker` per site and mode with resets, rank changes, per-row errors
  (max, row 0, and the position-0 rows that feed the halting head), stored bytes. Unlike the
  hooks, the probe does not apply the partial-view rule (a saved view covering part of a
  storage, like the gate/up halves, must meet tau on its own), so it can understate raw
  fallbacks at such sites.

Outputs under --out: steps.csv (one row per model, site and step), summary.csv (per model and
mode), spectra.csv (mean normalized energies per site), analysis.md, and plots (spectra.png,
rank_heatmap.png). Plotting lives in `plots.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import pandas as pd
import torch

from laser_triton.config import LaserConfig

from ..cliutil import add_threads_argument, apply_threads
from . import spectra
from .capture import ActivationRecorder

__all__ = ["SiteAnalyzer", "capture_steps", "summarize", "summarize_roles", "cli_main"]

MODES = ("lagged", "refresh")


class SiteAnalyzer:
    """Callback for `ActivationRecorder`: analyses each (site, step) matrix as it arrives."""

    def __init__(self, model: str, laser_cfg: LaserConfig, drift_rank: int = 16,
                 period: int = 0, batch_rows: int = 0):
        self.model = model
        self.cfg = laser_cfg
        self.drift_rank = drift_rank
        self.period = period  # positions per sample; rows == batch_rows are (sample, position)
        self.batch_rows = batch_rows
        self.train_step = 0
        self.rows: list[dict] = []
        self._state: dict[str, dict] = {}
        self.energy_sums: dict[str, torch.Tensor] = {}
        self.energy_counts: dict[str, int] = {}

    def _site_state(self, site: str, width: int, s: spectra.Spectrum) -> dict:
        st = self._state.get(site)
        if st is None:
            r_fixed = max(1, min(spectra.rank_for_error(s, self.cfg.tau), self.cfg.max_rank))
            st = self._state[site] = {
                "seq": 0, "prev_top": None, "r_fixed": r_fixed,
                "fixed": {m: spectra.FixedRankTracker(r_fixed, m) for m in MODES},
                "probe": {m: spectra.LaserTrackerProbe(site, width, dataclasses.replace(
                    self.cfg, mode=m)) for m in MODES},
            }
        return st

    def __call__(self, site: str, role: str, call: int, X: torch.Tensor) -> None:
        s = spectra.spectrum(X)
        st = self._site_state(site, X.shape[1], s)
        tau = self.cfg.tau
        row = {"model": self.model, "site": site, "role": role, "stem": site.split("/", 1)[1],
               "train_step": self.train_step, "call": call, "seq": st["seq"], "tau": tau,
               "rows": X.shape[0], "width": X.shape[1],
               "rank90": spectra.energy_rank(s, 0.90), "rank95": spectra.energy_rank(s, 0.95),
               "rank99": spectra.energy_rank(s, 0.99), "rank_tau": spectra.rank_for_error(s, tau),
               "eff_rank": spectra.effective_rank(s),
               "participation": spectra.participation_ratio(s), **spectra.mean_profile(X, s)}
        r_d = min(self.drift_rank, s.V.shape[1])
        top = s.top(r_d)
        if st["prev_top"] is not None and st["prev_top"].shape == top.shape:
            ang = torch.rad2deg(spectra.principal_angles(st["prev_top"], top))
            row["drift_max_deg"], row["drift_mean_deg"] = float(ang.max()), float(ang.mean())
        else:
            row["drift_max_deg"] = row["drift_mean_deg"] = math.nan
        st["prev_top"] = top
        r = st["r_fixed"]
        row["fixed_rank"] = r
        row["fixed_opt_err"] = opt = spectra.optimal_error(s, r)
        period = self.period if self.batch_rows and X.shape[0] == self.batch_rows else 0
        for m in MODES:
            err, _ = st["fixed"][m].step(X)
            row[f"fixed_{m}_err"] = err
            row[f"fixed_{m}_ratio"] = err / opt if opt > 0 else (1.0 if err == 0 else math.inf)
            p = st["probe"][m].step(X, period=period)
            p_opt = spectra.optimal_error(s, p["rank"]) if p["rank"] > 0 else 0.0
            p["opt_err"] = p_opt
            p["ratio"] = p["err"] / p_opt if p_opt > 0 else (1.0 if p["err"] == 0 else math.inf)
            row.update({f"{m}_{k}": v for k, v in p.items()})
        row["raw_bytes"] = X.numel() * X.element_size()
        self.rows.append(row)
        total = float(s.energy.sum())
        if total > 0:  # the full spectrum (min(rows, width) values), not a prefix
            e = s.energy / total
            self.energy_sums[site] = self.energy_sums.get(site, 0) + e
            self.energy_counts[site] = self.energy_counts.get(site, 0) + 1
        st["seq"] += 1

    def spectra_frame(self) -> pd.DataFrame:
        """One row per site: model, site, e1..ek = mean sigma_i^2 / sum sigma^2 over the site's
        matrices, k = min(rows, width) (NaN beyond a site's own k)."""
        out = []
        for site, total in self.energy_sums.items():
            mean = (total / self.energy_counts[site]).tolist()
            out.append({"model": self.model, "site": site,
                        **{f"e{i + 1}": v for i, v in enumerate(mean)}})
        return pd.DataFrame(out)


def capture_steps(trainer, analyzer: SiteAnalyzer, steps: int) -> dict[str, int]:
    """Run `steps` training steps of `trainer` (a `laser_triton.tools.train.Trainer`) with an
    ActivationRecorder in the model's LASER slot; returns the skipped-storage counts."""
    model = trainer.model
    cfg = analyzer.cfg
    rec = ActivationRecorder(analyzer, min_width=cfg.min_width, min_rows=cfg.max_rank)
    handles = rec.watch(model.net)
    saved, model.laser = model.laser, rec
    try:
        for _ in range(steps):
            analyzer.train_step = trainer.step + 1
            trainer.train_step()
    finally:
        model.laser = saved
        for h in handles:
            h.remove()
    return rec.skipped


def summarize(steps: pd.DataFrame, warmup: int = 2, ratio_bound: float = 1.1) -> pd.DataFrame:
    """Per model and mode, over each site's matrices after its first `warmup`:

    - fixed_within_bound: share where ideal fixed-rank tracking is within ratio_bound x the
      optimal error at that rank;
    - tracker_within_bound: the same for the SiteTracker, over the matrices it compressed (raw
      fallbacks are exact and excluded), and over those it compressed without a reset;
    - reset and raw-fallback rates, over all sites and over the sites that compressed at least
      once after warm-up (the others need more than max_rank and reset on every tensor);
    - stored/raw bytes, largest whole-tensor and per-row errors, and spectral summaries."""
    out = []
    for model, df in steps.groupby("model", sort=False):
        late = df[df.seq >= warmup]
        for m in MODES:
            comp = late[late[f"{m}_raw"] == 0]
            tracked = comp[comp[f"{m}_reset"] == 0]
            live = late[late.site.isin(set(comp.site))]
            out.append({
                "model": model, "mode": m, "tau": float(df.tau.iloc[0]),
                "matrices": len(df), "after_warmup": len(late),
                "fixed_within_bound": float((late[f"fixed_{m}_ratio"] <= ratio_bound).mean()),
                "fixed_ratio_median": float(late[f"fixed_{m}_ratio"].median()),
                "tracker_within_bound": float((comp[f"{m}_ratio"] <= ratio_bound).mean()),
                "tracked_within_bound": float((tracked[f"{m}_ratio"] <= ratio_bound).mean()),
                "tracker_ratio_median": float(comp[f"{m}_ratio"].median()),
                # rank held over the rank that meets tau optimally (reset/shrink margins)
                "rank_over_needed_median": float((comp[f"{m}_rank"] / comp.rank_tau).median()),
                "reset_rate": float(late[f"{m}_reset"].mean()),
                "raw_rate": float(late[f"{m}_raw"].mean()),
                "sites_compressing": int(comp.site.nunique()), "sites": int(df.site.nunique()),
                "reset_rate_compressing": float(live[f"{m}_reset"].mean()),
                "stored_over_raw": float(late[f"{m}_stored_bytes"].sum() / late.raw_bytes.sum())
                if len(late) else math.nan,
                "max_err": float(df[f"{m}_err"].max()),
                "row_err_max": float(df[f"{m}_row_err_max"].max()),
                "pos0_row_err_max": float(df[f"{m}_pos0_row_err_max"].max()),
                "rank_tau_over_width": float((df.rank_tau / df.width).mean()),
                "eff_rank_over_width": float((df.eff_rank / df.width).mean()),
                "participation_median": float(df.participation.median()),
                "participation_centred_median": float(df.participation_centred.median()),
                "mean_energy_median": float(df.mean_energy.median()),
                "top_mean_cos_median": float(df.top_mean_cos.median()),
                "drift_max_deg_median": float(df.drift_max_deg.median()),
                "ratio_bound": ratio_bound, "warmup": warmup,
            })
    return pd.DataFrame(out)


def summarize_roles(steps: pd.DataFrame, warmup: int = 2, ratio_bound: float = 1.1
                    ) -> pd.DataFrame:
    """Per model, role and mode: tracking scores, resets, and subspace drift split into
    within the recursion (consecutive z calls of one cycle) and across training steps."""
    within = (steps.role == "z") & (steps.call > 0)
    out = []
    for (model, role), df in steps.groupby(["model", "role"], sort=False):
        late = df[df.seq >= warmup]
        w = within.loc[df.index]
        for m in MODES:
            comp = late[late[f"{m}_raw"] == 0]
            out.append({
                "model": model, "role": role, "mode": m,
                "fixed_within_bound": float((late[f"fixed_{m}_ratio"] <= ratio_bound).mean()),
                "tracker_within_bound": float((comp[f"{m}_ratio"] <= ratio_bound).mean()),
                "reset_rate": float(late[f"{m}_reset"].mean()),
                "raw_rate": float(late[f"{m}_raw"].mean()),
                "drift_within_cycle_deg": float(df[w].drift_max_deg.median()),
                "drift_across_steps_deg": float(df[~w].drift_max_deg.median()),
            })
    return pd.DataFrame(out)


# -- controls -------------------------------------------------------------------------------
def _trainer_for(args: argparse.Namespace, use_laser: bool, checkpoint: str | None):
    from ..trainer import Trainer
    from ..training import TrainConfig

    if checkpoint:
        return Trainer.from_checkpoint(checkpoint)
    over = {**json.loads(args.train), "seed": args.seed, "steps": args.train_steps,
            "use_laser": use_laser}
    cfg = TrainConfig.for_preset(args.preset, **over)
    if use_laser and args.laser:
        cfg.laser = {**cfg.laser, **json.loads(args.laser)}
    return Trainer(cfg)


def _untrained(args: argparse.Namespace):
    """A fresh model: the checkpoint's configuration when one is given, without LASER."""
    if not args.checkpoint:
        return _trainer_for(args, False, None)
    from ..trainer import Trainer
    from ..training import TrainConfig

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**{**state["config"], "use_laser": False})
    return Trainer(cfg, data=state.get("data"))


def _probe_config(trainer, args: argparse.Namespace) -> LaserConfig:
    kw = dict(trainer.cfg.laser)  # LaserConfig reads dtype names ("bf16") itself
    if args.laser:
        kw.update(json.loads(args.laser))
    if args.tau is not None:
        kw["tau"] = args.tau
    return LaserConfig(**kw)


def run_controls(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Build or load each control, train it if needed, capture and analyse."""
    frames, spectra_frames, info = [], [], {}
    for name in args.controls:
        t0 = time.time()
        if name == "untrained":
            trainer = _untrained(args)
        else:
            ckpt = args.checkpoint if name == "baseline" else args.laser_checkpoint
            trainer = _trainer_for(args, name == "laser", ckpt)
            if trainer.step < trainer.cfg.steps:
                trainer.train(progress=not args.no_progress, desc=name)
        torch.set_num_threads(args.threads)  # the trainer's imports may reset it
        mcfg = trainer.model.config
        analyzer = SiteAnalyzer(name, _probe_config(trainer, args), args.drift_rank,
                                period=mcfg.total_len,
                                batch_rows=trainer.cfg.batch_size * mcfg.total_len)
        t1 = time.time()
        skipped = capture_steps(trainer, analyzer, args.capture_steps)
        info[name] = {"trained_steps": trainer.step - args.capture_steps,
                      "train_s": round(t1 - t0, 1), "analyze_s": round(time.time() - t1, 1),
                      "skipped_storages": skipped, "laser": trainer.cfg.use_laser,
                      "laser_options": trainer.cfg.laser, "preset": trainer.cfg.preset,
                      "seed": trainer.cfg.seed}
        if name != "untrained" and trainer.history:
            info[name]["last_train_loss"] = trainer.history[-1]["loss"]
        frames.append(pd.DataFrame(analyzer.rows))
        spectra_frames.append(analyzer.spectra_frame())
        print(f"[analyze] {name}: {len(analyzer.rows)} matrices, {info[name]}", flush=True)
    return pd.concat(frames, ignore_index=True), pd.concat(spectra_frames, ignore_index=True), info


def _merge_previous(out: str, steps: pd.DataFrame, spec: pd.DataFrame, info: dict
                    ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Prepend the results of models analysed earlier in `out` (replacing re-run models)."""
    paths = [os.path.join(out, n) for n in ("steps.csv", "spectra.csv", "controls.json")]
    if not all(os.path.exists(p) for p in paths):
        return steps, spec, info
    new = set(steps.model)
    old_steps, old_spec = pd.read_csv(paths[0]), pd.read_csv(paths[1])
    with open(paths[2]) as f:
        old_info = json.load(f)
    steps = pd.concat([old_steps[~old_steps.model.isin(new)], steps], ignore_index=True)
    spec = pd.concat([old_spec[~old_spec.model.isin(new)], spec], ignore_index=True)
    return steps, spec, {**{k: v for k, v in old_info.items() if k not in new}, **info}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="laser-triton analyze", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="perf/results/analysis", help="output folder")
    p.add_argument("--checkpoint", help="baseline Trainer checkpoint (default: train one here)")
    p.add_argument("--laser-checkpoint", help="LASER-trained Trainer checkpoint")
    p.add_argument("--controls", nargs="+", default=["untrained", "baseline", "laser"],
                   choices=["untrained", "baseline", "laser"])
    p.add_argument("--preset", default="tiny", help="TrainConfig preset for on-the-spot training")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--train", default="{}", help="JSON TrainConfig overrides (on-the-spot runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--laser", default=None,
                   help="JSON LaserConfig options for the LASER arm and the probes")
    p.add_argument("--tau", type=float, default=None, help="tau of the tracking probes")
    p.add_argument("--capture-steps", type=int, default=4,
                   help="training steps captured per control (each: n z calls and one y call)")
    p.add_argument("--drift-rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2, help="matrices per site before scoring")
    add_threads_argument(p)
    p.add_argument("--append", action="store_true",
                   help="keep other models' results already in --out (same tau and options)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.threads = apply_threads(args.threads, "cpu", prog="laser-triton analyze")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    steps, spec, info = run_controls(args)
    if args.append:
        steps, spec, info = _merge_previous(args.out, steps, spec, info)
    summary = summarize(steps, args.warmup)
    steps.to_csv(os.path.join(args.out, "steps.csv"), index=False, float_format="%.6g")
    summary.to_csv(os.path.join(args.out, "summary.csv"), index=False, float_format="%.6g")
    roles = summarize_roles(steps, args.warmup)
    roles.to_csv(os.path.join(args.out, "summary_roles.csv"), index=False, float_format="%.6g")
    spec.to_csv(os.path.join(args.out, "spectra.csv"), index=False, float_format="%.5g")
    with open(os.path.join(args.out, "controls.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    from .plots import plot_all, write_markdown

    write_markdown(os.path.join(args.out, "analysis.md"), steps, summary, info, vars(args),
                   time.time() - t0, roles)
    if not args.no_plots:
        plot_all(args.out, steps, spec, float(steps.tau.iloc[0]))
    print(summary.to_string(index=False))
    print(f"[analyze] wrote {args.out} in {time.time() - t0:.0f}s")
    return 0
