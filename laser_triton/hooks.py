"""Autograd integration: `Laser.compress()`, `role()`, `raw()`, `report()` (docs/design.md §3, §5).

Inside `compress()`, every tensor that autograd saves for backward goes through `_pack`
(`packing.PackHooks`, which `Laser` inherits):
- ineligible tensors (integer/bool, weights and weight copies, narrow rows, too few rows,
  non-dense layouts, anything saved inside `raw()`) are kept as they are and counted;
- eligible storages are compressed once per step by their site's `SiteTracker`; the site is
  the role (one network call) plus the ordinal of the storage within that call, so the same
  network applied n times gives one site per saved tensor, tracked across recursion steps.

Fidelity decisions are read on the host once per network call (or per `batch_size` tensors)
through a non-blocking copy, so the hot path never synchronizes per tensor. Undecided tensors
keep their raw values until decided; decided ones drop them. At `compress()` exit every
decision is resolved, so backward always sees final values.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator

import pandas as pd
import torch

from . import checkpoint, hookstack, launches, lowrank
from .accounting import RawCount, build_report, step_bytes
from .config import LaserConfig
from .decisions import Step, close_batch, poll
from .distributed import LocalSync, make_sync
from .eager import disable_compile_on_bookkeeping, eager
from .eligibility import WatchedModels
from .packing import WIDTHS_PER_SITE, PackHooks
from .sites import ModuleLabels
from .storage import Packed, RawSaved
from .tracker import SiteTracker

__all__ = ["Laser", "WIDTHS_PER_SITE"]


class Laser(PackHooks):
    """LASER for one model: per-site low-rank trackers that live across training steps.

    Inside `compress()`, every activation autograd saves for backward is stored as
    coefficients C = X U in a per-site orthonormal basis U and rebuilt as C U^T in backward,
    with ||X - X_hat|| <= tau ||X|| for every rebuilt tensor (or X kept exactly). Weights,
    integer tensors, narrow or short tensors and anything saved inside `raw()` are kept as
    they are (docs/design.md §2, §3)::

        laser = Laser(LaserConfig(tau=0.05))
        laser.watch(model)                  # optional: module-path site names
        with laser.compress():
            for _ in range(n):
                with laser.role("z"):       # one network call; sites are per role
                    z = net(z, y + x)
            with laser.role("y"):
                y = net(y, z)
            loss = head(y)
        loss.backward()
        laser.report()                      # bytes, ranks and errors per site

    Warning:
        - One thread per Laser: saved-tensor hooks are thread-local, and `compress()` raises
          RuntimeError if this Laser is already active (nested, or in another thread).
          Different threads may each use their own Laser.
        - Run SDPA (and any op whose backward reuses exact saved statistics) inside `raw()`:
          lossy q and k make the softmax inconsistent with its saved logsumexp.
        - `tau` (LaserConfig) bounds each stored activation's relative error, not the
          gradients' (those land at a small multiple of tau in the tests).
        - Do not compile a function that contains `compress()` with `fullgraph=True`: LASER's
          hooks run eagerly (torch.compiler.disable), so each decision point is a graph
          break. Compile the network and call `watch(model)` first.
        - In-place rule: a saved tensor modified in place must not feed backward. LASER raises
          autograd's "modified by an inplace operation" error wherever it would serve the
          modified values; a tensor already held compressed is rebuilt from the values as
          saved, unless its storage was saved again after the change (then it raises, as
          plain autograd does).
        - `state_dict()` / `load_state_dict()` only between steps.
        - Saved-tensor hooks do not stack (the innermost context takes every save):
          `compress()` raises inside `torch.autograd.graph.save_on_cpu` or any other such
          context, and raises when it finds one active inside it (checked at `role()` entry
          and exit and at the end of `compress()`).
    """

    def __init__(self, cfg: LaserConfig | None = None):
        disable_compile_on_bookkeeping()
        self.cfg = cfg or LaserConfig()
        if not isinstance(self.cfg, LaserConfig):
            raise TypeError(f"Laser expects a LaserConfig, got {type(self.cfg).__name__}")
        self.trackers: dict[str, SiteTracker] = {}
        self._step: Step | None = None
        self._lock = threading.Lock()
        self._labels = ModuleLabels()
        self._last_sites: dict[str, dict] = {}
        self._last_raw: dict[str, RawCount] = {}
        self.steps = 0
        self._warned_nonfinite = False
        self._sync = LocalSync()
        self._widths: dict[str, OrderedDict] = {}  # slot -> its trackers' names, LRU order
        self.dropped_sites = 0  # trackers dropped by the per-slot width bound
        self._watched = WatchedModels()  # parameters and buffers of the models given to watch()

    # ------------------------------------------------------------------ contexts

    @contextlib.contextmanager
    def compress(self) -> Iterator[Laser]:
        """Compress what autograd saves inside this block: one training step's forward.

        Saved tensors are drafted on the device and their fidelity decisions read once per
        network call (`role()` exit) or per `batch_size` tensors, without a host
        synchronization per tensor; undecided tensors are held raw meanwhile. At exit every
        decision is resolved, so backward after the block sees final values (inside it, still
        undecided tensors are served exactly), and `report()` describes this step. With
        tau == 0 (and no site override with tau > 0) no hooks are installed at all.
        If the body raises, what can be settled is settled and the exception propagates.

        Warning:
            - Every tensor rebuilt in backward is within `tau` (relative Frobenius error) of
              the values saved, or exact; gradients are not bounded by tau (in practice a
              small multiple of it).
            - Raises RuntimeError when this Laser is already active (nested, or from another
              thread): one `compress()` per step, one Laser per thread.
            - Run SDPA / attention inside `raw()`: its backward needs exact q, k.
            - Not for use inside a `torch.compile(fullgraph=True)` function (its decision
              points are graph breaks): compile the network inside it instead.
            - A tensor saved here and then modified in place raises autograd's in-place error
              in backward instead of feeding it.
        """
        with self._lock:
            if self._step is not None:
                raise RuntimeError(
                    "Laser.compress() is already active (nested, or in another thread); "
                    "use one compress() per step and one Laser per thread")
            if self.cfg.enabled:
                hookstack.refuse_outer()
            if self.cfg.sync_basis and not self._sync.active:
                self._sync = make_sync(True)
                for tr in self.trackers.values():  # restored before the first step
                    tr.sync = self._sync
            self._step = Step(thread=threading.get_ident())
            self._watched.refresh()  # model.to(...) since watch() gave them new storages
        try:
            if not self.cfg.enabled:
                yield self
            else:
                with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack), \
                        lowrank.serving(self.cfg.lowrank_backward):
                    yield self
                    self._check_no_inner_hooks(self._step)
        except BaseException:
            step, self._step = self._step, None
            try:  # settle what can be settled, but never mask the body's exception
                self._finish(step)
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"LASER: cleanup after an interrupted step failed: {exc!r}",
                              RuntimeWarning, stacklevel=3)
            raise
        step, self._step = self._step, None
        self._finish(step)

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[None]:
        """Tag one network call: its saves belong to sites "name/<label>#k", k being the
        ordinal of the save within the call (label: the module path under `watch`).

        Each entry restarts the ordinals of `name`, so the n applications of one network give
        the same sites and their bases are tracked across recursion steps. At exit, the call's
        fidelity decisions are sent to the host (a decision point). A no-op outside
        `compress()` (or from another thread). `name` must be non-empty and contain no '/'.

        Warning:
            - One thread per Laser: entered from a thread other than the one running
              `compress()` it is a no-op, and that thread's saves are not compressed.
            - Entry and exit are decision points, run eagerly: do not trace them with
              `torch.compile(fullgraph=True)`; the network called inside may be compiled.
            - The rules of `compress()` hold inside (SDPA in `raw()`, the in-place rule).
        """
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"role name must be a non-empty string without '/', got {name!r}")
        step = self._active_step()
        if step is None:
            yield
            return
        self._check_no_inner_hooks(step)
        step.sites.enter_role(name)
        try:
            yield
        finally:
            step.sites.exit_role()
            self._close_batch(step)
            self._poll(step, block=False)
        self._check_no_inner_hooks(step)

    @eager
    def _check_no_inner_hooks(self, step: Step) -> None:
        """Checked at role() entry and exit and at the end of compress(), so a context opened
        and closed between two of these points (inside one network call) is not seen."""
        if self.cfg.enabled:
            hookstack.refuse_inner((self._pack, self._pack_raw) if step.raw_depth else
                                   (self._pack,))

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        """Innermost pass-through: tensors saved inside are kept exactly and counted under
        "(raw: raw())" in `report()`.

        Warning:
            - Run SDPA / attention here (or save only its input and recompute it, as the TRM
              does): its backward uses the exact saved logsumexp, and rebuilt (lossy) q and k
              make the softmax inconsistent with it, with dq errors several times tau.
            - Innermost only: saved-tensor hooks do not stack, so a hooks context opened inside
              `raw()` takes its saves (`compress()` raises when it finds one still open at a
              `role()` boundary or at its end).
            - One thread per Laser: from another thread it is a no-op.
        """
        step = self._active_step()
        if step is None or not self.cfg.enabled:
            yield
            return
        step.raw_depth += 1
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack_raw, _unpack):
                yield
        finally:
            step.raw_depth -= 1

    def watch(self, model: torch.nn.Module) -> list:
        """Tell LASER about the model. Returns removable hook handles.

        Call it before compiling the model: activations saved inside torch.compile'd regions
        carry no autograd history, and without watch() LASER cannot tell them from the
        model's parameters, so it keeps them raw.

        - Sites are named by module path ("z/blocks.0.mlp.down_proj#0").
        - Its parameters and buffers are never compressed, and saved tensors without autograd
          history (as inside torch.compile'd regions, where activations are saved by one
          compiled Function) become eligible, except those shaped like a watched weight
          (compiled weight casts). Without watch(), such tensors are kept raw ("leaf").

        Warning:
            - Compile the network after `watch()`; never compile a function holding
              `compress()` with `fullgraph=True`: LASER's hooks run eagerly (graph breaks).
            - Call it again after replacing the model; parameters moved with `model.to()` are
              re-read at each `compress()` entry.
        """
        self._watched.add(model)
        return self._labels.watch(model)

    # ------------------------------------------------------------------ decisions

    @eager
    @launches.counted("decide")
    def _close_batch(self, step: Step) -> None:
        close_batch(step, self._sync)

    @eager
    @launches.counted("decide")
    def _poll(self, step: Step, block: bool) -> None:
        poll(step, block, self.cfg.decision_lag, self._sync)

    @eager
    @launches.counted("finish")
    def _finish(self, step: Step | None) -> None:
        if step is None:
            return
        self._close_batch(step)
        self._poll(step, block=True)
        self.steps += 1
        self._last_sites = step_bytes(step.entries.values(), step.site_raw)
        self._last_raw = dict(step.raw_counts)
        if not self._warned_nonfinite:
            bad = [tr.name for tr in self.trackers.values() if tr.nonfinite]
            if bad:
                self._warned_nonfinite = True
                warnings.warn(f"LASER: non-finite activations at {len(bad)} site(s) (first: "
                              f"{bad[0]}) were stored raw; see report().nonfinite", RuntimeWarning,
                              stacklevel=3)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, object]:
        """The trackers' state (bases, counters, sketch generators), to resume training with
        the same LASER trajectory. Call between steps; tensors are not copied."""
        if self._step is not None:
            raise RuntimeError("Laser.state_dict() inside compress(): call it between steps")
        return checkpoint.laser_state(self.cfg, self.trackers, self.steps, self._warned_nonfinite)

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a state_dict(): replaces every tracker. Bases move to the activations' device
        on first use. A state saved under another LaserConfig loads with a warning (sites now
        excluded are dropped; bases above the new max_rank restart with a reset)."""
        if self._step is not None:
            raise RuntimeError("Laser.load_state_dict() inside compress(): call it between steps")
        restored = checkpoint.load_laser_state(state, self.cfg, self._sync)
        self.trackers = restored.trackers
        self._widths = {}
        for name in self.trackers:  # "slot@width" names belong to their slot's bound
            self._widths.setdefault(re.sub(r"@\d+$", "", name), OrderedDict())[name] = None
        self.steps = restored.steps
        self._warned_nonfinite = restored.warned_nonfinite
        self._last_sites, self._last_raw = {}, {}

    # ------------------------------------------------------------------ reporting

    def report(self) -> pd.DataFrame:
        """Per-site table for the last step, plus cumulative errors, resets and fallbacks.

        Bytes are those of the last `compress()` step: raw_bytes what autograd would have held,
        stored_bytes what LASER held (coefficients, bases counted once each, raw fallbacks).
        Rows named "(raw: ...)" count tensors kept raw by rule, per storage.
        """
        return build_report(self.trackers, self._last_sites, self._last_raw)

    def summary(self) -> dict[str, float]:
        """Totals of the last step: raw and stored bytes and their ratio."""
        df = self.report()
        raw, stored = int(df.raw_bytes.sum()), int(df.stored_bytes.sum())
        return {"raw_bytes": raw, "stored_bytes": stored,
                "ratio": stored / raw if raw else 1.0, "sites": int((df.width > 0).sum()),
                "dropped_sites": self.dropped_sites}


@eager
@launches.counted(launches.BACKWARD)
def _unpack(p):
    served = lowrank.serve(p)  # (C, U) for a lowrank.linear backward that asked for it
    if served is not None:
        return served
    if isinstance(p, Packed):
        with torch.no_grad():
            return p.unpack()
    if isinstance(p, RawSaved):
        return p.unpack()
    return p

