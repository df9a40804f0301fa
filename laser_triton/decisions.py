"""Fidelity decisions of one `compress()` step (docs/design.md §2.8).

Drafted entries are decided in batches, one per network call (or per `batch_size` tensors):
`close_batch` advances the batch's bases in one batched orthonormalization, plans its shrink
checks on the device (one batched eigensolve per rank) and sends the compress passes' scalars
to the host through a `HostFuture`; `poll` computes the errors there (`host_error`) and
finalizes the batches whose values have arrived. Undecided tensors are held raw, so `poll` waits on the
oldest batch's event when more than `decision_lag` batches are outstanding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import launches, ops
from .distributed import LocalSync
from .estimates import batch_error, host_error, plan_shrinks
from .partial_views import (
    batch_products,
    column_view_parts,
    device_view_errors,
    view_error,
    view_errors,
    view_target_scale,
)
from .sites import SiteOrdinals
from .util import HostFuture, mm_fp32, to_device_async

__all__ = ["Step", "close_batch", "poll", "note_drafted"]


@dataclass
class Step:
    """State of one `compress()` context (one training step). Dropped at exit."""

    thread: int
    entries: dict = field(default_factory=dict)  # StorageWeakRef -> Entry
    raw_seen: dict = field(default_factory=dict)  # StorageWeakRef -> category
    raw_counts: dict = field(default_factory=dict)  # category -> RawCount
    site_raw: dict = field(default_factory=dict)  # site -> RawCount kept raw in reset back-off
    batch: list = field(default_factory=list)  # entries drafted since the last decision point
    pending: list = field(default_factory=list)  # (entries, HostFuture, layout) undecided
    sites: SiteOrdinals = field(default_factory=SiteOrdinals)  # roles and save ordinals
    raw_depth: int = 0
    bad_bases: set = field(default_factory=set)  # ids of new bases that failed orthonormality
    # Bytes the step's drafted entries hold: undecided ones their raw region plus C, decided
    # ones what they store (read by a LaunchCounter: its held_peak_bytes).
    held: int = 0


def draft_bytes(entry) -> int:
    """What an undecided entry holds: its raw region (kept for a possible reset) and C."""
    C = entry.draft.C
    return entry.raw_bytes() + (0 if C is None else C.numel() * C.element_size())


def note_drafted(step: Step, entry) -> None:
    step.held += draft_bytes(entry)
    launches.note_held(step.held)


def close_batch(step: Step, sync: LocalSync) -> None:
    """End a decision batch: advance its bases and plan its shrinks in batched calls, and send
    its compress-pass scalars to the host in one non-blocking copy (errors are computed there).
    The device work per batch is a fixed number of launches plus a few per distinct (width,
    rank) and one norm per entry with partial views, whatever the batch's size."""
    batch, step.batch = step.batch, []
    if not batch:
        return
    with torch.no_grad():
        moved = advance_bases(batch, sync)
        for e in batch:
            e.checked_views = len(e.views)  # views saved later are checked when decided
        parts = [e.draft.stats for e in batch]  # (4,) each; HostFuture packs all in one cat
        # Partial views must meet tau on their own: column blocks (gate/up halves) are bounded
        # from the pass's D x r products without a rebuild; other views are rebuilt.
        # Below exact_below every error is measured: the views' too (a rebuild).
        viewed = [i for i, e in enumerate(batch) if e.views and e.draft.C is not None]
        products = batch_products(batch, [i for i in viewed if not batch[i].draft.measured])
        views = []
        for i in viewed:
            e = batch[i]
            cols = products.get(i)
            if cols is None and not e.draft.measured:
                cols = column_view_parts(e)  # column blocks of unequal widths
            views.append((i, cols is not None))
            parts += list(cols) if cols is not None else [view_error(e, e.draft.X)]
        checks = [(e.tracker, e.draft) for e in batch if e.draft.shrink_due]
        plan = None
        if checks:
            Ws, r_new, slot = plan_shrinks(checks, sync)
            parts.append(r_new)
            plan = (Ws, slot)
        if moved is not None:
            parts.append(moved.pop())  # the orthonormalization flags of the new bases
        fails = None
        if sync.active:  # every rank must take the same branch: decide and all-reduce on device
            fails = sync.any(_device_fails(batch, products))
            parts.append(fails)
        step.pending.append((batch, HostFuture(parts), (views, plan, moved, fails is not None)))


def _device_fails(batch: list, products: dict[int, tuple]) -> torch.Tensor:
    """The batch's pass/fail flags on the device (for an all-reduce): `batch_error` over the
    stacked scalars, one upload of the per-draft constants; partial views bounded from the
    batch's products (`device_view_errors`, no rebuild) where they are equal column blocks,
    else rebuilt to check."""
    dev = batch[0].draft.stats.device
    host = torch.tensor([[*e.draft.consts, float(e.draft.measured), e.tracker.cfg.tau]
                         for e in batch], dtype=torch.float64)
    host = to_device_async(host, dev)
    errs = batch_error(torch.stack([e.draft.stats for e in batch]).double(), host[:, :7],
                       host[:, 7] > 0)
    views = [i for i, e in enumerate(batch) if e.views and e.draft.C is not None]
    bounded = sorted(i for i in views if i in products)
    rebuilt = [i for i in views if i not in products]
    worst = []
    if bounded:
        worst.append(device_view_errors(batch, {i: products[i] for i in bounded}))
    if rebuilt:
        worst.append(torch.stack([view_error(batch[i], batch[i].draft.X)
                                  for i in rebuilt]).double())
    if worst:
        at = to_device_async(torch.tensor(bounded + rebuilt), dev)
        worst = worst[0] if len(worst) == 1 else torch.cat(worst)
        errs = errs.index_put((at,), torch.maximum(errs[at], worst))  # NaN propagates: fails
    return ~(errs <= host[:, 8])


