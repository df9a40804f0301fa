"""orthonormalize: QR-free orthonormal bases by CholeskyQR2 (docs/design.md §2.6, §6.2), batched over sites.

Math (per site, Y is D x r): scale columns to unit norm, complete zero / non-finite /
numerically dependent columns with fixed random directions Z (the reference's
completion_matrix), then twice: G = M^T M in fp64, R = chol(G) and R^{-1} in fp64 (one program
per site, _cholesky.py), M <- M R^{-1} as an fp64 product stored in fp32.

The apply is fp64, not fp32 (docs/design.md §9 has the alternatives). Measured in torch before writing this
(D = 96..4096, r = 16..128, kappa(Y) up to 1e8; max |Q^T Q - I| / span residual):
  fp32 product with an fp32 R^{-1}   1e-7 / up to 1e-5  (loses span: fails the 1e-5 bar)
  fp32 forward substitution          2e-7 / 2e-7        (r dependent steps per row block)
  fp64 product (this)                3e-8 / 4e-8        (matches the reference to ~1e-8)
The fp64 product is a GEMM on sm_90's fp64 tensor cores (D r^2 flops per pass).

Launches (5, none synchronizes with the host), each over all sites at once:
  gram(A, Z)  -> factor("repair") -> apply(M -> Q1, Gram of Q1)
              -> factor("plain")  -> apply(Q1 -> Q, Gram of Q, and ok from it)
Sites are packed into one flat buffer with a table of (offset, D, r), so bases of different
shapes share each launch; rows are split into chunks whose partial Grams are summed in a fixed
order (deterministic). Newton-Schulz is not implemented: docs/design.md §9 records why it lost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton

from ..numerics import completion_matrix
from ..util import to_device_async
from ..validation import check_orthonormalize
from ._cholesky import PANEL, _orth_factor_kernel
from ._common import capturing, launch, new_buffer, pow2, shrink_config, ticket_counters
from ._orth_kernels import _orth_apply_kernel, _orth_gram_kernel
from ._spec import KernelSpec, Shape, declare
from .configs import get_store

__all__ = ["orthonormalize", "orthonormalize_batched", "completion_matrix", "orth_launches",
           "launch_plan"]

# Each site's rows are split into up to ORTH_CHUNKS chunks (each one program of the Gram and
# apply kernels; the last sums the partials), fewer when the sites alone give about
# PROGRAMS programs (one per SM of a 132-SM GPU): one site runs 8 short programs instead of
# two long ones, many sites keep the partial Grams few. ROWS_PER_CHUNK caps a chunk.
ORTH_CHUNKS = 8
PROGRAMS = 128
CHUNK_ALIGN = 64  # rows per chunk are a multiple (every BLOCK_D the configs use divides it)


def chunk_rows(gram_cfg: dict, D: int, sites: int = 1) -> int:
    """Rows per chunk of a call of `sites` sites whose widest is D (shared by the Gram and
    apply kernels): D / min(ORTH_CHUNKS, PROGRAMS / sites) rounded up to a multiple of
    CHUNK_ALIGN, at most ROWS_PER_CHUNK."""
    chunks = min(ORTH_CHUNKS, max(PROGRAMS // sites, 1))
    rows = triton.cdiv(triton.cdiv(D, chunks), CHUNK_ALIGN) * CHUNK_ALIGN
    return max(min(rows, gram_cfg["ROWS_PER_CHUNK"]), min(CHUNK_ALIGN, gram_cfg["ROWS_PER_CHUNK"]))


# The apply kernel forms dst^T dst itself up to this padded rank (an R_PAD x R_PAD fp64
# register tile; at 128 it spills on sm_90); beyond, the Gram kernel runs on dst (+1 launch).
APPLY_GRAM_MAX = 64


# Mode flags each kernel runs with in some call (launch_plan); the autotune prune compiles all.
MODE_VARIANTS = {"orth_gram": ({"WITH_Z": True, "CHECK": False},
                              {"WITH_Z": False, "CHECK": False},
                              {"WITH_Z": False, "CHECK": True}),
                 "orth_factor": ({"MODE": "repair"}, {"MODE": "plain"}),
                 "orth_apply": ({"REPAIR": True, "CHECK": False},
                               {"REPAIR": False, "CHECK": True},
                               {"REPAIR": False, "CHECK": False})}  # the last: padded rank 128
def chunk_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n zeroed int32 counters for this device and current stream: the last chunk
    program of each (site, tile) finds itself by one and resets it to 0, so the buffer is
    reused by every launch on the stream without a memset (`_common.ticket_counters`: a
    fresh one under CUDA-graph capture)."""
    return ticket_counters(device, n, "orthonormalize")


