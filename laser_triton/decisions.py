"""Fidelity decisions of one `compress()` step (docs/design.md §2.8).

Drafted entries are decided in batches, one per network call (or per `batch_size` tensors):
`close_batch` advances the batch's bases in one batched orthonormalization and sends the
pass/fail flags (and shrink checks) to the host through a `HostFuture`; `poll` finalizes the
batches whose flags have arrived. Undecided tensors are held raw, so `poll` waits on the
oldest batch's event when more than `decision_lag` batches are outstanding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import launches, ops
from .distributed import LocalSync
from .sites import SiteOrdinals
from .storage import decision_error, view_error, view_target_scale
from .util import HostFuture

__all__ = ["Step", "close_batch", "poll"]


@dataclass
class Step:
    """State of one `compress()` context (one training step). Dropped at exit."""

    thread: int
    entries: dict = field(default_factory=dict)  # StorageWeakRef -> Entry
    raw_seen: dict = field(default_factory=dict)  # StorageWeakRef -> category
    raw_counts: dict = field(default_factory=dict)  # category -> RawCount
    site_raw: dict = field(default_factory=dict)  # site -> RawCount kept raw in reset back-off
    batch: list = field(default_factory=list)  # entries drafted since the last decision point
    pending: list = field(default_factory=list)  # (entries, HostFuture) awaiting decisions
    sites: SiteOrdinals = field(default_factory=SiteOrdinals)  # roles and save ordinals
    raw_depth: int = 0


def close_batch(step: Step, sync: LocalSync) -> None:
    """End a decision batch: advance bases in one batched call; read decisions non-blocking."""
    batch, step.batch = step.batch, []
    if not batch:
        return
    with torch.no_grad():
        movers = list({id(e.tracker): e.tracker for e in batch
                       if e.tracker.pending_Y is not None}.values())
        if movers:
            Ys = sync.sum_many([tr.pending_Y for tr in movers])
            Qs, ok = ops.orthonormalize_batched(Ys)
            for i, tr in enumerate(movers):
                tr.apply_pending(Qs[i], ok[i])
        for e in batch:
            e.checked_views = len(e.views)  # views saved later are checked when decided
        fails = torch.stack([~(decision_error(e) <= e.tracker.cfg.tau) for e in batch])
        fails = sync.any(fails)  # with sync_basis, one rank's miss resets all ranks
        shrink = []
        for e in batch:
            if e.draft.shrink_gram is not None:
                shrink += [e.draft.shrink_gram, e.draft.e_X]
        step.pending.append((batch, HostFuture([fails.float(), *sync.sum_many(shrink)])))


def poll(step: Step, block: bool, lag: int, sync: LocalSync | None = None) -> None:
    """Finalize every batch whose decisions have reached the host (all, if block). Wait for
    the oldest while more than `lag` batches are outstanding: their tensors are held raw
    until decided, and a host far ahead of the GPU would otherwise hold the whole step's
    activations.

    With a distributed sync, finalizing may start collectives (a reset's all-reduces), so
    which batches finalize must not depend on when this rank's copy arrived: only the count
    of outstanding batches decides (identical on every rank), never `ready()`."""
    sync = LocalSync() if sync is None else sync
    while step.pending:
        batch, fut = step.pending[0]
        must = block or len(step.pending) > lag
        if not must and (sync.active or not fut.ready()):
            return
        if must:
            launches.note_wait()  # on a GPU: a stall unless the event has completed
        step.pending.pop(0)
        fails, *extra = fut.get()
        extra = iter(extra)
        with torch.no_grad():
            for entry, failed in zip(batch, fails.tolist()):
                d = entry.draft
                shrink = None
                if d.shrink_gram is not None:
                    shrink = (next(extra), float(next(extra)))
                passed = not failed
                # The scale feeds branches inside reset: every rank must use the same one.
                scale = 1.0 if passed else sync.min_float(view_target_scale(entry), d.X.device)
                st = entry.tracker.finalize(d, passed, shrink, scale)
                # Verify the sub-views against the reset basis, and against the tracked one
                # when views arrived after the batch was closed (a later network call saved a
                # part of this storage while its decision was pending).
                late = len(entry.views) > entry.checked_views
                if entry.views and not st.is_raw and (late or not passed):
                    entry.stored = st
                    if not bool(view_error(entry, d.X) <= entry.tracker.cfg.tau):
                        st = entry.tracker.fallback_raw(d.X)
                entry.stored = st
                # Passed: C came from the values as saved. Otherwise X was read now, so
                # values changed in place since the save would reach backward.
                entry.modified = not passed and entry.changed()
                if not st.is_raw and not entry.modified:
                    entry.live = None  # compressed from the saved values: X may go
                entry.draft = None  # drops X unless stored raw
                entry.views = []
