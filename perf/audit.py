"""Static sm_90 audit of what the dispatcher launches for TRM shapes, and a performance model.

    laser-triton bench audit [--out perf/results/audit] [--full] [--cached] [--coeff fp32]

No GPU needed. For each TRM shape (D: every row width the shipped presets save,
`laser_triton.trm.config.preset_widths`: 97 (mlp_t positions), 128 and 256 (tiny), 512
(hidden), 1024 (mlp_t gate/up), 1536 (SwiGLU), 3072 (gate/up); r in 8..128; N = 87,000 rows)
and activation dtype, the launch plan of compress_pass (`launch_plan`, the launcher's own path
choice and the config store of an H200 with the shipped files) and reconstruct is compiled for
sm_90 at the launch specialization and its binary read (`kernels._audit`), with the
coefficients C stored as `--coeff` (LaserConfig's coeff_dtype, default bf16; C's dtype changes
the compress and reconstruct binaries, so the store keys their configs by it). Writes:
- `audit.csv`: kernel, shape, config, registers, spills, shared memory, HMMA/HGMMA/DMMA/FFMA
  counts, compile seconds, and what fails the budget;
- `model.csv`: an ESTIMATE per op: predicted H200 time = sum over its kernels of
  max(HBM bytes / 4.25 TB/s, L2 -> SM bytes (re-reads of X, U and C included) / 7 TB/s
  (assumed), bytes in flight / HBM latency (assumed 0.6 us), tensor time (flops / MMA rate, or the SASS's wgmma shapes when narrow N makes
  them shared-memory bound), issue-slot bound from the SASS loop bodies) + launch gaps, the
  roofline time, the predicted fraction of roofline, the bound per kernel and the goal
  (compress >= 0.80). Not a measurement; `laser-triton bench compare` (perf/compare.py)
  evaluates the same model (`model_op`, any N and D) at the shapes a GPU run of `bench
  kernels` measured.
Compile times are CPU seconds of the compiler and ptxas (independent of machine load), measured
with an empty Triton cache (`--cached` reuses ~/.triton, where a hit costs ~0).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

BW = 4.25e12  # bytes/s: measured H200 copy bandwidth (docs/design.md §11)
MMA_RATE = {"HGMMA": 790e12, "HMMA": 0.6 * 790e12, "FFMA": 132 * 128 * 2 * 1.98e9}
ISSUE_RATE = 132 * 4 * 1.98e9  # warp instructions per second (4 schedulers per SM)
# ASSUMED, not measured here: L2 -> SM bandwidth of an H200 (~5.5 TB/s microbenchmarked on
# a 114-SM H100 PCIe, scaled to 132 SMs at a higher clock). Re-reads of X, U and C that hit
# L2 cost this, not HBM.
L2_BW = 7.0e12
# Tensor-pipe clocks per second per SM at which a perfectly shaped wgmma stream reaches
# MMA_RATE["HGMMA"] (2048 16-bit MACs per clock per SM): SASS clocks / this = seconds.
MMA_CLOCK = 790e12 / (132 * 4096)
N_SMS = 132
# ASSUMED: HBM latency under load. A kernel streams at most (bytes its resident CTAs have in
# flight) / latency (Little's law): a software-pipelined loop with S stages keeps S - 1
# iterations of loads in flight per CTA (one, unpipelined, when S = 1).
HBM_LATENCY_S = 0.6e-6
LAUNCH_S = 2e-6  # gap per extra kernel launch in a stream
N_ROWS = 87_000

def _trm_widths() -> tuple[int, ...]:
    from laser_triton.trm.config import preset_widths  # noqa: PLC0415

    return preset_widths()


TRM_D = _trm_widths()  # every width the presets save (97 is stored raw by default)
# Ranks: the padded widths 8..128 and, per padded width from 32, one rank not divisible by 16
# (LASER's adaptive ranks are mostly such: 97, 125, 127 on the tiny TRM), which Triton's
# launch specialization compiles to another binary (`configs.rank_class`).
TRM_R = (8, 16, 31, 32, 63, 64, 127, 128)
QUICK = [(512, 32), (512, 64), (512, 128), (97, 64), (1536, 64), (3072, 128)]
GOAL = 0.80
OPS = ("compress_pass", "reconstruct", "orthonormalize")
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _orth_module():
    """perf/audit_orth.py, loaded by path (perf/ is a directory of scripts, not a package
    on every install)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("laser_triton_perf_audit_orth",
                                                  Path(__file__).parent / "audit_orth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compress_module():
    """The module (the package re-exports the function under the same name)."""
    import importlib  # noqa: PLC0415

    return importlib.import_module("laser_triton.kernels.compress_pass")


def kernel_work(kernel: str, N: int, D: int, r: int, dtype: str, cfg: dict,
                producer: tuple[str, dict] | None = None, coeff: str = "bf16") -> dict:
    """HBM bytes, tensor-core (or FMA) flops, grid size and loop trips of one launch.
    `producer`: (kernel, config) of the product kernel a compress_finish step reduces;
    `coeff`: the dtype C is stored as (so far only reconstruct's bytes and products read it)."""
    import math  # noqa: PLC0415

    from laser_triton.kernels._spec import SPECS, Shape  # noqa: PLC0415

    work = _kernel_work(kernel, N, D, r, dtype, cfg, producer, coeff)
    grid = SPECS[kernel].grid(Shape(N, D, r, dtype), cfg, 132)
    work["programs"] = int(math.prod(grid))
    return work


def _kernel_work(kernel: str, N: int, D: int, r: int, dtype: str, cfg: dict,
                 producer: tuple[str, dict] | None = None, coeff: str = "bf16") -> dict:
    import importlib  # noqa: PLC0415

    from laser_triton.kernels._common import pow2  # noqa: PLC0415

    cp = _compress_module()
    xb = _BYTES[dtype]
    split = 2 if dtype == "bf16" else 3  # MMAs per product (bf16x3); 1 for ieee (FMA)
    if cfg.get("PRECISION") == "ieee":
        split = 1
    if kernel == "compress_fused":
        P, J = cp.fused_programs(N, D, r, cfg, 132)
        byt = N * D * xb + N * r * xb + (J + 1) * N * 4 + P * D * r * 4
        flops = 2 * N * D * r * split * 2
        n_blk, br = _cdiv(N, cfg["BLOCK_N"]), cp.fused_block_r(D, r, cfg)
        # per (row block, rank tile): X for C, X again for Y, the fp32 U tile
        l2 = n_blk * J * (2 * cfg["BLOCK_N"] * D * xb + D * br * 4) + byt - N * D * xb
        return dict(bytes=byt, l2_bytes=l2, flops=flops, outer=n_blk * J,
                    inner=_cdiv(D, cfg["BLOCK_K"]), stages=cfg["num_stages"],
                    stream=cfg["BLOCK_N"] * cfg["BLOCK_K"] * xb + cfg["BLOCK_K"] * br * 4)
    if kernel == "compress_tma":
        tma = importlib.import_module("laser_triton.kernels.compress_tma")
        P = tma.tma_programs(N, D, r, cfg, 132)
        n_blk = _cdiv(N, cfg["BLOCK_N"])
        byt = N * D * xb + N * r * xb + 2 * N * 4 + P * D * r * 4
        # L2 -> SM: X once (TMA into shared memory, both products read it there), the fp32
        # basis once per program (split and kept in shared memory), the outputs
        l2 = byt + P * D * r * 4
        # X (bf16 or fp16) is exact in an MMA of its own type: the paired C product
        # [X U_hi | X U_lo] is one 2r-wide MMA and Y two (C's halves). With 32-row blocks the
        # C product is below wgmma's 64 rows, so it runs as mma.sync (HMMA) at that unit's
        # rate, next to the Y product's HGMMAs
        c_flops = 2 * N * D * 2 * pow2(r)
        y_flops = 2 * N * D * r * 2
        return dict(bytes=byt, l2_bytes=l2, flops=c_flops + y_flops,
                    hmma_flops=c_flops if cfg["BLOCK_N"] < 64 else 0,
                    # one trip of the persistent loop per program, its row blocks inside (the
                    # SASS's only other "loops" are mbarrier retry stubs, rarely taken)
                    outer=P, inner=_cdiv(n_blk, P), stages=cfg["num_stages"],
                    stream=cfg["BLOCK_N"] * D * xb)
    if kernel == "compress_coeff":
        byt = N * D * xb + N * r * xb + (N * r * 4 if dtype != "fp32" else 0) + 2 * N * 4
        n_blk = _cdiv(N, cfg["BLOCK_N"])
        l2 = byt + n_blk * D * pow2(r) * 4  # the fp32 U, once per row block
        return dict(bytes=byt, l2_bytes=l2, flops=2 * N * D * r * split, outer=n_blk,
                    inner=_cdiv(D, cfg["BLOCK_D"]), stages=cfg["num_stages"],
                    stream=cfg["BLOCK_D"] * (cfg["BLOCK_N"] * xb + pow2(r) * 4))
    if kernel == "compress_y":
        n_seg, rows = cp.y_segments(N, D, r, cfg, 132)
        byt = N * D * xb + N * r * 4 + n_seg * D * r * 4
        l2 = byt + (_cdiv(D, cfg["BLOCK_D"]) - 1) * N * r * 4  # C halves, once per D tile
        return dict(bytes=byt, l2_bytes=l2, flops=2 * N * D * r * split,
                    outer=n_seg * _cdiv(D, cfg["BLOCK_D"]), inner=_cdiv(rows, cfg["BLOCK_N"]),
                    stages=cfg["num_stages"],
                    stream=cfg["BLOCK_N"] * (cfg["BLOCK_D"] * xb + pow2(r) * 4))
    if kernel == "compress_finish":
        # The slabs it reduces are those its producer (the launch writing Y partials) wrote
        # with the config it ran; without one, the size rule's design at built-in defaults.
        if producer is None:
            producer = (("compress_fused", cp.SPEC_FUSED.defaults) if cp.fused_by_size(D, r)
                        else ("compress_y", cp.SPEC_Y.defaults))
        pkernel, pcfg = producer
        if pkernel == "compress_tma":  # one slab per program
            P, J = importlib.import_module("laser_triton.kernels.compress_tma").tma_programs(
                N, D, r, pcfg, 132), 1
        elif pkernel == "compress_fused":
            P, J = cp.fused_programs(N, D, r, {**cp.SPEC_FUSED.defaults, **pcfg}, 132)
        else:  # compress_y (compress_coeff alone writes no slabs: need_y=False)
            P, J = cp.y_segments(N, D, r, {**cp.SPEC_Y.defaults, **(
                pcfg if pkernel == "compress_y" else {})}, 132)[0], 1
        n_yblk, n_rb = cp.finish_grid(N, D, r, True, False)
        byt = P * D * r * 4 + (J + 1) * N * 4 + D * r * 4
        return dict(bytes=byt, flops=0, outer=n_yblk + n_rb, inner=max(_cdiv(P, 16), J))
    if kernel == "split_basis":
        return dict(bytes=D * r * 8, flops=0, outer=1, inner=1)
    if kernel == "reconstruct":
        return _reconstruct_work(N, D, r, dtype, cfg, coeff)
    raise KeyError(kernel)


def _reconstruct_work(N: int, D: int, r: int, dtype: str, cfg: dict, coeff: str) -> dict:
    """reconstruct (`kernels.reconstruct`): each program walks an equal run of the
    D-tile-major (D tile, row block) tiles, loading the basis tile of each D tile it touches
    once (`visits`) and C's rows once per row block: C crosses L2 once per D tile, the basis
    once per visit, X_hat is written once. Products: 2 MMAs with a bf16 C, 3 otherwise."""
    import importlib  # noqa: PLC0415

    from laser_triton.kernels._common import pow2  # noqa: PLC0415

    rc = importlib.import_module("laser_triton.kernels.reconstruct")
    xb, cb = _BYTES[dtype], _BYTES[coeff]
    ub = 4  # the basis: bf16 hi + lo halves, or fp32 U ("ieee")
    split = 1 if cfg.get("PRECISION") == "ieee" else 2 if coeff == "bf16" else 3
    n_rb, n_dt = _cdiv(N, cfg["BLOCK_N"]), _cdiv(D, cfg["BLOCK_D"])
    P, per = rc.programs(N, D, cfg, N_SMS)
    visits = sum((min((p + 1) * per, n_rb * n_dt) - 1) // n_rb - p * per // n_rb + 1
                 for p in range(P))
    loads = N * r * cb + D * r * ub
    return dict(bytes=loads + N * D * xb, load_bytes=loads,
                l2_bytes=N * D * xb + n_dt * N * r * cb + visits * min(cfg["BLOCK_D"], D) * r * ub,
                flops=2 * N * D * r * split, outer=visits, inner=n_rb * n_dt / visits,
                stages=cfg["num_stages"], stream=cfg["BLOCK_N"] * pow2(r) * cb)


def predict(facts, work: dict) -> dict:
    """Per-kernel estimate: the bounds and their max (seconds). `work` has bytes (HBM),
    l2_bytes (L2 -> SM, re-reads included), flops, programs (grid size), outer (outer-loop
    trips, all programs) and inner (inner-loop trips per outer trip).

    - memory: bytes / BW; l2: l2_bytes / L2_BW (assumed bandwidth);
    - tensor: the larger of flops / MMA rate and the tensor-pipe clocks of the SASS's HGMMA
      shapes (narrow N is bound by shared-memory operand reads: `_audit.wgmma_clocks`),
      counted per loop level like the issue slots and per warpgroup;
    - issue: warp instructions (SASS loop bodies x trips) / the SMs' issue rate;
    - latency: HBM bytes loaded (`load_bytes`, default all bytes) / (bytes the resident
      CTAs keep in flight / HBM_LATENCY_S), from `stream` (bytes one pipelined loop
      iteration loads) and `stages` (Little's law); stores are posted, no thread waits on
      them, so a kernel that mostly writes (reconstruct) is charged its loads only.
    """
    unit = "HGMMA" if facts.hgmma else "HMMA" if facts.hmma else "FFMA"
    t_mem = work["bytes"] / BW
    t_l2 = work.get("l2_bytes", work["bytes"]) / L2_BW
    # Instructions outside every loop run once per program; the outer loop's own body once
    # per outer trip; the inner body once per inner trip. Without an outer loop, each
    # program is one outer trip.
    once = max(facts.instructions - facts.loop_body - facts.outer_body, 0)
    per_outer = facts.outer_body + work["inner"] * facts.loop_body
    outer = work["outer"] if facts.outer_body else work["programs"]
    warp_instr = (work["programs"] * once + outer * per_outer) * facts.num_warps
    t_issue = warp_instr / ISSUE_RATE
    clk = (work["programs"] * facts.mma_clk_once
           + outer * (facts.mma_clk_outer + work["inner"] * facts.mma_clk_inner))
    t_shape = clk * max(facts.num_warps // 4, 1) / (N_SMS * MMA_CLOCK)
    t_mma = max(work["flops"] / MMA_RATE[unit], t_shape if unit == "HGMMA" else 0.0)
    if work.get("hmma_flops") and facts.hmma and unit == "HGMMA":
        # mma.sync products beside the wgmmas share the tensor pipe, at mma.sync's rate
        t_mma = max(t_mma, t_shape + work["hmma_flops"] / MMA_RATE["HMMA"])
    t_lat = 0.0
    if work.get("stream"):
        per_sm = max(1, min(65536 // (max(facts.regs, 1) * 32 * facts.num_warps),
                            232_448 // max(facts.shared, 1), 64 // facts.num_warps))
        resident = min(work["programs"], N_SMS * per_sm)
        in_flight = resident * max(work["stages"] - 1, 1) * work["stream"]
        t_lat = work.get("load_bytes", work["bytes"]) * HBM_LATENCY_S / in_flight
    bounds = ((t_mem, "memory"), (t_l2, "L2"), (t_mma, "tensor"), (t_issue, "issue"),
              (t_lat, "latency"))
    return dict(t_mem=t_mem, t_l2=t_l2, t_mma=t_mma, t_issue=t_issue, t_lat=t_lat, unit=unit,
                t=max(b for b, _ in bounds), bound=max(bounds)[1])


def roofline(op: str, N: int, D: int, r: int, dtype: str, coeff: str = "bf16") -> float:
    """The op's floor: one read of X (or C) and the outputs at full bandwidth, and the MMA
    flops the fp32-class split needs at the full HGMMA rate (reconstruct: C, stored as
    `coeff`, times the basis halves: 2 MMAs for a bf16 C, 3 otherwise)."""
    xb, split = _BYTES[dtype], 2 if dtype == "bf16" else 3
    if op == "compress_pass":
        byt = N * D * xb + N * r * xb + D * r * 4
        flops = 4 * N * D * r * split
    else:
        byt = N * r * _BYTES[coeff] + N * D * xb
        flops = 2 * N * D * r * (2 if coeff == "bf16" else 3)
    return max(byt / BW, flops / MMA_RATE["HGMMA"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="laser-triton bench audit", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audit")
    p.add_argument("--full", action="store_true", help="every TRM (D, r), not the quick set")
    p.add_argument("--shapes", nargs="+", default=None, metavar="D:r",
                   help="audit these (D, r) instead")
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(_BYTES))
    p.add_argument("--coeff", default="bf16", choices=sorted(_BYTES),
                   help="dtype of the stored coefficients C (LaserConfig.coeff_dtype)")
    p.add_argument("--cached", action="store_true", help="reuse Triton's compile cache")
    p.add_argument("--label", default="", help="a column naming this run (e.g. 'before')")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS,
                   help="ops to audit (orthonormalize: perf/audit_orth.py, fp32 bases, one "
                        "site per shape and 32 sites of 512 x 64)")
    args = p.parse_args(argv)
    saved = os.environ.get("TRITON_CACHE_DIR")
    if not args.cached:  # measure real compile times: an empty cache for this run
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="laser_audit_")
    try:
        return _run(args)
    finally:  # a caller's environment (tests) is left as it was
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved


def op_steps(store, op: str, N: int, D: int, r: int, dtype: str, coeff: str = "bf16",
             basis_split: bool = False) -> list[tuple[str, dict, dict]]:
    """(kernel, config, flags) of every launch of `op` ("compress_pass" or "reconstruct") at
    (N, D, r, dtype, C stored as `coeff`) with `store`'s configs: the launchers' own plans.
    basis_split: U's bf16 halves exist already (`kernels._basis` keeps them while U lives:
    every reconstruct with a basis but the first), so reconstruct launches no split."""
    import importlib  # noqa: PLC0415

    if op == "compress_pass":
        return _compress_module().launch_plan(store, N, D, r, dtype, coeff=coeff)
    if op != "reconstruct":
        raise KeyError(f"op_steps: {op!r} is not compress_pass or reconstruct")
    basis = importlib.import_module("laser_triton.kernels._basis")
    rec = store.lookup("reconstruct", D, r, dtype, N, coeff)
    split = rec["PRECISION"] != "ieee" and not basis_split
    return ([("split_basis", dict(basis.CONFIG), {})] if split else []) \
        + [("reconstruct", rec, {})]


def model_op(store, op: str, N: int, D: int, r: int, dtype: str, coeff: str = "bf16",
             label: str = "", verbose: bool = True, basis_split: bool = False) -> dict:
    """The audit and the model of one op at any (N, D, r, dtype, coeff): each launch of
    `op_steps` (`basis_split`: see there) compiled for sm_90 at that shape's
    specialization and predicted.

    Returns {"row": the model.csv row (times rounded), "facts": audit.csv rows, "failures":
    launches that fail the budget, "t" and "roofline": the op's predicted and roofline
    seconds, "parts": per launch {kernel, t, bound, t_mem, t_l2, t_mma, t_issue, t_lat}
    (seconds), "launch_gaps": seconds of launch gaps (included in "t")}."""
    from laser_triton.kernels._audit import audit, check  # noqa: PLC0415

    steps = op_steps(store, op, N, D, r, dtype, coeff, basis_split)
    # the kernel whose per-program Y slabs compress_finish reduces: the last product launch
    producer = steps[-2][:2] if len(steps) > 1 else None
    total, parts, facts_rows, failures = 0.0, [], [], 0
    for kernel, cfg, flags in steps:
        f = audit(kernel, D, r, dtype, cfg, N=N, flags=flags, coeff=coeff)
        bad = check(f)
        failures += bool(bad)
        pred = predict(f, kernel_work(kernel, N, D, r, dtype, cfg, producer=producer,
                                      coeff=coeff))
        total += pred["t"]
        parts.append({"kernel": kernel, **{k: v for k, v in pred.items() if k != "unit"}})
        facts_rows.append({"label": label, "op": op, "D": D, "r": r, "dtype": dtype, **f.row(),
                           "mma_unit": pred["unit"], "problems": "; ".join(bad),
                           "coeff": coeff})
        if verbose:
            print(f"{op:13s} D={D:<4d} r={r:<3d} {dtype} {kernel:15s} regs {f.regs:3d} "
                  f"spill {f.spill_ops + f.stack + f.local:3d} smem {f.shared:6d} "
                  f"HMMA {f.hmma:3d} HGMMA {f.hgmma:3d} FFMA {f.ffma:5d} "
                  f"{f.compile_s:5.1f} CPU s {'; '.join(bad) or 'ok'}", flush=True)
    gaps = LAUNCH_S * (len(steps) - 1)
    total += gaps
    roof = roofline(op, N, D, r, dtype, coeff)
    row = {"label": label, "op": op, "D": D, "r": r, "dtype": dtype, "N": N,
           "predicted_us": round(total * 1e6, 1), "roofline_us": round(roof * 1e6, 1),
           "predicted_fraction": round(roof / total, 3),
           "goal_fraction": GOAL if op == "compress_pass" else "",
           "kernels": " + ".join(f"{p['kernel']}:{p['t'] * 1e6:.1f}us/{p['bound']}"
                                 for p in parts),
           "kind": "estimate (static model, not timed)", "coeff": coeff}
    return {"row": row, "facts": facts_rows, "failures": failures, "t": total, "roofline": roof,
            "parts": parts, "launch_gaps": gaps}


def _run(args: argparse.Namespace) -> int:
    """The audit and the model for `args` (see the module docstring). Under
    TRITON_INTERPRET=1 the compiles run in a clean child process (`kernels._hopper`)."""
    from laser_triton.kernels._audit import audit, check  # noqa: PLC0415
    from laser_triton.kernels.configs import ConfigStore  # noqa: PLC0415

    store = ConfigStore("NVIDIA H200", interpreter=False)
    shapes = [(D, r) for D in TRM_D for r in TRM_R if r <= D] if args.full else QUICK
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes]
    args.out.mkdir(parents=True, exist_ok=True)
    facts_rows, model_rows, failures = [], [], 0
    for dtype in args.dtypes:
        for D, r in shapes:
            for op in ("compress_pass", "reconstruct"):
                if op not in args.ops:
                    continue
                m = model_op(store, op, N_ROWS, D, r, dtype, args.coeff, args.label)
                facts_rows += m["facts"]
                model_rows.append(m["row"])
                failures += m["failures"]
    if "orthonormalize" in args.ops:  # fp32 bases: once per shape, whatever the dtypes
        orth = _orth_module()
        calls = [(D, r, 1) for D, r in shapes] + [(512, 64, 32)] * ((512, 64) in shapes)
        for D, r, sites in calls:
            rows, model, bad = orth.audit_call(store, D, r, sites, args.label, audit, check)
            facts_rows += rows
            model_rows.append(model)
            failures += bad
    for name, rows in (("audit.csv", facts_rows), ("model.csv", model_rows)):
        fields = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
        with open(args.out / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(rows)
    print(f"audit: {len(facts_rows)} kernel variants, {failures} failing; wrote "
          f"{args.out / 'audit.csv'} and {args.out / 'model.csv'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
