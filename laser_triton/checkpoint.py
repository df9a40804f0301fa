"""Saving and restoring a Laser's trackers, so a resumed run follows the same LASER trajectory.

The state is plain tensors and builtins (loadable with `torch.load(..., weights_only=True)`):
per site its name, width, basis, planned shrink, counters, reset back-off and the generator of
its reset sketches. Per-step state (entries, drafts) never outlives a step and is not saved.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING

from .config import LaserConfig
from .tracker import SiteTracker

if TYPE_CHECKING:
    from .hooks import Laser

__all__ = ["STATE_VERSION", "laser_state", "load_laser_state"]

STATE_VERSION = 1


def config_fingerprint(cfg: LaserConfig) -> dict[str, str]:
    return {f.name: repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def laser_state(laser: Laser) -> dict[str, object]:
    return {"version": STATE_VERSION, "config": config_fingerprint(laser.cfg),
            "steps": laser.steps, "warned_nonfinite": laser._warned_nonfinite,
            "sites": [tr.state_dict() for tr in laser.trackers.values()]}


def load_laser_state(laser: Laser, state: dict[str, object]) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError("not a Laser state_dict (or from an incompatible version: "
                         f"{state.get('version') if isinstance(state, dict) else None!r})")
    changed = sorted(k for k, v in config_fingerprint(laser.cfg).items()
                     if state["config"].get(k) != v)
    if changed:
        warnings.warn(f"LASER: state saved under a different LaserConfig ({', '.join(changed)} "
                      "differ); bases are restored but the trajectory will differ",
                      RuntimeWarning, stacklevel=3)
    trackers: dict[str, SiteTracker] = {}
    for st in state["sites"]:
        cfg = laser.cfg.for_site(st["name"])
        if cfg is None:  # excluded under the new config
            continue
        tr = SiteTracker(st["name"], int(st["width"]), cfg, laser._sync)
        tr.load_state_dict(st)
        trackers[tr.name] = tr
    laser.trackers = trackers
    laser.steps = int(state["steps"])
    laser._warned_nonfinite = bool(state["warned_nonfinite"])
    laser._last_sites, laser._last_raw = {}, {}