def launch_plan(store, D: int, r: int) -> list[tuple[str, dict, dict]]:
    """(kernel, config, mode flags) of every launch of one call whose widest site is D and
    largest rank r, in order: what the launcher runs (the static audit compiles these)."""
    R_PAD = pow2(r)
    gram = store.lookup("orth_gram", D, R_PAD, "fp32")
    gram = {**gram, "GRAM_TILE": min(gram["GRAM_TILE"], R_PAD)}
    fac = store.lookup("orth_factor", D, R_PAD, "fp32")
    app = store.lookup("orth_apply", D, R_PAD, "fp32")
    fused = R_PAD <= APPLY_GRAM_MAX  # the apply forms its output's Gram (and the final ok)
    return ([("orth_gram", gram, {"WITH_Z": True, "CHECK": False}),
             ("orth_factor", fac, {"MODE": "repair"}),
             ("orth_apply", app, {"REPAIR": True, "CHECK": False})]
            + ([] if fused else [("orth_gram", gram, {"WITH_Z": False, "CHECK": False})])
            + [("orth_factor", fac, {"MODE": "plain"}),
               ("orth_apply", app, {"REPAIR": False, "CHECK": fused})]
            + ([] if fused else [("orth_gram", gram, {"WITH_Z": False, "CHECK": True})]))


def orth_launches(r_max: int, packed: bool) -> int:
    """Kernel launches of one orthonormalize_batched call whose largest rank is r_max:
    gram, 2 factor steps, 2 applies (+ 2 Gram launches when the padded rank exceeds
    APPLY_GRAM_MAX), plus one cat unless the input is one contiguous fp32 basis; `ok` is
    decided by the last program summing the final Gram, without a launch of its own."""
    return 5 + (2 if pow2(r_max) > APPLY_GRAM_MAX else 0) + (0 if packed else 1)


# ----------------------------------------------------------------------------- launcher

class _Plan:
    """Per shape set: the site table, packed Z and padded Z^T Z, on the device (cached)."""

    def __init__(self, shapes: tuple[tuple[int, int], ...], device: torch.device,
                 Zs: Sequence[torch.Tensor] | None) -> None:
        offsets, o = [], 0
        for D, r in shapes:
            offsets.append(o)
            o += D * r
        self.total = o
        self.offsets = offsets
        self.R_PAD = pow2(max(r for _, r in shapes))
        self.max_D = max(D for D, _ in shapes)
        self.meta = to_device_async(torch.tensor([[off, D, r] for off, (D, r) in zip(offsets, shapes)],
                                           dtype=torch.int64), device)
        if Zs is None:
            Zs = [completion_matrix(D, r, device) for D, r in shapes]
        Zs = [z.to(device=device, dtype=torch.float64) for z in Zs]
        self.Z = torch.cat([z.reshape(-1) for z in Zs])
        self.ZZ = torch.zeros(len(shapes), self.R_PAD, self.R_PAD, dtype=torch.float64,
                              device=device)
        for i, z in enumerate(Zs):
            self.ZZ[i, : z.shape[1], : z.shape[1]] = z.t() @ z


_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
MIN_GRAM_TILE = 16  # the smallest Gram tile (tl.dot's minimum) a shrink may reach


