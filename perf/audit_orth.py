"""The orthonormalization part of `laser-triton bench audit`: the launches of one
`orthonormalize_batched` call at TRM ranks, their sm_90 facts, and an ESTIMATE of its H200 time.

The compress model (perf/audit.py) is throughput-bound: thousands of programs fill the GPU.
Orthonormalization is latency-bound: the factor runs one program (4 warps) per site, so its
time is the length of that program's instruction stream, not bytes or flops. Per launch:
    t = max(HBM bytes / 4.25 TB/s, L2 -> SM bytes / 7 TB/s (assumed, as in perf/audit.py),
            fp64 tensor-core flops / (67 TFLOP/s x SMs used / 132),
            warp instructions of all programs / issue rate of 132 SMs,
            (warp instructions of one program x CPI + its scratch round trips x 260 cycles)
              / 1.98 GHz)
with CPI = 1.5 cycles per instruction of one warp's dependent fp64 / shuffle chains (an assumed
figure, not measured; Hopper fp64 FMA latency ~8 cycles and shuffles ~25 overlap with the other
instructions of a 4-column pivot block). One program's instructions come from the SASS loop
structure (`kernels._audit`: instructions outside loops, outer-loop bodies, innermost bodies)
and the trip counts of the algorithm below. Per call: the sum plus 2 us per extra launch.
Goals (issue 12): <= 25 us for one site of r <= 64, <= 60 us at r = 128, <= 60 us for 32
sites of 512 x 64 together.
"""

from __future__ import annotations

CLOCK = 1.98e9
CPI = 1.5  # assumed, see the module docstring
# ASSUMED: a barrier that orders a program's global stores before its loads of them (the
# factor's scratch round trips) waits for the stores and the dependent loads: counted at an
# L2 hit's latency, the conservative case (an L1 hit would be ~40 cycles).
ROUND_TRIP_CYCLES = 260
FP64_MMA = 67e12  # H200 fp64 tensor-core flop/s (DMMA), whole GPU
SMS = 132
ISSUE_RATE = SMS * 4 * CLOCK
BW = 4.25e12
L2_BW = 7.0e12  # ASSUMED (perf/audit.py's L2_BW): the Gram's column blocks re-read per tile
LAUNCH_S = 2e-6
PB = 16  # the factor's panel height (kernels._cholesky.PANEL)


def goal_s(D: int, r: int, sites: int) -> float | None:
    """Issue 12's goal for this call, or None where it sets none."""
    if sites == 32 and (D, r) == (512, 64):
        return 60e-6
    if sites == 1:
        return 25e-6 if r <= 64 else 60e-6
    return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    from laser_triton.kernels._common import pow2  # noqa: PLC0415

    return pow2(n)


def _chunk_rows(gram_cfg: dict, D: int, sites: int) -> int:
    import importlib  # noqa: PLC0415

    return importlib.import_module("laser_triton.kernels.orthonormalize").chunk_rows(
        gram_cfg, D, sites)


def orth_steps(store, D: int, r: int) -> list[tuple[str, dict, dict]]:
    """(kernel, config, flags) of every launch of one call, in order (the launcher's plan)."""
    import importlib  # noqa: PLC0415

    return importlib.import_module("laser_triton.kernels.orthonormalize").launch_plan(store, D, r)


