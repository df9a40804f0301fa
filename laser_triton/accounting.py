"""Byte accounting and the per-site report of `Laser` (docs/design.md §2.1: bytes per storage)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from .storage import Entry
from .tracker import SiteTracker

__all__ = ["RawCount", "step_bytes", "build_report", "REPORT_COLUMNS"]

REPORT_COLUMNS = ["site", "width", "rank", "tensors", "raw_tensors", "raw_bytes", "stored_bytes",
                  "max_rel_err", "max_row_err", "resets", "raw_fallbacks", "shrinks", "nonfinite"]


@dataclass
class RawCount:
    """Storages kept raw by rule in one step (counted once per storage)."""

    tensors: int = 0
    nbytes: int = 0


def step_bytes(entries: Iterable[Entry],
               site_raw: Mapping[str, RawCount] | None = None) -> dict[str, dict[str, int]]:
    """Per-site bytes of one step: what autograd would have held and what LASER held.

    A storage counts as saved only when it is held compressed; each basis is counted once
    (several entries can share one when a basis update was rejected). `site_raw` adds the
    storages a site kept raw without trying (reset back-off) to that site's row.
    """
    sites: dict[str, dict[str, int]] = {}
    bases: set[int] = set()

    def row_of(site: str) -> dict[str, int]:
        return sites.setdefault(site, {"tensors": 0, "raw_bytes": 0, "stored_bytes": 0,
                                       "raw_tensors": 0})

    for site, c in (site_raw or {}).items():
        row = row_of(site)
        row["tensors"] += c.tensors
        row["raw_tensors"] += c.tensors
        row["raw_bytes"] += c.nbytes
        row["stored_bytes"] += c.nbytes
    for entry in entries:
        row = row_of(entry.site)
        row["tensors"] += 1
        row["raw_bytes"] += entry.raw_bytes()
        row["stored_bytes"] += entry.held_bytes()
        if entry.pinned is not None or entry.stored is None or entry.stored.is_raw:
            row["raw_tensors"] += 1
        elif id(entry.stored.U) not in bases:
            bases.add(id(entry.stored.U))
            row["stored_bytes"] += entry.stored.U.numel() * entry.stored.U.element_size()
    return sites


def build_report(trackers: Mapping[str, SiteTracker], last_sites: Mapping[str, dict],
                 last_raw: Mapping[str, RawCount]) -> pd.DataFrame:
    """The table of `Laser.report()`: per site, then one row per raw-by-rule category."""
    rows = []
    for name, tr in trackers.items():
        s = last_sites.get(name, {})
        rows.append({
            "site": name, "width": tr.width, "rank": tr.rank,
            "tensors": s.get("tensors", 0), "raw_tensors": s.get("raw_tensors", 0),
            "raw_bytes": s.get("raw_bytes", 0), "stored_bytes": s.get("stored_bytes", 0),
            "max_rel_err": _scalar(tr.max_err), "max_row_err": _scalar(tr.max_row_err),
            "resets": tr.resets, "raw_fallbacks": tr.raw_fallbacks, "shrinks": tr.shrinks,
            "nonfinite": tr.nonfinite,
        })
    for cat, c in last_raw.items():
        rows.append({"site": f"(raw: {cat})", "width": 0, "rank": 0, "tensors": c.tensors,
                     "raw_tensors": c.tensors, "raw_bytes": c.nbytes, "stored_bytes": c.nbytes,
                     "max_rel_err": 0.0, "max_row_err": 0.0, "resets": 0,
                     "raw_fallbacks": 0, "shrinks": 0, "nonfinite": 0})
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)


def _scalar(t: torch.Tensor | None) -> float:
    return float("nan") if t is None else float(t)
