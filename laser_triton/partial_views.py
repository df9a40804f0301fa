"""Error bounds for saved views that cover only part of their storage (docs/design.md §2.1).

A storage is compressed once, but each saved view of it is rebuilt on its own, so a view
holding little of the storage's energy (one half of a fused `gate_up`) must meet `tau` by
itself. The batched decision reads `decision_error` (rebuilding to measure), or, when every
view is a column block, `column_view_parts` on the device and `view_errors` on the host
(no rebuild); a reset for such a storage aims lower by `view_target_scale`.
"""

from __future__ import annotations

import math

import torch

from . import launches, magnitude
from .storage import Entry, column_block
from .util import reduced_fp32_matmul, to_device_async

__all__ = ["decision_error", "view_error", "view_target_scale", "column_view_parts",
           "batch_products", "view_errors", "device_view_errors"]


def decision_error(entry: Entry) -> torch.Tensor:
    """The error the decision reads: the region's, or its worst partial view's if larger."""
    d = entry.draft
    if not entry.views or d.C is None:
        return d.err
    return torch.maximum(d.err, view_error(entry, d.X))


def view_error(entry: Entry, X: torch.Tensor) -> torch.Tensor:
    """Largest relative error over the entry's partial views, measured on what unpack returns."""
    src = entry.stored if entry.stored is not None else entry.draft
    C, U, scale = src.C, src.U, src.scale
    X_hat = magnitude.rebuild(C, U, X.dtype, scale)
    s = 1.0 if scale is None else scale  # norms of scale * X stay inside fp32's range
    worst = torch.zeros((), device=X.device)
    for p in entry.views:
        v = magnitude.scaled(X.as_strided(p.size, p.stride, X.storage_offset() + p.offset)
                             .float(), s)
        v_hat = magnitude.scaled(X_hat.as_strided(p.size, p.stride, p.offset).float(), s)
        num = torch.linalg.vector_norm(v - v_hat)
        den = torch.linalg.vector_norm(v)
        e = torch.where(den > 0, num / den, torch.where(num > 0, math.inf, 0.0))
        worst = torch.maximum(worst, torch.nan_to_num(e, nan=math.inf))
    return worst


@launches.counted(launches.RESET)  # read only for a failed decision: the reset's first step
def view_target_scale(entry: Entry) -> float:
    """Reset tightening so each partial view meets tau: sqrt(smallest view energy share)."""
    if not entry.views:
        return 1.0
    X = entry.draft.X  # energies in fp64: fp32 squares under/overflow at extreme magnitudes
    total = float(torch.linalg.vector_norm(X, dtype=torch.float64).square())
    shares = [float(torch.linalg.vector_norm(
        X.as_strided(p.size, p.stride, X.storage_offset() + p.offset), dtype=torch.float64
    ).square()) / total for p in entry.views] if total > 0 and math.isfinite(total) else [1.0]
    return max(math.sqrt(max(min(shares), 0.0)), 1e-3)



