"""Counting what LASER's bookkeeping would launch on a GPU, on any device (issue 13).

`LaunchCounter` is a context manager. While it is active, LASER's entry points (the pack and
unpack hooks, the decision points; marked with `counted`) run under a `TorchDispatchMode` that
books:
- every `laser_triton.ops` call as the Triton launches its launcher issues for these shapes
  (`kernels.launch_count`), when the kernels handle them (what `auto` runs on a GPU); the torch
  ops inside are then not counted. Ops the kernels do not handle count their aten ops instead;
- every other aten op as one device launch, except views, metadata and allocations, which
  launch nothing;
- host synchronizations: `.item()`/`bool()`/`float()` of a device value
  (`_local_scalar_dense`), ops whose output size depends on data (`nonzero`, ...), linear
  algebra that checks its status on the host on CUDA (`linalg.eigh`, `linalg.svd`, and the
  non-`_ex` variants that call `_linalg_check_errors`: "synchronizes that device with the
  CPU" in torch's docs), and the waits on a decision batch's event that LASER forces
  (`note_wait`, also counted apart as `decision_waits`).
With `device_behind=True` the counter plays a GPU that never catches up with the host:
LASER's decision points see no batch's values arrived (`device_behind()`), so every wait its
policy forces is counted (on CPU the values are always there at once).
The model's own ops are outside every section and are not counted. Counts are per section;
`forward` is everything LASER does before backward except resets (the slow path that rebuilds a
basis with a range finder, synchronizing; booked under `reset`), `backward` the unpack hook.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCounter", "counted", "booked", "note", "note_wait", "add", "active",
           "device_behind", "note_held"]

F = TypeVar("F", bound=Callable)

_ACTIVE: LaunchCounter | None = None

# Ops that allocate or only change metadata: no kernel runs on the device.
_FREE = {
    "empty", "empty_strided", "empty_like", "set_", "detach", "alias", "lift_fresh",
    "lift_fresh_copy", "_local_scalar_dense", "resize_", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_nonzero", "result_type", "_unsafe_view",
}
# Ops whose output size depends on the data: the host must wait for the device.
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                   "unique_dim"}
# Ops that launch work and then read a status back on the host on CUDA (torch documents
# eigh and svd as synchronizing; the others appear as `_linalg_check_errors`).
_STATUS_CHECKED = {"_linalg_eigh", "_linalg_svd", "_linalg_check_errors", "linalg_eig",
                   "linalg_eigvals"}
BACKWARD = "unpack"
RESET = "reset"  # the slow path (range finder), booked apart from the per-tensor budget


def active() -> LaunchCounter | None:
    """The counter in use, or None (the common case: counting costs one global read)."""
    return _ACTIVE


class _Mode(TorchDispatchMode):
    def __init__(self, counter: LaunchCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        c = self.counter
        if c.booking == 0:
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense":
                c.syncs[c.section] += 1
                c.sync_ops[(c.section, name)] += 1
            elif name in _DATA_DEPENDENT or name in _STATUS_CHECKED:
                c.syncs[c.section] += 1
                c.sync_ops[(c.section, name)] += 1
                c.launches[c.section] += 1
                c.aten[(c.section, name)] += 1
            elif not (func.is_view or name in _FREE):
                c.launches[c.section] += 1
                c.aten[(c.section, name)] += 1
        return func(*args, **(kwargs or {}))


class LaunchCounter:
    """Books LASER's device launches and host synchronizations (see the module docstring)."""

    def __init__(self, device_behind: bool = False) -> None:
        self.device_behind = device_behind
        self.waits = 0  # forced waits on a decision batch's event at a network call's end
        self.final_waits = 0  # ... and when compress() exits (every batch left is decided)
        self.held_peak = 0  # most bytes LASER's drafted entries held at once (note_held)
        self.launches: Counter[str] = Counter()  # section -> device launches
        self.syncs: Counter[str] = Counter()  # section -> host synchronizations
        self.aten: Counter[tuple[str, str]] = Counter()  # (section, aten op) -> launches
        self.sync_ops: Counter[tuple[str, str]] = Counter()  # (section, aten op) -> host syncs
        self.ops: Counter[tuple[str, str]] = Counter()  # (section, ops.* name) -> calls
        self.events: Counter[str] = Counter()  # what LASER noted: "drafted", "rebuild", ...
        self.regions: set[int] = set()  # entries rebuilt in backward (by id)
        self.section = ""
        self.depth = 0
        self.booking = 0
        self._mode: _Mode | None = None

    def __enter__(self) -> LaunchCounter:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a LaunchCounter is already active")
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None

    # ------------------------------------------------------------------ totals

    def forward_launches(self) -> int:
        """Launches before backward, resets excluded (they are counted under RESET)."""
        return sum(n for s, n in self.launches.items() if s not in (BACKWARD, RESET))

    def backward_launches(self) -> int:
        return self.launches[BACKWARD]

    def total_launches(self) -> int:
        return sum(self.launches.values())

    def host_syncs(self) -> int:
        return sum(self.syncs.values())

    def per_saved_forward(self) -> float:
        """Forward launches per saved tensor at a tracked site (compressed, or kept raw by a
        site's reset back-off): the unit of the launch budget. Saves kept raw by rule (weights,
        integers, narrow or short rows, raw()) cost LASER nothing and are not counted."""
        n = self.events["saved"]
        return self.forward_launches() / n if n else float("nan")

    def per_tensor_forward(self) -> float:
        """Forward launches per drafted (compressed) tensor, resets excluded."""
        n = self.events["drafted"]
        return self.forward_launches() / n if n else float("nan")

    def reconstructs_per_region(self) -> float:
        """ops.reconstruct calls in backward per region rebuilt there."""
        n = len(self.regions)
        return self.ops[(BACKWARD, "reconstruct")] / n if n else float("nan")

    def summary(self) -> dict[str, float]:
        return {"launches_fwd_per_saved": self.per_saved_forward(),
                "launches_fwd_per_tensor": self.per_tensor_forward(),
                "launches_fwd": self.forward_launches(), "launches_bwd": self.backward_launches(),
                "launches_reset": self.launches[RESET], "resets": self.events["reset"],
                "launches_per_step": self.total_launches(),
                "reconstructs_per_region": self.reconstructs_per_region(),
                "host_syncs_per_step": self.host_syncs(),
                "host_syncs_reset": self.syncs[RESET], "decision_waits": self.waits,
                "final_waits": self.final_waits,
                "held_peak_bytes": self.held_peak,
                "tensors": self.events["drafted"],
                "saved": self.events["saved"]}


