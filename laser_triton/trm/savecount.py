"""Count what autograd saves, per site and per storage, without changing anything.

`SavedTensorCounter` has the shape of a `Laser` as far as the model is concerned (`compress()`,
`role()`, `raw()`, `watch()`), so the plain baseline runs the very same code path and its
activation memory is measured on the same sites: "<role>/<module path>#<k>", where k is the
ordinal of the save within that module in that network call, exactly as LASER names them.

Bytes are counted per storage, once: autograd saves views that share storage (the halves of a
fused gate/up output, a transposed input), and a storage is held once however many views of it
are saved. Parameters are not counted (the model holds them anyway); weight copies made by a
cast are, as are integer tensors and anything else autograd keeps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..eligibility import weight_leaf
from ..sites import ModuleLabels, SiteOrdinals
from ..storage import saved_key, saved_nbytes, storage_key

__all__ = ["SavedTensorCounter"]


@dataclass
class _Site:
    saves: int = 0  # saved tensors (views included)
    storages: int = 0  # distinct storages first saved here
    nbytes: int = 0  # bytes of those storages


@dataclass
class _Scope:
    sites: dict[str, _Site] = field(default_factory=dict)
    seen: set = field(default_factory=set)
    names: SiteOrdinals = field(default_factory=SiteOrdinals)
    saves: int = 0  # every save, parameters included


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter or a view of one (no extra memory), by the same rule as LASER's hooks."""
    if t.layout != torch.strided:
        return False
    if t.grad_fn is None:
        return t.requires_grad
    leaf = weight_leaf(t)
    return leaf is not None and storage_key(leaf) == storage_key(t)


class SavedTensorCounter:
    """Counts saved tensors inside `compress()` scopes (one scope per training step); the last
    finished scope is what `report()` shows."""

    def __init__(self) -> None:
        self._scope: _Scope | None = None
        self._labels = ModuleLabels()
        self.last: dict[str, _Site] = {}
        self.steps = 0
        self.total_saves = 0  # saves (parameters included) in every finished scope

    @contextlib.contextmanager
    def compress(self) -> Iterator[SavedTensorCounter]:
        if self._scope is not None:
            raise RuntimeError("SavedTensorCounter.compress() is already active")
        self._scope = _Scope()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield self
        finally:
            scope, self._scope = self._scope, None
            self.last = scope.sites
            self.steps += 1
            self.total_saves += scope.saves

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[None]:
        scope = self._scope
        if scope is None:
            yield
            return
        scope.names.enter_role(name)
        try:
            yield
        finally:
            scope.names.exit_role()

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        yield  # everything is kept raw here anyway

    def watch(self, model: torch.nn.Module) -> list:
        """Name sites by module path, as `Laser.watch` does."""
        return self._labels.watch(model)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        scope = self._scope
        name = scope.names.next_site(self._labels.current())  # every save takes a slot
        scope.saves += 1
        if _is_parameter(t):
            return t
        site = scope.sites.setdefault(name, _Site())
        site.saves += 1
        key = saved_key(t)
        if key not in scope.seen:
            scope.seen.add(key)
            site.storages += 1
            site.nbytes += saved_nbytes(t)
        return t

    def report(self) -> pd.DataFrame:
        """Per site of the last scope: saves, storages first saved there, their bytes."""
        rows = [{"site": name, "saves": s.saves, "storages": s.storages, "bytes": s.nbytes}
                for name, s in self.last.items()]
        return pd.DataFrame(rows, columns=["site", "saves", "storages", "bytes"])

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.last.values())


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