def _left_looking_trips(n_pan: int) -> float:
    """tl.dot loop trips of the factor per panel (KC = CB = PB): panel k runs k chunks for
    its diagonal block, k per block right of it, and k - b for L^{-1}'s column block b < k."""
    total = sum(k + k * (n_pan - k - 1) + k * (k + 1) // 2 for k in range(n_pan))
    return total / max(n_pan, 1)


def orth_work(kernel: str, flags: dict, cfg: dict, D: int, r: int, sites: int,
              rows_per_chunk: int) -> dict:
    """bytes, fp64 flops, programs, and per program: outer trips and inner trips per outer,
    and the chunk partials its last program sums."""
    R_PAD = _pow2(r)
    rows = min(D, rows_per_chunk)  # every kernel of a call uses the Gram config's chunks
    n_chunk = _cdiv(D, rows_per_chunk)
    if kernel == "orth_gram":
        nt = R_PAD // cfg["GRAM_TILE"]
        z = flags.get("WITH_Z", True)
        parts = sites * n_chunk * R_PAD * R_PAD * 8 * (2 if z else 1) * 2  # written, summed
        # HBM: A and Z once; L2 -> SM: every (ci, cj) tile program reads its two column
        # blocks of A (and ci's of Z), so each column block NT times over.
        byt = sites * D * R_PAD * (4 + (8 if z else 0)) + parts
        l2 = sites * D * R_PAD * (8 + (8 if z else 0)) * nt + parts
        flops = 2 * sites * D * R_PAD * R_PAD * (2 if z else 1)
        return dict(bytes=byt, l2_bytes=l2, flops=flops, programs=sites * n_chunk * nt * nt,
                    outer=1,
                    inner=_cdiv(rows, cfg["BLOCK_D"]), chunks=n_chunk)
    if kernel == "orth_apply":
        byt = sites * D * r * (4 + 4 + (8 if flags.get("REPAIR") else 0)) \
            + sites * n_chunk * R_PAD * R_PAD * 8 * 2
        flops = 2 * sites * D * R_PAD * (r + (R_PAD if R_PAD <= 64 else 0))
        return dict(bytes=byt, flops=flops, programs=sites * n_chunk,
                    outer=_cdiv(rows, cfg["BLOCK_D"]), inner=_cdiv(r, min(R_PAD, 32)),
                    chunks=n_chunk)
    if kernel == "orth_factor":
        byt = sites * R_PAD * R_PAD * 8 * 6  # the summed Grams, ZZ, scratch, R, L^{-1}
        n_pan = _cdiv(r, PB)
        cb, mb = min(cfg["CB"], R_PAD), min(32, R_PAD)  # L^{-1} blocks; the mixed Gram's tiles
        mix = sum(_cdiv(n_pan * PB - k * PB // mb * mb, mb) for k in range(n_pan)) \
            if flags.get("MODE") == "repair" else 0  # tiles at or right of the diagonal
        zero = sum((R_PAD - (k + 1) * PB) // cb for k in range(n_pan)) \
            + (R_PAD // PB - n_pan) * (R_PAD // cb)  # L^{-1} blocks right of / below the factor
        return dict(bytes=byt, flops=2 * sites * R_PAD ** 3, programs=sites, outer=n_pan,
                    dot_trips=_left_looking_trips(n_pan) * n_pan, mix_trips=mix,
                    zero_trips=zero)
    raise KeyError(kernel)


def loop_bodies(cubin: bytes) -> list[tuple[int, int, int, int]]:
    """(instructions, DMMA, BAR, LDG) of each innermost loop body of a cubin's SASS (a
    backward branch closes a body; innermost: containing no other)."""
    from laser_triton.kernels._audit import disassemble, loop_structure  # noqa: PLC0415

    ops, _, inner = loop_structure(disassemble(cubin)[1])
    return [tuple(sum(lo <= a <= hi and (want is None or op == want) for a, op, _, _ in ops)
                  for want in (None, "DMMA", "BAR", "LDG")) for lo, hi in inner]


def store_barriers(cubin: bytes) -> int:
    """Barriers in the factor's outer loop bodies (the panel loop; innermost bodies excluded)
    with a global store since the previous barrier: scratch round trips, once per panel."""
    from laser_triton.kernels._audit import disassemble, loop_structure  # noqa: PLC0415

    ops, bodies, inner = loop_structure(disassemble(cubin)[1])
    outer = [b for b in bodies if b not in inner]
    count, stored = 0, False
    for a, op, _, _ in ops:
        if not any(lo <= a <= hi for lo, hi in outer) or any(lo <= a <= hi for lo, hi in inner):
            continue
        if op == "STG":
            stored = True
        elif op == "BAR":
            count += stored
            stored = False
    return count


def column_loops(cubin: bytes) -> tuple[int, int] | None:
    """Own instructions (their tl.dot loops excluded) of the factor's two column-block loops
    in a panel (R's blocks right of the diagonal, then L^{-1}'s): the children of the panel
    loop that hold a DMMA loop, in address order. None when ptxas's loops do not nest."""
    from laser_triton.kernels._audit import disassemble, loop_structure  # noqa: PLC0415

    ops, bodies, _ = loop_structure(disassemble(cubin)[1])
    bodies = sorted(set(bodies))
    if any(a[0] < b[0] <= a[1] < b[1] for a in bodies for b in bodies):
        return None  # overlapping, not nested

    def kids(b):
        inside = [o for o in bodies if o != b and b[0] <= o[0] and o[1] <= b[1]]
        return [o for o in inside if not any(p != o and p[0] <= o[0] and o[1] <= p[1]
                                             for p in inside)]

    def has_dmma(b):
        return any(b[0] <= a <= b[1] and op == "DMMA" for a, op, _, _ in ops)
    for panel in bodies:
        col = [k for k in kids(panel) if any(has_dmma(g) for g in kids(k))]
        if len(col) == 2:
            return tuple(sum(lo <= a <= hi and not any(g[0] <= a <= g[1] for g in kids((lo, hi)))
                             for a, _, _, _ in ops) for lo, hi in col)
    return None


def _factor_program(facts, work: dict, bodies: list[tuple[int, int, int, int]]) -> float:
    """Warp instructions of one factor program: the straight code once, the code of the
    outer loops (the panel loop with its unrolled 16-column diagonal-block factor) once per
    panel, the tl.dot loops (the bodies with DMMA)
    for the left-looking trips, the mixed Gram's tile loop (no DMMA, loads) per tile at or
    right of the diagonal, the zero fills of L^{-1} (no DMMA, no loads) per 16 x CB block.
    The two column-block loops around the tl.dot loops (R's blocks right of the diagonal,
    L^{-1}'s up to it) run n(n-1)/2 and n(n+1)/2 times in all, not once per panel: their
    own instructions are charged so where the loops nest (`column_loops`)."""
    once = max(facts.instructions - facts.loop_body - facts.outer_body, 0)
    dots = [n for n, dmma, _, _ in bodies if dmma]
    mix = sum(n for n, dmma, _, ldg in bodies if not dmma and ldg)
    zeros = [n for n, dmma, _, ldg in bodies if not dmma and not ldg]
    dot_avg = sum(dots) / len(dots) if dots else 0.0
    zero_avg = sum(zeros) / len(zeros) if zeros else 0.0
    n = work["outer"]
    right, left = work.get("column_loops") or (0, 0)
    columns = right * (n * (n - 1) // 2 - n) + left * (n * (n + 1) // 2 - n)
    return (once + n * facts.outer_body + columns + work["dot_trips"] * dot_avg
            + work["mix_trips"] * mix + work["zero_trips"] * zero_avg)


def predict_orth(facts, work: dict, bodies: list | None = None) -> dict:
    """The five bounds of one launch (seconds) and their max."""
    stall = 0.0  # cycles one program waits on scratch round trips
    if "dot_trips" in work and bodies is not None:
        program = _factor_program(facts, work, bodies)
        stall = work["outer"] * work.get("round_trips", 0) * ROUND_TRIP_CYCLES
    else:  # Gram / apply: the row loop with its tl.dot loops, then the last program's sums
        once = max(facts.instructions - facts.loop_body - facts.outer_body, 0)
        dots = sum(n for n, dmma, _, _ in bodies if dmma) if bodies else facts.loop_body
        sums = sum(n for n, dmma, _, _ in bodies if not dmma) if bodies else 0
        program = once + work["outer"] * (facts.outer_body + work["inner"] * dots) \
            + (work.get("chunks", 1) - 1) * sums
    t_mem = work["bytes"] / BW
    t_l2 = work.get("l2_bytes", 0) / L2_BW
    t_mma = work["flops"] / (FP64_MMA * min(work["programs"], SMS) / SMS)
    t_issue = work["programs"] * program * facts.num_warps / ISSUE_RATE
    t_program = (program * CPI + stall) / CLOCK
    bounds = ((t_mem, "memory"), (t_l2, "L2"), (t_mma, "fp64 tensor"), (t_issue, "issue"),
              (t_program, "one program"))
    t, bound = max(bounds)
    return dict(t=t, bound=bound, program_instr=program)


def audit_call(store, D: int, r: int, sites: int, label: str, audit, check) -> tuple:
    """(audit rows, model row, failures) of one orthonormalize_batched call of `sites` sites
    of (D, r)."""
    from laser_triton.kernels._hopper import compile_info  # noqa: PLC0415

    rows, total, parts, failures = [], 0.0, [], 0
    steps = orth_steps(store, D, r)
    for kernel, cfg, flags in steps:
        f = audit(kernel, D, r, "fp32", cfg, flags=flags)
        bad = check(f)
        failures += bool(bad)
        bodies = loop_bodies(compile_info(kernel, D, r, "fp32", cfg, flags=flags)["cubin"])
        work = orth_work(kernel, flags, cfg, D, r, sites, _chunk_rows(steps[0][1], D, sites))
        if kernel == "orth_factor":
            cubin = compile_info(kernel, D, r, "fp32", cfg, flags=flags)["cubin"]
            work["round_trips"] = store_barriers(cubin)
            work["column_loops"] = column_loops(cubin)
        pred = predict_orth(f, work, bodies)
        total += pred["t"]
        parts.append(f"{kernel}({','.join(f'{k}={v}' for k, v in flags.items())}):"
                     f"{pred['t'] * 1e6:.1f}us/{pred['bound']}")
        if sites == 1:
            rows.append({"label": label, "op": "orthonormalize", "D": D, "r": r,
                         "dtype": "fp32", **f.row(), "mma_unit": "DMMA" if f.dmma else "FFMA",
                         "problems": "; ".join(bad)})
            print(f"orthonormalize D={D:<4d} r={r:<3d} {kernel:12s} {flags} regs {f.regs:3d} "
                  f"spill {f.spill_ops + f.stack + f.local:3d} smem {f.shared:6d} "
                  f"DMMA {f.dmma:3d} {f.compile_s:5.1f} CPU s {'; '.join(bad) or 'ok'}",
                  flush=True)
    total += LAUNCH_S * (len(steps) - 1)
    goal = goal_s(D, r, sites)
    model = {"label": label, "op": "orthonormalize" if sites == 1 else f"orthonormalize x{sites}",
             "D": D, "r": r, "dtype": "fp32", "N": sites, "predicted_us": round(total * 1e6, 1),
             "roofline_us": "", "predicted_fraction": "", "goal_fraction": "",
             "goal_us": "" if goal is None else round(goal * 1e6, 1),
             "kernels": " + ".join(parts), "kind": "estimate (static model, not timed)"}
    return rows, model, failures
