"""Storage-level bookkeeping for saved tensors (docs/design.md §2.1).

Autograd saves views that share storage. Each storage is compressed once, as its dense base
region laid out as rows of the contiguous row length; every saved view is rebuilt with
`as_strided` from one reconstructed region, cached weakly so two unpacks do not rebuild twice.
Which saved tensors may be compressed at all is `eligibility`'s; the error bounds of views
that cover only part of a storage are `partial_views`'.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from . import launches, magnitude
from .drafts import Draft, Stored
from .tracker import SiteTracker

__all__ = ["Region", "Entry", "Packed", "RawSaved", "dense_region", "region_view",
           "column_block", "storage_key", "saved_key", "saved_nbytes", "check_version"]


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

    def rebuilt(self) -> torch.Tensor | None:
        """The region's rebuild if one is alive now (another unpack made it), else None."""
        return self._cache() if self._cache is not None else None

    def served(self) -> None:
        """One packed view was unpacked (or served as (C, U), laser_triton/lowrank.py); drop
        the strong hold once all have been."""
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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
