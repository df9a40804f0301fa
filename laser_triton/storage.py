"""Storage-level bookkeeping for saved tensors (docs/design.md §2.1).

Autograd saves views that share storage. Each storage is compressed once, as its dense base
region laid out as rows of the contiguous row length; every saved view is rebuilt with
`as_strided` from one reconstructed region, cached weakly so two unpacks do not rebuild twice.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from . import launches, magnitude, ops
from .tracker import Draft, SiteTracker, Stored
from .util import reduced_fp32_matmul

__all__ = ["Region", "Entry", "Packed", "RawSaved", "dense_region", "ineligible", "WatchedModels",
           "column_block", "storage_key", "saved_key",
           "saved_nbytes", "weight_leaf",
           "decision_error", "view_error", "view_target_scale", "check_version"]


def check_version(t: torch.Tensor, saved: int) -> None:
    """Autograd's in-place check, which it skips for tensors saved through hooks: a tensor
    modified in place after it was saved must not silently feed backward."""
    if t._version != saved:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
            f"expected version {saved} instead (saved inside laser.compress(), which checks "
            "this as plain autograd does)")


class RawSaved:
    """A saved tensor kept as it is, with the version it was saved at."""

    __slots__ = ("t", "version")

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.version = t._version

    def unpack(self) -> torch.Tensor:
        check_version(self.t, self.version)
        return self.t

# Autograd nodes that only view or cast: a saved tensor whose history reaches a leaf
# (AccumulateGrad) through these alone is a weight copy, e.g. F.linear(x, w.to(bf16)).
_VIEW_CAST_NODES = {
    "ToCopyBackward0", "TBackward0", "TransposeBackward0", "TransposeBackward1",
    "PermuteBackward0", "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0",
    "ExpandBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "SliceBackward0", "SelectBackward0", "AsStridedBackward0",
    "CloneBackward0", "AliasBackward0", "DetachBackward0", "ContiguousBackward0",
    "NarrowBackward0", "SplitBackward0", "UnbindBackward0",
}


def weight_leaf(t: torch.Tensor, max_depth: int = 12) -> torch.Tensor | None:
    """The leaf (parameter) that t derives from through views and casts only, else None."""
    node = t.grad_fn
    for _ in range(max_depth):
        if node is None:
            return None
        name = type(node).__name__
        if name == "AccumulateGrad":
            return node.variable
        if name not in _VIEW_CAST_NODES:
            return None
        nxt = [fn for fn, _ in node.next_functions if fn is not None]
        if len(nxt) != 1:
            return None
        node = nxt[0]
    return None


class WatchedModels:
    """The models given to `watch()`: the storages of their parameters and buffers, and the
    (transposable) shapes of their 2-D weights, re-read by `refresh()` because
    model.to(dtype or device) gives them new storages. Models are held weakly."""

    def __init__(self) -> None:
        self._models: list[weakref.ref] = []
        self.state: set = set()  # storage keys of parameters and buffers
        self.weight_shapes: set = set()  # shapes (and transposes) of 2-D ones

    def add(self, model: torch.nn.Module) -> None:
        self._models.append(weakref.ref(model))
        self.refresh()

    def refresh(self) -> None:
        state, shapes, live = set(), set(), []
        for ref in self._models:
            model = ref()
            if model is None:
                continue
            live.append(ref)
            for t in list(model.parameters()) + list(model.buffers()):
                if t.layout != torch.strided:
                    continue
                state.add(storage_key(t))
                if t.dim() == 2:
                    shapes.update({tuple(t.shape), tuple(t.shape[::-1])})
        self._models, self.state, self.weight_shapes = live, state, shapes

    def ineligible(self, t: torch.Tensor) -> str | None:
        """`ineligible(t, ...)` with these models' facts."""
        return ineligible(t, self.state, self.weight_shapes)