def column_view_parts(entry: Entry) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the host needs to bound each partial view's error without rebuilding the region,
    when every view is a column block (as the gate and up halves of a fused gate_up):
    per view, ||X_S|| and c_S = sum over its columns j of <U_j, (U M - 2 Y)_j>, M = U^T Y.

    With Y = X^T X U from the same compress pass, ||X_S - X U U_S^T||^2 = ||X_S||^2 + c_S
    exactly, so the projection error of view S comes from D x r quantities and one norm of X
    per view: no rebuild, no (N, D) temporaries. c_S cancels ||X_S||^2 down to the error, so
    the norm accumulates in fp64 (an fp32 sum over millions of elements was 0.6% off on CPU)
    and the products in fp32 (fp64 where TF32 may apply): measured within 5e-8 ||X_S||^2 up to
    N = 75000; `view_errors` adds 1e-6 ||X_S||^2 for that. Below exact_below every error is
    measured instead (a rebuild).
    Returns (norms, c) (k each); `view_errors` finishes on the host.
    None when some view is not a column block (then `view_error` rebuilds).
    """
    d = entry.draft
    blocks = [column_block(p.size, p.stride, p.offset, entry.region) for p in entry.views]
    if d.C is None or d.Y is None or any(b is None for b in blocks):
        return None
    X, U, Y = d.X, d.U, d.Y
    if reduced_fp32_matmul(U.device):  # TF32 would swamp the residual: products in fp64
        U, Y = U.double(), Y.double()
    M = d.shrink_gram if d.shrink_gram is not None and U.dtype == torch.float32 else U.t() @ Y
    Z = torch.addmm(Y, U, M, beta=-2.0)  # U M - 2 Y
    blocks.sort()
    k, w = len(blocks), blocks[0][1]
    if blocks == [(i * w, w) for i in range(k)] and k * w == entry.region.width:
        # The views partition the columns in equal blocks: one reduction each.
        norms = torch.linalg.vector_norm(X.unflatten(1, (k, w)), dim=(0, 2), dtype=torch.float64)
        # U's rows are X's columns: block i is a contiguous run of U and Z; c = k dot products.
        c = torch.bmm(U.reshape(k, 1, -1), Z.reshape(k, -1, 1)).view(k)
    else:
        norms = torch.stack([torch.linalg.vector_norm(X[:, a:a + n], dtype=torch.float64)
                             for a, n in blocks])
        c = torch.stack([(U[a:a + n] * Z[a:a + n]).sum() for a, n in blocks])
    return norms, c


def _equal_blocks(entry: Entry) -> int | None:
    """k when the entry's views partition its columns in k equal blocks, else None."""
    blocks = [column_block(p.size, p.stride, p.offset, entry.region) for p in entry.views]
    if not blocks or any(b is None for b in blocks):
        return None
    blocks.sort()
    k, w = len(blocks), blocks[0][1]
    ok = blocks == [(i * w, w) for i in range(k)] and k * w == entry.region.width
    return k if ok else None