def _plan(shapes: tuple[tuple[int, int], ...], device: torch.device,
          Zs: Sequence[torch.Tensor] | None) -> _Plan:
    key = (shapes, str(device))
    plan = _PLANS.get(key) if Zs is None else None
    if plan is None and capturing(device):
        # A plan's tables go up through pinned host copies: captured, they would become graph
        # nodes reading host blocks the caching allocator reuses after capture.
        raise RuntimeError(
            "orthonormalize_batched: these site shapes are seen for the first time inside "
            f"CUDA-graph capture ({list(shapes)}); call it once with the same shapes (and the "
            "default completion directions) before capturing: that builds and caches the plan")
    if Zs is not None:
        return _Plan(shapes, device, Zs)
    if plan is None:
        plan = _PLANS[key] = _Plan(shapes, device, None)
        if len(_PLANS) > 64:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return plan


def orthonormalize_batched(
    Ys: Sequence[torch.Tensor], Zs: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Orthonormal fp32 bases of span(Y_i) for D_i x r_i inputs (r_i <= D_i), in 5 launches
    (7 when the padded rank exceeds APPLY_GRAM_MAX).

    Returns the list of Q_i (views into one packed buffer) and a bool tensor `ok` per input.
    `Zs` overrides the completion directions (default: `completion_matrix`).
    """
    if len(Ys) == 0:
        return [], torch.zeros(0, dtype=torch.bool)
    check_orthonormalize(Ys)
    device = Ys[0].device
    shapes = tuple((int(Y.shape[0]), int(Y.shape[1])) for Y in Ys)
    plan = _plan(shapes, device, Zs)
    R_PAD, S = plan.R_PAD, len(Ys)
    if S == 1 and Ys[0].dtype == torch.float32 and Ys[0].is_contiguous():
        A = Ys[0].reshape(-1)  # read only
    else:
        A = torch.cat([Y.reshape(-1).float() for Y in Ys])
    store = get_store(device)
    gram_cfg = store.lookup("orth_gram", plan.max_D, R_PAD, "fp32")
    gram_cfg = {**gram_cfg, "GRAM_TILE": min(gram_cfg["GRAM_TILE"], R_PAD)}
    fac_cfg = store.lookup("orth_factor", plan.max_D, R_PAD, "fp32")
    app_cfg = store.lookup("orth_apply", plan.max_D, R_PAD, "fp32")
    rows_per_chunk = chunk_rows(gram_cfg, plan.max_D, S)
    n_chunk = triton.cdiv(plan.max_D, rows_per_chunk)

    f64 = torch.float64
    g_part = new_buffer((S, n_chunk, R_PAD, R_PAD), f64, device)
    za_part = new_buffer((S, n_chunk, R_PAD, R_PAD), f64, device)
    nf_part = new_buffer((S, n_chunk, R_PAD), torch.float32, device)
    Linv = new_buffer((S, R_PAD, R_PAD), f64, device)  # R^{-T} of the current pass
    gram_s = new_buffer((S, R_PAD, R_PAD), f64, device)  # factor scratch: the mixed Gram
    r_rows = new_buffer((S, R_PAD, R_PAD), f64, device)
    r_diag = new_buffer((S, R_PAD), f64, device)
    scale = new_buffer((S, R_PAD), f64, device)
    info = new_buffer((S, 2), torch.int32, device)
    ok = new_buffer((S,), torch.bool, device)  # poisoned as True: the check must write it
    # Sized for the smallest Gram tile an out-of-resources shrink can reach (16): the launch
    # that runs may halve GRAM_TILE, and its per-tile slots and site tickets must still fit.
    n_tiles = (R_PAD // MIN_GRAM_TILE) ** 2
    tile_err = new_buffer((S, n_tiles), f64, device)  # the final Gram's max |G - I| per tile
    Q1 = new_buffer((plan.total,), torch.float32, device)
    Q = new_buffer((plan.total,), torch.float32, device)
    counts = chunk_counters(device, S * (n_tiles + 1))  # per (site, tile), then per site

    def run_gram(cfg: dict, src: torch.Tensor = A, with_z: bool = True,
                 check: bool = False) -> None:
        n_tiles = (R_PAD // cfg["GRAM_TILE"]) ** 2
        _orth_gram_kernel[(S, n_chunk, n_tiles)](
            src, plan.Z, plan.meta, g_part, za_part, nf_part, counts, info, ok, tile_err,
            rows_per_chunk, WITH_Z=with_z, CHECK=check,
            R_PAD=R_PAD, GT=cfg["GRAM_TILE"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    def factor(mode: str) -> None:
        _orth_factor_kernel[(S,)](g_part, za_part, plan.ZZ, nf_part, plan.meta, Linv, scale, info,
                                  gram_s, r_rows, r_diag, n_chunk, MODE=mode, R_PAD=R_PAD,
                                  **factor_blocks(fac_cfg, R_PAD))

    def apply(src: torch.Tensor, dst: torch.Tensor, repair: bool) -> None:
        def run(cfg: dict) -> None:
            _orth_apply_kernel[(S, n_chunk)](src, plan.Z, plan.meta, Linv, scale, dst, g_part,
                                             counts, info, ok, rows_per_chunk, REPAIR=repair,
                                             R_PAD=R_PAD, BLOCK_K=min(R_PAD, 32),
                                             WITH_GRAM=fused_gram,
                                             CHECK=fused_gram and not repair, **cfg)
        ran, _ = launch("orth_apply", run, app_cfg, lambda c: shrink_config(c, ("BLOCK_D",)))
        store.remember("orth_apply", plan.max_D, R_PAD, "fp32", None, ran)
        if not fused_gram:  # dst^T dst by the (tiled, spill-free) Gram kernel
            run_gram(gram_cfg, dst, with_z=False, check=not repair)

    ran, _ = launch("orth_gram", run_gram, gram_cfg,
                    lambda c: shrink_config(c, ("BLOCK_D", "GRAM_TILE"), MIN_GRAM_TILE))
    store.remember("orth_gram", plan.max_D, R_PAD, "fp32", None, ran)
    gram_cfg = ran
    fused_gram = R_PAD <= APPLY_GRAM_MAX
    factor("repair")            # R1 of the scaled, completed M
    apply(A, Q1, repair=True)   # Q1 = M R1^{-1}, and Q1^T Q1
    factor("plain")             # R2 = chol(Q1^T Q1)
    apply(Q1, Q, repair=False)  # Q = Q1 R2^{-1}, Q^T Q and ok
    Qs = [Q[o: o + D * r].view(D, r) for o, (D, r) in zip(plan.offsets, shapes)]
    return Qs, ok


def orthonormalize(Y: torch.Tensor, Z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal fp32 basis of span(Y) (D x r, r <= D) and a device bool scalar `ok`."""
    check_orthonormalize([Y], ["Y"])
    Qs, ok = orthonormalize_batched([Y], None if Z is None else [Z])
    return Qs[0], ok[0]


# ----------------------------------------------------------------------------- declarations
# Shapes here are one site (D, r) of an fp32 basis; the store keys on (D, padded r, fp32).


def _orth_key(shape: Shape) -> tuple[int, int, str]:
    return shape.D, pow2(shape.r), "fp32"


def _rows_per_chunk(D: int) -> int:
    return chunk_rows(SPEC_GRAM.defaults, D)


def _gram_signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    R_PAD = pow2(shape.r)
    runtime = dict(a_ptr="*fp32", z_ptr="*fp64", meta_ptr="*i64", g_ptr="*fp64", za_ptr="*fp64",
                   nf_ptr="*fp32", count_ptr="*i32", info_ptr="*i32", ok_ptr="*i1",
                   err_ptr="*fp64", rows_per_chunk=chunk_rows(cfg, shape.D))
    return runtime, dict(WITH_Z=True, R_PAD=R_PAD, GT=min(cfg["GRAM_TILE"], R_PAD),
                         BLOCK_D=cfg["BLOCK_D"], CHECK=False)


def factor_blocks(cfg: dict, R_PAD: int) -> dict:
    """The factor kernel's block constexprs and options for a padded rank: the panel height
    PB (16), row chunks KC and column blocks CB of the left-looking updates (at most R_PAD)."""
    return dict(PB=PANEL, KC=min(cfg["KC"], R_PAD), CB=min(cfg["CB"], R_PAD),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))


