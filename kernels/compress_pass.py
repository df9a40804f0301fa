"""compress_pass: C = X U, ||X||^2, ||C||^2, per-row error maxima and Y = X^T C (docs/design.md §6.1).

The launcher. It picks a design per (D, r) (the config store's `compress_path` table, else the
size rule `compress_plan.fused_by_size`), launches its product kernels (`compress_kernels`:
fused, or coefficient [+ Y]) with the store's configs, shrinking blocks when a config does not
fit, and then the finishing reduction (`compress_finish`), which makes every scalar and Y
bitwise repeatable. `deterministic=False` adds Y with fp32 atomics instead.
"""

from __future__ import annotations

import torch
import triton
from triton.runtime.errors import OutOfResources

from ..results import CompressOut
from ..validation import check_compress_pass
from ._common import DTYPE_NAMES, INTERPRET, launch, new_buffer, num_sms, pow2, shrink_config
from .compress_finish import (
    FINISH_CONFIG,
    SPEC_FINISH,
    _compress_finish_kernel,
    finish_counter,
    finish_grid,
)
from .compress_kernels import (
    SPEC_COEFF,
    SPEC_FUSED,
    SPEC_Y,
    _compress_coeff_kernel,
    _compress_fused_kernel,
    _compress_y_kernel,
)
from .compress_plan import (
    fused_block_r,
    fused_by_size,
    fused_programs,
    rows_fit,
    y_segments,
)
from .compress_tma import (
    SPEC_TMA,
    _compress_tma_kernel,
    tma_block_k,
    tma_fits,
    tma_programs,
    x_descriptor,
    x_ok,
)
from .configs import PATH_TABLE, get_store

__all__ = ["compress_pass", "choose_path", "fused_block_r", "launch_plan", "fused_by_size",
           "fused_programs", "y_segments", "finish_grid", "SPEC_FUSED", "SPEC_COEFF", "SPEC_Y",
           "SPEC_FINISH", "SPEC_TMA"]


def choose_path(D: int, r: int, dtype: str, device: torch.device, store=None,
                coeff: str = "bf16") -> str:
    """'fused', 'split' or 'tma': the store's `compress_path` entry (for C stored as
    `coeff`), else the size rule. A 'tma' entry needs a shape the TMA kernel covers
    (`tma_fits`); the launcher also needs X's layout to suit a TMA descriptor (`x_ok`), else
    it takes the size rule's design."""
    path = (store or get_store(device)).lookup(PATH_TABLE, D, r, dtype, coeff=coeff)
    if path is None or (path == "tma" and not tma_fits(D, r, dtype)):
        path = "fused" if fused_by_size(D, r) else "split"
    return path


def launch_plan(store, N: int, D: int, r: int, dtype: str, need_y: bool = True,
                coeff: str = "bf16", tma_ok: bool = True) -> list[tuple[str, dict, dict]]:
    """[(kernel, config, mode flags)] that `compress_pass` launches for this shape with
    `store`'s configs for C stored as `coeff` (before any out-of-resource fallback): what
    the static audit checks (at that `coeff`). tma_ok=False: X's layout does not suit a TMA
    descriptor (`compress_tma.x_ok`), so a 'tma' path becomes the size rule's design."""
    path = choose_path(D, r, dtype, None, store, coeff)
    if path == "tma" and not tma_ok:
        path = "fused" if fused_by_size(D, r) else "split"
    if path == "tma":
        steps = [("compress_tma", store.lookup("compress_tma", D, r, dtype, N, coeff),
                  {"NEED_Y": need_y})]
    elif path == "fused":
        cfg = store.lookup("compress_fused", D, r, dtype, N, coeff)
        steps = [("compress_fused", cfg, {"NEED_Y": need_y})]
    else:
        y_cfg = store.lookup("compress_y", D, r, dtype, N)
        cfg = store.lookup("compress_coeff", D, r, dtype, N, coeff)
        steps = [("compress_coeff", cfg,
                  {"WRITE_CS": need_y, "CS_SPLIT": y_cfg["PRECISION"] != "ieee"})]
        if need_y:
            steps.append(("compress_y", y_cfg, {}))
    return steps + [("compress_finish", dict(FINISH_CONFIG), {})]


