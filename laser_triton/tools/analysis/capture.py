"""Record the activations a TRM saves for backward, as LASER sees them (issue 6).

`ActivationRecorder` has the model-facing shape of `laser_triton.Laser` (`compress()`, `role()`,
`raw()`, `watch()`), so a TRM runs its gradient-carrying cycle under it unchanged. It keeps
every tensor exactly as autograd saved it (nothing is compressed) and hands each eligible
storage, once per step, to a callback as LASER's (rows, width) matrix:

- storages, not views: `storage.dense_region` / `region_view` give the same matrix the hooks
  compress (rows = numel / row length, width = the contiguous row length);
- sites are named as the hooks name them, "<role>/<module path>#<ordinal of the save in the
  call>", every save taking a slot, so the names match `Laser.report()`;
- the same exclusions: non-float dtypes, parameters and weight copies, rows narrower than
  `min_width`, fewer rows than `min_rows` (LASER's max_rank), non-dense layouts, anything saved
  inside `raw()`.

The callback also gets the role's call index within the cycle (z: 0..n-1, y: 0): the recursion
step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from laser_triton.eligibility import WatchedModels
from laser_triton.sites import ModuleLabels, SiteOrdinals
from laser_triton.storage import dense_region, region_view, saved_key, storage_key

__all__ = ["ActivationRecorder", "MatrixCallback"]

MatrixCallback = Callable[[str, str, int, torch.Tensor], None]  # (site, role, call, X)


class ActivationRecorder:
    """A pass-through saved-tensor hook that reports LASER's matrices to `on_matrix`."""

    def __init__(self, on_matrix: MatrixCallback, min_width: int = 128, min_rows: int = 1):
        self.on_matrix = on_matrix
        self.min_width = min_width
        self.min_rows = min_rows
        self.labels = ModuleLabels()
        self.watched = WatchedModels()
        self.skipped: dict[str, int] = {}  # reason -> storages not reported
        self._active = False
        self._raw_depth = 0
        self._names = SiteOrdinals()
        self._calls: dict[str, int] = {}
        self._seen: set = set()
        self._site_width: dict[str, int] = {}

    def watch(self, model: torch.nn.Module) -> list:
        """Name sites by module path and exclude the model's weights (as `Laser.watch`)."""
        self.watched.add(model)
        return self.labels.watch(model)

    @contextlib.contextmanager
    def compress(self) -> Iterator[ActivationRecorder]:
        if self._active:
            raise RuntimeError("ActivationRecorder.compress() is already active")
        self._active, self._names = True, SiteOrdinals()
        self.watched.refresh()  # model.to(...) since watch() gave them new storages
        self._calls, self._seen = {}, set()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            self._active, self._seen = False, set()

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[None]:
        if not self._active:
            yield
            return
        self._names.enter_role(name)
        self._calls[name] = self._calls.get(name, -1) + 1
        try:
            yield
        finally:
            self._names.exit_role()

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        if not self._active:
            yield
            return
        self._raw_depth += 1
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack_raw, lambda t: t):
                yield
        finally:
            self._raw_depth -= 1

    def _pack_raw(self, t: torch.Tensor) -> torch.Tensor:
        self._skip(t, "raw()")
        return t

    def _skip(self, t: torch.Tensor, reason: str) -> None:
        key = saved_key(t)
        if key not in self._seen:
            self._seen.add(key)
            self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        role = self._names.role
        site = self._names.next_site(self.labels.current())  # every save takes a slot
        reason = "layout" if t.layout != torch.strided else self.watched.ineligible(t)
        if reason is not None:
            self._skip(t, reason)
            return t
        key = storage_key(t)
        if key in self._seen:
            return t  # one matrix per storage: another view of it was reported already
        region = dense_region(t)
        reason = ("layout" if region is None else "narrow" if region.width < self.min_width
                  else "few rows" if region.rows < self.min_rows else None)
        if reason is not None:
            self._skip(t, reason)
            return t
        self._seen.add(key)
        width = self._site_width.setdefault(site, region.width)
        if width != region.width:
            site = f"{site}@{region.width}"
        with torch.no_grad():
            X = region_view(t, region).clone()
        self.on_matrix(site, role, self._calls.get(role, 0), X)
        return t