def _factor_signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    runtime = dict(g_ptr="*fp64", za_ptr="*fp64", zz_ptr="*fp64", nf_ptr="*fp32",
                   meta_ptr="*i64", linv_ptr="*fp64", scale_ptr="*fp64", info_ptr="*i32",
                   gs_ptr="*fp64", rs_ptr="*fp64", dg_ptr="*fp64",
                   n_chunk=_n_chunk(shape))
    blocks = factor_blocks(cfg, pow2(shape.r))
    return runtime, dict(MODE="repair", R_PAD=pow2(shape.r), PB=blocks["PB"], KC=blocks["KC"],
                         CB=blocks["CB"])


def _apply_signature(shape: Shape, cfg: dict) -> tuple[dict, dict]:
    R_PAD = pow2(shape.r)
    runtime = dict(src_ptr="*fp32", z_ptr="*fp64", meta_ptr="*i64", linv_ptr="*fp64",
                   scale_ptr="*fp64", dst_ptr="*fp32", g_ptr="*fp64", count_ptr="*i32",
                   info_ptr="*i32", ok_ptr="*i1", rows_per_chunk=_rows_per_chunk(shape.D))
    return runtime, dict(REPAIR=True, R_PAD=R_PAD, BLOCK_D=cfg["BLOCK_D"], BLOCK_K=min(R_PAD, 32),
                         WITH_GRAM=R_PAD <= APPLY_GRAM_MAX, CHECK=False)