def ineligible(t: torch.Tensor, model_state: set, weight_shapes: set) -> str | None:
    """Why a saved tensor is kept as it is, or None when LASER may compress it (docs/design.md
    §2.2). `model_state`, `weight_shapes`: the storages and (transposable) 2-D shapes of the
    watched models' parameters and buffers, empty without `watch()`.

    "dtype": not floating; "parameter": a parameter or a view of one (no extra memory);
    "leaf": no autograd history and nothing watched, so it cannot be told from a parameter;
    "weight copy": a cast or shaped copy of a weight (history reaching a leaf through views
    and casts only, or, history-less under watch, shaped like a watched weight).
    """
    if t.dtype not in ops.FLOAT_DTYPES:
        return "dtype"
    if t.grad_fn is None:
        if t.requires_grad or storage_key(t) in model_state:
            return "parameter"
        if not model_state:
            return "leaf"
        if t.dim() == 2 and tuple(t.shape) in weight_shapes:
            return "weight copy"
        return None
    leaf = weight_leaf(t)
    if leaf is not None:
        # A view of the parameter itself costs nothing; a cast copy (w.to(bf16)) does.
        return "parameter" if storage_key(leaf) == storage_key(t) else "weight copy"
    return None


def storage_key(t: torch.Tensor) -> StorageWeakRef:
    """Identity of t's storage. The weak reference pins the storage's control block, so the
    key cannot be reused by a new allocation while we hold it (unlike a data pointer)."""
    return StorageWeakRef(t.untyped_storage())


def saved_key(t: torch.Tensor) -> object:
    """storage_key for strided tensors; sparse and other layouts have no single storage and
    are identified by the tensor object (kept alive by whoever saved it)."""
    return storage_key(t) if t.layout == torch.strided else ("non-strided", id(t))


def saved_nbytes(t: torch.Tensor) -> int:
    """Bytes a saved tensor holds: its storage, or a sparse tensor's values and indices."""
    if t.layout == torch.strided:
        return t.untyped_storage().nbytes()
    if t.layout == torch.sparse_coo:
        parts = (t._values(), t._indices())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.values(), t.crow_indices(), t.col_indices())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = (t.values(), t.ccol_indices(), t.row_indices())
    else:
        return 0
    return sum(p.numel() * p.element_size() for p in parts)


@dataclass(frozen=True)
class Region:
    """A dense span of a storage, read as a (rows, width) matrix in memory order."""

    start: int  # storage offset, in elements
    numel: int
    width: int  # the contiguous row length

    @property
    def rows(self) -> int:
        return self.numel // self.width

    def covers(self, t: torch.Tensor) -> bool:
        """True when every element of view t lies inside this region."""
        if t.numel() == 0:
            return True
        lo = t.storage_offset()
        hi = lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 1)
        return self.start <= lo and hi < self.start + self.numel


def dense_region(t: torch.Tensor) -> Region | None:
    """The dense region of t's base tensor, or None if the base is not dense and non-overlapping."""
    base = t._base if t._base is not None else t
    if base.numel() == 0 or base.dim() == 0:
        return None
    dims = sorted(((st, s) for s, st in zip(base.shape, base.stride()) if s > 1))
    expected = 1
    for st, s in dims:
        if st != expected:
            return None
        expected *= s
    width = dims[0][1] if dims else 1
    region = Region(base.storage_offset(), base.numel(), width)
    return region if region.covers(t) else None


def column_block(size: tuple[int, ...], stride: tuple[int, ...], offset: int,
                 region: Region) -> tuple[int, int] | None:
    """(first column, width) when the view (size, stride, offset from the region's start) is
    a column block of `region`: every row, one contiguous range of columns, as each half of
    `gate, up = gate_up.chunk(2, -1)`. None for any other view."""
    if not size or 0 in size:
        return None
    w = size[-1]
    if w >= region.width or (w > 1 and stride[-1] != 1):
        return None
    expected, rows = region.width, 1
    for st, s in sorted((st, s) for s, st in zip(size[:-1], stride[:-1]) if s > 1):
        if st != expected:
            return None
        expected *= s
        rows *= s
    if rows != region.rows or not (0 <= offset and offset + w <= region.width):
        return None
    return offset, w