def compress_pass(X: torch.Tensor, U: torch.Tensor, need_y: bool = True,
                  coeff_dtype: torch.dtype | None = None, *,
                  deterministic: bool = True) -> CompressOut:
    """C = X U (coeff_dtype), e_X, e_C, Y = X^T C (fp32, or None), row_err_max, c_amax.

    X: (N, D) fp32/bf16/fp16, any strides. U: (D, r) fp32, any strides (torch.linalg.qr's
    column-major Q is fine). Matches `laser_triton.reference.compress_pass`. All results stay
    on the device; nothing synchronizes with the host.
    """
    coeff_dtype = check_compress_pass(X, U, coeff_dtype)
    N, D = X.shape
    R = U.shape[1]
    if not rows_fit(N, R):
        raise ValueError(f"compress_pass: N = {N} rows is too many for rank {R} (the kernels "
                         "index up to (R + 1) N < 2^31 values; ops runs the reference there)")
    dev, dname = X.device, DTYPE_NAMES[X.dtype]
    # C's dtype picks the binary, so the store keys those configs by it too
    cname = DTYPE_NAMES[coeff_dtype]
    store = get_store(dev)
    atomic = not deterministic
    sms = num_sms(dev)
    C = new_buffer((N, R), coeff_dtype, dev)
    xs, us = (X.stride(0), X.stride(1)), (U.stride(0), U.stride(1))

    def y_buffer(n_slabs: int) -> torch.Tensor:
        if not need_y:
            return new_buffer((1,), torch.float32, dev)
        if atomic:
            return torch.zeros((D, R), dtype=torch.float32, device=dev)
        return new_buffer((n_slabs, D, R), torch.float32, dev)

    def run_fused(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        P, J = fused_programs(N, D, R, cfg, sms)
        ypart, amax = y_buffer(P), new_buffer((P * J,), torch.float32, dev)
        rows = new_buffer((J + 1, N), torch.float32, dev)
        # PROGRAMS_PER_SM sizes the grid only: the compiled launcher rejects unknown keywords.
        _compress_fused_kernel[(P, J)](
            X, U, C, ypart, rows, amax, N, D, R, *xs, *us, NEED_Y=need_y,
            ATOMIC=atomic, D_PAD=pow2(D), INTERPRET=INTERPRET,
            **{**SPEC_FUSED.kernel_config(cfg), "BLOCK_R": fused_block_r(D, R, cfg)})
        return ypart, rows, amax, J

    def run_coeff(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
        grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
        rows, amax = new_buffer((2, N), torch.float32, dev), new_buffer(grid, torch.float32, dev)
        _compress_coeff_kernel[grid](X, U, C, cs, cslo, rows, amax, N, D, R, *xs, *us,
                                     WRITE_CS=cs is not C, CS_SPLIT=cs_split, R_PAD=pow2(R),
                                     INTERPRET=INTERPRET, **cfg)
        return rows, amax

    def run_y(cfg: dict) -> torch.Tensor:
        n_seg, rows_per_seg = y_segments(N, D, R, cfg, sms)
        ypart = y_buffer(n_seg)
        _compress_y_kernel[(n_seg, triton.cdiv(D, cfg["BLOCK_D"]))](
            X, cs, cslo, ypart, N, D, R, *xs, rows_per_seg, ATOMIC=atomic, R_PAD=pow2(R),
            INTERPRET=INTERPRET, **{**cfg, "PRECISION": "bf16x3" if cs_split else "ieee"})
        return ypart

    def run_tma(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        P = tma_programs(N, D, R, cfg, sms)
        ypart, amax = y_buffer(P), new_buffer((P,), torch.float32, dev)
        rows = new_buffer((2, N), torch.float32, dev)
        _compress_tma_kernel[(P,)](
            x_descriptor(X, cfg), U, C, ypart, rows, amax, N, D, R, *us, NEED_Y=need_y,
            ATOMIC=atomic, BLOCK_K=tma_block_k(D), HALVES=triton.cdiv(D, tma_block_k(D)),
            R_PAD=pow2(R), X_FP16=X.dtype == torch.float16, INTERPRET=INTERPRET,
            **SPEC_TMA.kernel_config(cfg))
        return ypart, rows, amax

    ypart = None
    path = choose_path(D, R, dname, dev, store, cname)
    if path == "tma" and not x_ok(X):  # a strided or misaligned X: the size rule's design
        path = "fused" if fused_by_size(D, R) else "split"
    if path == "tma":
        cfg = store.lookup("compress_tma", D, R, dname, N, cname)
        ran, (ypart, rows, amax) = launch(
            "compress_tma", run_tma, cfg, lambda c: shrink_config(c, SPEC_TMA.block_keys))
        store.remember("compress_tma", D, R, dname, N, ran, cname)
        n_tiles = 1
    elif path == "fused":
        cfg = store.lookup("compress_fused", D, R, dname, N, cname)
        try:
            ran, (ypart, rows, amax, n_tiles) = launch(
                "compress_fused", run_fused, cfg, lambda c: shrink_config(c, SPEC_FUSED.block_keys))
            store.remember("compress_fused", D, R, dname, N, ran, cname)
        except OutOfResources:  # even the smallest blocks do not fit: go split
            store.remember_path(D, R, dname, "split", cname)
    if ypart is None:
        y_cfg = store.lookup("compress_y", D, R, dname, N) if need_y else None
        # Step 2 takes the fp32 C in the form its products need: bf16 halves, or fp32.
        cs_split = need_y and y_cfg["PRECISION"] != "ieee"
        if cs_split:
            cs, cslo = (new_buffer((N, R), torch.bfloat16, dev) for _ in range(2))
        elif need_y and coeff_dtype != torch.float32:
            cs = cslo = new_buffer((N, R), torch.float32, dev)
        else:
            cs = cslo = C
        cfg = store.lookup("compress_coeff", D, R, dname, N, cname)
        ran, (rows, amax) = launch("compress_coeff", run_coeff, cfg,
                                   lambda c: shrink_config(c, SPEC_COEFF.block_keys))
        store.remember("compress_coeff", D, R, dname, N, ran, cname)
        n_tiles = 1
        ypart = y_buffer(1)
        if need_y:
            ran, ypart = launch("compress_y", run_y, y_cfg,
                                lambda c: shrink_config(c, SPEC_Y.block_keys))
            store.remember("compress_y", D, R, dname, N, ran)

    scalars = new_buffer((4,), torch.float32, dev)
    Y = (ypart if atomic else new_buffer((D, R), torch.float32, dev)) if need_y else None
    n_yblk, n_rb = finish_grid(N, D, R, need_y, atomic)
    parts = new_buffer((n_rb, 3), torch.float32, dev)
    count = finish_counter(dev)
    _compress_finish_kernel[(n_yblk + n_rb,)](
        ypart, Y if n_yblk else scalars, ypart.shape[0] if n_yblk else 0, D * R, rows, N,
        n_tiles, amax, amax.numel(), parts, count, scalars, n_yblk, **FINISH_CONFIG)
    return CompressOut(C, scalars[0], scalars[1], Y, scalars[2], scalars[3], scalars)