def batch_products(batch: list[Entry], views: list[int]) -> dict[int, tuple]:
    """The D x r products a decision batch needs, in one set of batched ops per (width, rank)
    instead of a few per tensor: the Ritz gram M = U^T Y of every draft with a shrink check
    due (set as its `shrink_gram`), and `column_view_parts` of the entries `views` (indices
    into batch) whose views split their columns in equal blocks (the gate/up halves), which
    also need M. Returns {index: (norms, c)} for those entries; the others (views that are no
    equal column blocks) are left to `column_view_parts` or a rebuild.

    Per group: two stacks, one bmm for M, and for views one baddbmm (Z = U M - 2 Y) and one
    bmm for every entry's k dot products; one fp64 norm of X per view entry (X is not
    stacked: copying activations would cost more than a launch)."""
    split = {i: _equal_blocks(batch[i]) for i in views}
    want = [i for i, e in enumerate(batch)
            if (e.draft.shrink_due and e.draft.shrink_gram is None) or split.get(i)]
    groups: dict[tuple, list[int]] = {}
    for i in want:
        d = batch[i].draft
        groups.setdefault((tuple(d.U.shape), d.U.device, d.Y.dtype), []).append(i)
    parts: dict[int, tuple] = {}
    for idx in groups.values():
        U = _stacked([batch[i].draft.U for i in idx])
        Y = _stacked([batch[i].draft.Y for i in idx])
        if reduced_fp32_matmul(U.device):  # TF32 would swamp the residual: products in fp64
            U, Y = U.double(), Y.double()
        M = torch.bmm(U.mT, Y)
        M32 = M if M.dtype == torch.float32 else M.float()
        for j, i in enumerate(idx):
            d = batch[i].draft
            if d.shrink_due and d.shrink_gram is None:
                d.shrink_gram = M32[j]
        ks = {split[i] for i in idx if split.get(i)}
        if not ks:
            continue
        Z = torch.baddbmm(Y, U, M, beta=-2.0)  # U M - 2 Y
        B, D, r = U.shape
        c_by_k = {}
        for k in ks:  # (one k in practice: gate/up halves)
            # U's rows are X's columns: block b of each matrix is a contiguous run of U and Z.
            c_by_k[k] = torch.bmm(U.reshape(B * k, 1, -1), Z.reshape(B * k, -1, 1)).view(B, k)
        for j, i in enumerate(idx):
            k = split.get(i)
            if k:
                X = batch[i].draft.X
                norms = torch.linalg.vector_norm(X.unflatten(1, (k, D // k)), dim=(0, 2),
                                                 dtype=torch.float64)
                parts[i] = (norms, c_by_k[k][j])
    return parts


def _stacked(ts: list[torch.Tensor]) -> torch.Tensor:
    """(B, ...) from B same-shaped tensors: a view for one, one launch for more."""
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


_VIEW_NOISE = 1e-6  # relative rounding of ||X_S||^2 + c_S (measured <= 5e-8, see above)


def view_errors(parts: list[float], e_C: float, consts: tuple[float, ...],
                scale: float | None) -> float:
    """Largest relative error of the column views from `column_view_parts` (host values).

    In the pass's (scaled) units, with R_S the projection residual (||R_S||^2 = ||X_S||^2 +
    c_S) and round(C) - C at most rho_c ||C|| plus the subnormal term sqrt(N r) h_c:
    ||v - cast(rebuild)|| <= (||R_S|| + rho_c ||C|| + sqrt(N r) h_c)(1 + rho_x) + rho_x ||v||
    + sqrt(N D) h_x s (||U_S|| <= 1). An all-zero view gives 0 only when nothing is rebuilt
    into it; NaN gives inf.
    """
    rho_c, rho_x, coeff2, out_sub = consts[:4]
    s = 1.0 if scale is None else scale
    k = len(parts) // 2
    worst = 0.0
    for norm, c in zip(parts[:k], parts[k:]):
        norm *= s  # ||X_S|| was read unscaled; c_S comes from the scaled pass
        e_v = norm * norm
        res = e_v + c + _VIEW_NOISE * e_v  # the products' rounding, bounded from above
        proj = math.sqrt(max(res, 0.0)) if res == res else math.inf
        num = (proj + rho_c * math.sqrt(max(e_C, 0.0)) + math.sqrt(coeff2)) * (1.0 + rho_x)
        if not e_v > 0:
            err = 0.0 if num == 0.0 else math.inf
        else:
            err = (num + out_sub) / norm + rho_x
        if not err <= worst:  # NaN-safe: NaN becomes inf
            worst = err if err == err else math.inf
    return worst


def device_view_errors(batch: list[Entry], parts: dict[int, tuple]) -> torch.Tensor:
    """`view_errors` of the entries `parts` ({index into batch: (norms, c)}) on the device,
    for decisions that must stay there (sync_basis): the worst column view's error per entry,
    in the order of sorted(parts), fp64, in a fixed number of launches for the whole batch
    (no rebuild). Same terms and the same NaN-as-inf rule as the host version."""
    idx = sorted(parts)
    dev = parts[idx[0]][0].device
    norms = torch.cat([parts[i][0] for i in idx]).double()
    c = torch.cat([parts[i][1] for i in idx]).double()
    owner, per_view = [], []
    for j, i in enumerate(idx):  # host constants per view: scale and rounding terms
        d = batch[i].draft
        rho_c, rho_x, coeff2, out_sub = d.consts[:4]
        s = 1.0 if d.scale is None else d.scale
        for _ in range(parts[i][0].numel()):
            owner.append(j)
            per_view.append([s, rho_c, 1.0 + rho_x, math.sqrt(coeff2), out_sub, rho_x])
    table = to_device_async(torch.tensor(per_view, dtype=torch.float64), dev)
    at = to_device_async(torch.tensor(owner), dev)
    e_C = torch.stack([batch[i].draft.stats[1] for i in idx]).double()[at].clamp_min(0.0)
    s, rho_c, one_rho_x, sub_c, out_sub, rho_x = table.unbind(1)
    norm = norms * s  # ||X_S|| was read unscaled; c_S comes from the scaled pass
    e_v = norm * norm
    res = e_v * (1.0 + _VIEW_NOISE) + c
    proj = torch.where(torch.isnan(res), math.inf, res.clamp_min(0.0).sqrt())
    num = (proj + rho_c * e_C.sqrt() + sub_c) * one_rho_x
    err = torch.where(e_v > 0, (num + out_sub) / norm + rho_x,
                      torch.where(num == 0, 0.0, math.inf))
    err = torch.nan_to_num(err, nan=math.inf, posinf=math.inf)
    worst = torch.zeros(len(idx), dtype=torch.float64, device=dev)
    return worst.scatter_reduce(0, at, err, reduce="amax")