def _n_chunk(shape: Shape) -> int:
    return triton.cdiv(shape.D, _rows_per_chunk(shape.D))


SPEC_GRAM = declare(KernelSpec(
    name="orth_gram", fn=_orth_gram_kernel, signature=_gram_signature,
    defaults={"BLOCK_D": 32, "ROWS_PER_CHUNK": 256, "GRAM_TILE": 32, "num_warps": 4,
              "num_stages": 1},
    interpreter={"BLOCK_D": 128, "ROWS_PER_CHUNK": 512, "GRAM_TILE": 128},  # fewer programs
    tuning={"BLOCK_D": (32, 64), "ROWS_PER_CHUNK": (128, 256, 512), "GRAM_TILE": (32, 64),
            "num_stages": (1, 2)},
    grid=lambda s, cfg, sms: (1, triton.cdiv(s.D, chunk_rows(cfg, s.D)),
                              (pow2(s.r) // min(cfg["GRAM_TILE"], pow2(s.r))) ** 2),
    block_keys=("BLOCK_D", "GRAM_TILE"), key=_orth_key, keyed_on_n=False,
    flags=("WITH_Z", "CHECK")))
SPEC_FACTOR = declare(KernelSpec(
    name="orth_factor", fn=_orth_factor_kernel, signature=_factor_signature,
    # Four warps: the diagonal block loads its rows from the scratch (no cross-warp
    # reductions), so the tiles' work splits over the warps (one warp's stream ~0.6x of 2
    # warps' at r = 128). maxnreg 255: without it ptxas gave 2-4 warps 168 registers at
    # r <= 32 and spilled around the calls (rsqrt's slow path, the mixed Gram). 16 x 16
    # tiles keep r = 128 unspilled.
    defaults={"KC": 16, "CB": 16, "num_warps": 4, "num_stages": 1, "maxnreg": 255},
    tuning={"num_warps": (1, 2, 4)},
    grid=lambda s, cfg, sms: (1,), key=_orth_key, keyed_on_n=False, flags=("MODE",)))
SPEC_APPLY = declare(KernelSpec(
    name="orth_apply", fn=_orth_apply_kernel, signature=_apply_signature,
    defaults={"BLOCK_D": 32, "num_warps": 4, "num_stages": 1},
    interpreter={"BLOCK_D": 128},
    tuning={"BLOCK_D": (16, 32, 64), "num_warps": (4, 8), "num_stages": (1, 2)},
    grid=lambda s, cfg, sms: (1, _n_chunk(s)), block_keys=("BLOCK_D",), key=_orth_key,
    keyed_on_n=False, flags=("REPAIR", "CHECK")))