def counted(section: str) -> Callable[[F], F]:
    """Mark a LASER entry point: inside it, the active counter counts under `section`."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            c = _ACTIVE
            if c is None:
                return fn(*args, **kwargs)
            if c.depth > 0:  # nested: a batch closed inside the pack hook, a reset in a poll
                outer, c.section = c.section, section
                try:
                    return fn(*args, **kwargs)
                finally:
                    c.section = outer
            c.depth, c.section = 1, section
            c._mode = _Mode(c)
            try:
                with c._mode:
                    return fn(*args, **kwargs)
            finally:
                c.depth, c.section, c._mode = 0, "", None
        return inner  # type: ignore[return-value]
    return wrap


class booked:
    """Inside a counted section: book one ops.* call as `n` launches (None: count its aten
    ops). A no-op without an active counter."""

    __slots__ = ("name", "n", "c")

    def __init__(self, name: str, n: int | None):
        self.name, self.n, self.c = name, n, _ACTIVE

    def __enter__(self) -> None:
        c = self.c
        if c is None or c.depth == 0:
            return
        c.ops[(c.section, self.name)] += 1
        if self.n is not None:
            if c.booking == 0:
                c.launches[c.section] += self.n
            c.booking += 1

    def __exit__(self, *exc) -> None:
        c = self.c
        if c is not None and c.depth > 0 and self.n is not None:
            c.booking -= 1


def note(event: str, key: object = None) -> None:
    """Record a LASER event (a drafted tensor; a region rebuilt in backward, by `key`)."""
    c = _ACTIVE
    if c is None:
        return
    c.events[event] += 1
    if event == "rebuild" and key is not None:
        c.regions.add(id(key))


def add(n: int) -> None:
    """Book `n` launches that a GPU run issues where this device issues none (a D2H copy)."""
    c = _ACTIVE
    if c is not None and c.depth > 0 and c.booking == 0:
        c.launches[c.section] += n


def note_wait(final: bool = False) -> None:
    """The host waits on a decision batch's event (a stall whenever the GPU is behind):
    mid-forward, at a network call's end, or `final`ly, when compress() exits."""
    c = _ACTIVE
    if c is not None:
        c.syncs[c.section or "decide"] += 1
        if final:
            c.final_waits += 1
        else:
            c.waits += 1


def note_held(nbytes: int) -> None:
    """Bytes the step's drafted entries hold now (undecided ones raw plus coefficients)."""
    c = _ACTIVE
    if c is not None and nbytes > c.held_peak:
        c.held_peak = nbytes


def device_behind() -> bool:
    """True while a `LaunchCounter(device_behind=True)` plays a GPU that has not caught up:
    decision points must treat every batch's values as not arrived yet."""
    c = _ACTIVE
    return c is not None and c.device_behind
