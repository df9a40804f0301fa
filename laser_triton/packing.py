"""The pack side of `Laser`'s saved-tensor hooks (docs/design.md §2.1, §2.2, §5 step 1).

`_pack` runs for every tensor autograd saves inside `compress()`: it sorts out the tensors kept
as they are (counted per rule), names the save's site, drafts eligible storages with their
site's `SiteTracker` and closes a decision batch every `batch_size` drafts. `Laser` inherits it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from . import launches
from .accounting import RawCount
from .config import LaserConfig
from .decisions import Step, note_drafted
from .distributed import LocalSync
from .eager import eager
from .eligibility import WatchedModels
from .sites import ModuleLabels
from .storage import (
    Entry,
    Packed,
    RawSaved,
    dense_region,
    region_view,
    saved_key,
    saved_nbytes,
    storage_key,
)
from .tracker import SiteTracker

__all__ = ["PackHooks", "WIDTHS_PER_SITE"]

# Trackers kept per site slot (role, module, ordinal) across row widths; see _note_width.
WIDTHS_PER_SITE = 4


class PackHooks:
    """Pack hooks of `Laser` (`_pack`, and `_pack_raw` inside `raw()`), with the per-slot width
    bound. The host class holds the state declared below and provides the decision points
    `_close_batch(step)` and `_poll(step, block)`."""

    cfg: LaserConfig
    trackers: dict[str, SiteTracker]
    dropped_sites: int  # trackers dropped by the per-slot width bound
    _step: Step | None
    _sync: LocalSync
    _labels: ModuleLabels
    _watched: WatchedModels
    _widths: dict[str, OrderedDict]  # slot -> its trackers' names, LRU order

    def _active_step(self) -> Step | None:
        """This thread's step inside `compress()`, else None."""
        step = self._step
        if step is None or step.thread != threading.get_ident():
            return None
        return step

    def _count_raw(self, step: Step, t: torch.Tensor, category: str,
                   site: str | None = None) -> torch.Tensor:
        """Keep t raw and count its storage once: under `site` when a tracked site chose raw
        (back-off), else under its rule's category."""
        key = saved_key(t)
        if key not in step.raw_seen:
            step.raw_seen[key] = category
            counts = step.raw_counts if site is None else step.site_raw
            c = counts.setdefault(category if site is None else site, RawCount())
            c.tensors += 1
            c.nbytes += saved_nbytes(t)
        entry = step.entries.get(key)
        if entry is not None:
            if t._version != entry.version:
                # The storage was modified in place after the entry's save: plain autograd
                # raises for that save at backward, whatever LASER holds for it.
                entry.overwritten = t.detach()
            elif entry.pinned is None:
                entry.pin(t)  # the storage stays alive raw anyway: serve exact values
        return RawSaved(t)

    @eager
    def _pack_raw(self, t: torch.Tensor):
        step = self._active_step()
        if step is None:
            return t
        return self._count_raw(step, t, "raw()")

    @eager
    @launches.counted("pack")
    def _pack(self, t: torch.Tensor):
        step = self._active_step()
        if step is None:
            return t
        # Every save takes a slot, eligible or not, so the k-th save of a call names the same
        # site in every call even when the first call's input is a leaf.
        slot = self._next_slot(step)
        if t.layout != torch.strided:  # sparse and other layouts: no dense rows to compress
            return self._count_raw(step, t, "layout")
        reason = self._watched.ineligible(t)
        if reason == "parameter":
            return RawSaved(t)  # the model owns it: no extra memory, nothing to count
        if reason is not None:
            return self._count_raw(step, t, reason)
        key = storage_key(t)
        if key in step.raw_seen:
            return RawSaved(t)  # already held raw by another reference
        entry = step.entries.get(key)
        if entry is not None:
            if (entry.version != t._version or t.dtype != entry.dtype
                    or not entry.region.covers(t)):
                return self._count_raw(step, t, "aliased")  # new contents, dtype or layout
            return self._packed(entry, t)
        region = dense_region(t)
        if region is None:
            return self._count_raw(step, t, "layout")
        site, site_cfg = self._site_for(slot, region.width)
        if site_cfg is None or not site_cfg.enabled:  # excluded, or tau = 0 at this site
            return self._count_raw(step, t, "excluded")
        if region.width < site_cfg.min_width:
            return self._count_raw(step, t, "narrow")
        if region.rows < site_cfg.max_rank:
            return self._count_raw(step, t, "few rows")
        tracker = self.trackers.get(site)
        if tracker is None:
            tracker = self.trackers[site] = SiteTracker(site, region.width, site_cfg, self._sync)
            tracker.batched = True  # bases advance and shrink in the batched decision points
        self._note_width(slot, site)
        launches.note("saved")  # a tensor at a tracked site (the budget's unit)
        if tracker.take_skip():
            return self._count_raw(step, t, "backoff", site=site)
        with torch.no_grad():
            draft = tracker.draft(region_view(t, region))
        launches.note("drafted")
        entry = Entry(region, t.dtype, t, site, tracker, draft)
        step.entries[key] = entry
        step.batch.append(entry)
        note_drafted(step, entry)
        packed = self._packed(entry, t)
        if len(step.batch) >= self.cfg.batch_size:
            self._close_batch(step)
            self._poll(step, block=False)
        return packed

    @staticmethod
    def _packed(entry: Entry, t: torch.Tensor) -> Packed:
        """Pack view t of entry. A view covering only part of the region must meet tau on its
        own: checked with the batch while undecided, else the entry is served exactly."""
        packed = Packed(entry, t)
        if t.numel() < entry.region.numel and entry.pinned is None:
            if entry.stored is None:
                entry.views.append(packed)
            elif not entry.stored.is_raw:
                entry.pin(t)  # decided already; the storage is alive now, keep it exact
        return packed

    def _next_slot(self, step: Step) -> str:
        return step.sites.next_site(self._labels.current())

    def _note_width(self, slot: str, site: str) -> None:
        """Bound the trackers of one slot: a site whose row width changes from step to step
        (e.g. attention scores over varying sequence lengths) gets one tracker per width
        ("slot@width"); past WIDTHS_PER_SITE the least recently used one is dropped (its
        entries of this step keep their own reference) and counted in `dropped_sites`."""
        used = self._widths.setdefault(slot, OrderedDict())
        used[site] = None
        used.move_to_end(site)
        while len(used) > WIDTHS_PER_SITE:
            old, _ = used.popitem(last=False)
            if self.trackers.pop(old, None) is not None:
                self.dropped_sites += 1

    def _site_for(self, site: str, width: int) -> tuple[str, LaserConfig | None]:
        tracker = self.trackers.get(site)
        if tracker is not None and tracker.width != width:
            site = f"{site}@{width}"
            tracker = self.trackers.get(site)
        if tracker is not None:
            return site, tracker.cfg
        return site, self.cfg.for_site(site)
