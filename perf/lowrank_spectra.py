"""Which TRM projection inputs LASER can compress at which tau: the rank each one needs.

    python -m perf.lowrank_spectra --out perf/results/cpu/lowrank_spectra.csv \
        --presets paper_sudoku [--weights runs/x/last.pt]

One forward of the gradient-carrying cycle (no LASER, fp32), the same model and inputs as
perf/bench_lowrank.py. Every CastedLinear input is taken as the matrix LASER stores (rows of the
activation's storage: for mlp_t's transposed (B, D, L) view, the (B L, D) rows it is a view of)
and its singular values give, per tau, the smallest rank r with ||X - X_r||_F <= tau ||X||_F
(the truncated SVD is the best rank-r approximation, so LASER's bases need at least this r).
A site is compressed only if r <= LaserConfig.max_rank (128 by default); otherwise its
fidelity check fails and it is stored raw, and a raw input is never served from (C, U).
(Without lean_saves, mlp_t's gate_up input is saved by F.linear as a copy 97 positions wide:
narrow, kept raw whatever its rank; the ranks here are those of the rows lean_saves stores.)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd
import torch

from laser_triton.trm.layers import CastedLinear

from .bench_lowrank import _load_weights, _setup
from .harness import add_threads_option, set_threads

TAUS = (0.05, 0.1, 0.2, 0.3, 0.5)


def needed_ranks(X: torch.Tensor, taus=TAUS) -> dict[float, int]:
    """Smallest r per tau with ||X - X_r||_F <= tau ||X||_F (fp64 singular values)."""
    e = torch.linalg.svdvals(X.double()).square()
    tail = (e.flip(0).cumsum(0).flip(0) / e.sum()).sqrt()  # tail[i]: relative error at rank i
    return {t: int((tail > t).sum()) for t in taus}


def spectra(preset: str, batch: int, seed: int, weights: dict | None) -> list[dict]:
    model, x, y, z = _setup(preset, batch, seed, weights)
    names = {m: re.sub(r"^blocks\.\d+\.", "", n) for n, m in model.net.named_modules()}
    found: dict[str, list[torch.Tensor]] = {}

    def hook(m, inp, out):
        t = inp[0]
        rows = t if t.stride(-1) == 1 else t.transpose(1, 2)  # the storage's rows
        found.setdefault(names[m], []).append(rows.reshape(-1, rows.shape[-1]))

    handles = [m.register_forward_hook(hook) for m in names if isinstance(m, CastedLinear)]
    with torch.no_grad():
        model.recurse(y, z, x)
    for h in handles:
        h.remove()
    out = []
    for name, Xs in found.items():
        ranks = [needed_ranks(X) for X in Xs]
        row = dict(preset=preset, batch=batch, layer=name, calls=len(Xs), rows=Xs[0].shape[0],
                   width=Xs[0].shape[1])
        for t in TAUS:
            rs = [r[t] for r in ranks]
            row[f"rank_min@{t}"], row[f"rank_max@{t}"] = min(rs), max(rs)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", nargs="+", default=["paper_sudoku"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--weights-note", default="")
    add_threads_option(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads, False)
    weights = _load_weights(args.weights) if args.weights else None
    name = ((f"{args.weights.name} ({args.weights_note})" if args.weights_note
             else args.weights.name) if args.weights else "initialised (untrained)")
    rows = [r for p in args.presets for r in spectra(p, args.batch, args.seed, weights)]
    df = pd.DataFrame(rows)
    df["weights"] = name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(df.drop(columns=["weights"]).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