def advance_bases(batch: list, sync: LocalSync) -> list | None:
    """Install the next basis of every site that drafted in this batch, from one batched
    orthonormalization of their power products (a planned shrink rotates its product first:
    Y W is the power product of the shrunk basis U W).

    The new bases are used before their `ok` flags reach the host: the flags ride with this
    batch's decisions, and `poll` puts a failed site's previous basis back and fails every
    draft made with the failed one (a reset), so no tensor is stored through it. Returns
    [movers, new bases, previous bases, ok] for that, or None."""
    movers = list({id(e.tracker): e.tracker for e in batch
                   if e.tracker.pending_Y is not None}.values())
    if not movers:
        return None
    Ys, keep = [], []
    for tr in movers:
        Y, U, W = tr.pending_Y, tr.U, tr.pending_shrink
        tr.pending_shrink = None
        if W is not None and W.shape[0] == Y.shape[1]:  # else planned for an older basis
            Y, U = mm_fp32(Y, W), U[:, : W.shape[1]]
            tr.shrinks += 1
        Ys.append(Y)
        keep.append(U)
    Qs, ok = ops.orthonormalize_batched(sync.sum_many(Ys))
    # Each site gets its own storage (one multi-tensor launch, exact: x * 1 == x): bases left
    # as views of one batch buffer would keep it alive whole once some sites reset.
    new = list(torch._foreach_mul(Qs, 1.0))
    for tr, U in zip(movers, new):
        tr.U, tr.pending_Y = U, None
    return [movers, new, keep, ok]


@launches.counted(launches.RESET)
def _verify_views(entry, st):
    """The slow path's view check (after a reset, or for views saved once the batch closed):
    rebuild the region with what is stored and measure each partial view; raw if one misses."""
    entry.stored = st
    if not bool(view_error(entry, entry.draft.X) <= entry.tracker.cfg.tau):
        st = entry.tracker.fallback_raw(entry.draft.X)
    return st


def _restore_failed_bases(step: Step, moved: list, oks: list[float]) -> None:
    """A new basis whose orthonormalization failed (rare): its site goes back to the previous
    basis, and drafts made with it are failed when decided (see `advance_bases`)."""
    movers, new, keep = moved
    for tr, U, U_prev, ok in zip(movers, new, keep, oks):
        if not ok:
            step.bad_bases.add(id(U))
            if tr.U is U:
                tr.U = U_prev.contiguous()


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
        batch, fut, meta = step.pending[0]
        must = block or len(step.pending) > lag
        arrived = fut.ready() and not launches.device_behind()
        if not must and (sync.active or not arrived):
            return
        if must and not arrived:  # the host stalls until the event completes
            launches.note_wait(final=block)
        step.pending.pop(0)
        views, plan, moved, synced = meta
        vals = iter(v.tolist() for v in fut.get())
        stats = [next(vals) for _ in batch]
        view_err = {}
        for i, columns in views:
            if columns:
                d = batch[i].draft
                view_err[i] = view_errors(next(vals) + next(vals), stats[i][1], d.consts, d.scale)
            else:
                view_err[i] = next(vals)
        ranks = next(vals) if plan is not None else None
        if moved is not None:
            _restore_failed_bases(step, moved, next(vals))
        fails = next(vals) if synced else None
        check = 0
        with torch.no_grad():
            for i, entry in enumerate(batch):
                d = entry.draft
                tr = entry.tracker
                err = host_error(stats[i], d.consts, d.measured)
                if i in view_err:  # NaN-safe: a NaN view error fails
                    v = view_err[i]
                    err = v if not (v <= err) else err
                passed = (not fails[i]) if fails is not None else err <= tr.cfg.tau
                if passed and d.U is not None and id(d.U) in step.bad_bases:
                    passed = False  # drafted with a basis whose orthonormalization failed
                rotation = None
                if d.shrink_due:
                    W = plan[0][check]
                    r_new = int(ranks[plan[1][check]])
                    check += 1
                    if r_new < W.shape[1]:
                        rotation = W[:, :r_new]
                # The scale feeds branches inside reset: every rank must use the same one.
                scale = 1.0 if passed else sync.min_float(view_target_scale(entry), d.X.device)
                undecided = draft_bytes(entry)
                st = tr.finalize(d, passed, target_scale=scale, err=err, row_err=stats[i][2],
                                 rotation=rotation)
                # Verify the sub-views against the reset basis, and against the tracked one
                # when views arrived after the batch was closed (a later network call saved a
                # part of this storage while its decision was pending).
                late = len(entry.views) > entry.checked_views
                if entry.views and not st.is_raw and (late or not passed):
                    st = _verify_views(entry, st)
                entry.stored = st
                # Passed: C came from the values as saved. Otherwise X was read now, so
                # values changed in place since the save would reach backward.
                entry.modified = not passed and entry.changed()
                if not st.is_raw and not entry.modified:
                    entry.live = None  # compressed from the saved values: X may go
                entry.draft = None  # drops X unless stored raw
                entry.views = []
                step.held += entry.held_bytes() - undecided