def region_view(t: torch.Tensor, region: Region, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (rows, width) tensor over `region` of t's storage, without autograd history, read as
    `dtype` (default t's; the region's offsets count elements of that dtype)."""
    flat = torch.empty(0, dtype=t.dtype if dtype is None else dtype, device=t.device)
    flat.set_(t.untyped_storage(), region.start, (region.numel,), (1,))
    return flat.view(region.rows, region.width)


class Entry:
    """One compressed (or raw-held) storage region for one step."""

    __slots__ = ("region", "dtype", "version", "site", "tracker", "draft", "stored", "pinned",
                 "views", "checked_views", "_cache", "live", "pin_src", "modified", "overwritten",
                 "packs", "unpacks", "_hold", "__weakref__")

    def __init__(self, region: Region, dtype: torch.dtype, t: torch.Tensor, site: str,
                 tracker: SiteTracker | None, draft: Draft | None):
        self.region = region
        self.dtype = dtype
        self.version = t._version
        # Shares t's version counter, to notice in-place changes while raw values are served
        # (undecided, stored raw); dropped once the values are held compressed.
        self.live: torch.Tensor | None = t.detach()
        self.pin_src: tuple[torch.Tensor, int] | None = None
        self.modified = False  # compressed from values changed in place after the save
        # Set when the storage was saved again after an in-place change: shares its version
        # counter, so unpacking this entry raises as plain autograd would.
        self.overwritten: torch.Tensor | None = None
        self.site = site
        self.tracker = tracker
        self.draft = draft
        self.stored: Stored | None = None
        self.pinned: torch.Tensor | None = None  # raw region, when a raw reference holds it anyway
        self.views: list[Packed] = []  # undecided partial views that must meet tau on their own
        self.checked_views = 0  # how many of them the batched decision measured
        self._cache: weakref.ref | None = None
        # Backward rebuilds a region once: the rebuild is held until every packed view of it
        # has been unpacked (autograd unpacks each once), then only weakly.
        self.packs = 0
        self.unpacks = 0
        self._hold: torch.Tensor | None = None

    def pin(self, t: torch.Tensor) -> None:
        """Another, raw reference keeps this storage alive: serve exact values from it."""
        self.pinned = region_view(t, self.region, self.dtype)  # t may view it as another dtype
        self.pin_src = (t.detach(), t._version)

    def changed(self) -> bool:
        """Were the saved values modified in place since they were saved?"""
        return self.live is not None and self.live._version != self.version

    def matrix(self) -> torch.Tensor:
        """The (rows, width) values for unpacking: exact where held raw, else rebuilt."""
        if self.overwritten is not None:
            check_version(self.overwritten, self.version)
        if self.modified:
            check_version(self.live, self.version)
        if self.pinned is not None:
            check_version(*self.pin_src)
            return self.pinned
        if self.stored is None or self.stored.raw is not None:
            if self.live is not None:
                check_version(self.live, self.version)
            # undecided (backward inside compress(), an interrupted step), or stored raw
            return self.draft.X if self.stored is None else self.stored.raw
        X_hat = self._cache() if self._cache is not None else None
        if X_hat is None:
            launches.note("rebuild", self)
            X_hat = magnitude.rebuild(self.stored.C, self.stored.U, self.dtype, self.stored.scale)
            self._cache = weakref.ref(X_hat)
            if self.unpacks + 1 < self.packs:
                self._hold = X_hat
        return X_hat

    def served(self) -> None:
        """One packed view was unpacked; drop the strong hold once all have been."""
        self.unpacks += 1
        if self.unpacks >= self.packs:
            self._hold = None

    def raw_bytes(self) -> int:
        return self.region.numel * _itemsize(self.dtype)

    def held_bytes(self) -> int:
        """Bytes this entry holds besides the basis (counted per basis by the caller)."""
        if self.pinned is not None or self.stored is None:
            return self.raw_bytes()
        return self.stored.nbytes()


class Packed:
    """What autograd keeps for one saved view: its entry and its geometry."""

    __slots__ = ("entry", "size", "stride", "offset")

    def __init__(self, entry: Entry, t: torch.Tensor):
        self.entry = entry
        entry.packs += 1
        self.size = tuple(t.shape)
        self.stride = tuple(t.stride())
        self.offset = t.storage_offset() - entry.region.start

    def unpack(self) -> torch.Tensor:
        m = self.entry.matrix()
        self.entry.served()
        return m.as_strided(self.size, self.stride, m.storage_offset() + self.offset)


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

def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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
