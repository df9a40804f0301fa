"""Saving and restoring a Laser's trackers, so a resumed run follows the same LASER trajectory.

The state is plain tensors and builtins (loadable with `torch.load(..., weights_only=True)`):
per site its name, width, basis, planned shrink, counters, reset back-off and the generator of
its reset sketches. Per-step state (entries, drafts) never outlives a step and is not saved.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from .config import LaserConfig
from .distributed import LocalSync
from .tracker import SiteTracker

__all__ = ["STATE_VERSION", "RestoredState", "laser_state", "load_laser_state"]

STATE_VERSION = 1


def config_fingerprint(cfg: LaserConfig) -> dict[str, str]:
    return {f.name: repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


@dataclass
class RestoredState:
    """What `load_laser_state` rebuilds, for the Laser to adopt."""

    trackers: dict[str, SiteTracker]
    steps: int
    warned_nonfinite: bool


def laser_state(cfg: LaserConfig, trackers: Mapping[str, SiteTracker], steps: int,
                warned_nonfinite: bool) -> dict[str, object]:
    """The state dict of a Laser with config `cfg`, sites `trackers` and `steps` done."""
    return {"version": STATE_VERSION, "config": config_fingerprint(cfg),
            "steps": steps, "warned_nonfinite": warned_nonfinite,
            "sites": [tr.state_dict() for tr in trackers.values()]}


def load_laser_state(state: dict[str, object], cfg: LaserConfig,
                     sync: LocalSync) -> RestoredState:
    """Trackers rebuilt from `state` under `cfg` (warns when it differs from the saved one;
    sites now excluded are dropped), joined to `sync`."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError("not a Laser state_dict (or from an incompatible version: "
                         f"{state.get('version') if isinstance(state, dict) else None!r})")
    changed = sorted(k for k, v in config_fingerprint(cfg).items()
                     if state["config"].get(k) != v)
    if changed:
        warnings.warn(f"LASER: state saved under a different LaserConfig ({', '.join(changed)} "
                      "differ); bases are restored but the trajectory will differ",
                      RuntimeWarning, stacklevel=3)
    trackers: dict[str, SiteTracker] = {}
    for st in state["sites"]:
        site_cfg = cfg.for_site(st["name"])
        if site_cfg is None:  # excluded under the new config
            continue
        tr = SiteTracker(st["name"], int(st["width"]), site_cfg, sync)
        tr.batched = True  # driven by the Laser's batched decision points
        tr.load_state_dict(st)
        trackers[tr.name] = tr
    return RestoredState(trackers, int(state["steps"]), bool(state["warned_nonfinite"]))
