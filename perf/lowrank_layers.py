"""Per-layer view of one TRM backward under LASER (used by perf/bench_lowrank.py): for every
linear layer and lean RMSNorm that can work from (C, U) (laser_triton/lowrank.py), what its saved
input was (held compressed at rank r of width D, or why not), whether it was served, and the
flops of its X-dependent part both ways:

- linear, rows (x: n rows of width K = D): rebuild path 2 n D r (X_hat = C U^T) + 2 n out D
  (G^T X_hat), from (C, U) 2 n out r + 2 out r D;
- linear, mlp_t's column view (x: (B, D, L), L = K contracted, region (B L, D)): rebuild
  2 B L D r + 2 B D out L, from (C, U) 2 B D out r + 2 B L out r;
- lean RMSNorm (output y, N rows of width D as held): rebuild 2 N D r, from (C, U) 4 N D r
  (dy U and the product accumulated into dx; element-wise terms left out both ways).

A compressed input that is not served (the product does not pay, or a rebuild is alive) costs
the rebuild path's flops. Everything is read from outside the package: the layer is the autograd
node whose backward asks (matched to the module that made it in forward), the saved tensor is
what the unpack hook was handed, the outcome is what `lowrank.served_input()` holds after it.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter, defaultdict

import torch

from laser_triton import lowrank, storage
from laser_triton.storage import Packed
from laser_triton.tools.livebytes import LiveBytes
from laser_triton.trm.layers import CastedLinear

__all__ = ["LayerTable", "PeakAt"]


def _short(name: str) -> str:
    return re.sub(r"^(blocks\.\d+\.)", "", name)  # aggregate over blocks (and cycles)


class LayerTable:
    """Active around one forward and its backward. `rows()` -> one dict per layer name."""

    def __init__(self, model: torch.nn.Module, laser) -> None:
        self.model, self.laser = model, laser
        self.labels: dict[object, tuple[str, int]] = {}  # grad_fn -> (name, out features)
        self.calls: list[dict] = []
        self.raw_why: dict[int, str] = {}  # id(RawSaved) -> LASER's rule category
        self.served_entries: set[int] = set()
        self.rebuilt_entries: set[int] = set()
        self._stack: list[list] = []
        self._undo: list = []

    def __enter__(self) -> LayerTable:
        for name, m in self.model.named_modules():
            if isinstance(m, CastedLinear):
                self._undo.append(m.register_forward_hook(self._linear_hook(_short(name))).remove)
        orig = (lowrank.rms_norm, lowrank.request, lowrank.serve, storage.Entry.matrix)
        norm, request, serve, matrix = orig

        def labelled_norm(x, eps):
            y = norm(x, eps)
            self.labels[y.grad_fn] = (f"rms_norm (lean, width {y.shape[-1]})", 0)
            return y

        @contextlib.contextmanager
        def watched_request(index, accept):
            node = torch._C._current_autograd_node()
            seen: list = []
            self._stack.append(seen)
            try:
                with request(index, accept) as req:
                    yield req
            finally:
                self._stack.pop()
                if index < len(seen):
                    self._note(node, seen[index], req.handle)

        def watched_serve(p):
            if self._stack:
                self._stack[-1].append(p)
            out = serve(p)
            if out is not None:
                self.served_entries.add(id(p.entry))
            return out

        def watched_matrix(entry):
            st = entry.stored
            if st is not None and st.raw is None and entry.pinned is None and entry.rebuilt() is None:
                self.rebuilt_entries.add(id(entry))
            return matrix(entry)

        count_raw = self.laser._count_raw

        def noted_count_raw(step, t, category, site=None):
            out = count_raw(step, t, category, site)
            self.raw_why[id(out)] = category
            return out

        lowrank.rms_norm, lowrank.request, lowrank.serve = labelled_norm, watched_request, watched_serve
        storage.Entry.matrix = watched_matrix
        self.laser._count_raw = noted_count_raw

        def undo():
            lowrank.rms_norm, lowrank.request, lowrank.serve, storage.Entry.matrix = orig
            del self.laser._count_raw  # back to the class's method

        self._undo.append(undo)
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()
        self.labels.clear()

    def _linear_hook(self, name: str):
        def hook(m, inp, out):
            if out.grad_fn is not None:
                self.labels[out.grad_fn] = (name, m.weight.shape[0])
        return hook

    def _note(self, node, p, handle) -> None:
        name, out = self.labels.get(node, ("(unlabelled)", 0))
        kind = "norm" if out == 0 else "linear"
        lr, why = lowrank.classify(p)
        if isinstance(p, Packed):
            size, width = p.size, p.entry.region.width
        else:
            t = p.t if hasattr(p, "t") else p
            size, width = tuple(t.shape), t.shape[-1]
            why = self.raw_why.get(id(p), why)
        rec = dict(name=name, kind=kind, out=out, size=size, width=width, r=None,
                   served=handle is not None, why="served" if handle is not None else why,
                   low=0.0, full=0.0)
        if lr is not None:
            if handle is None:
                rec["why"] = "does not pay" if kind == "linear" else "rebuild alive"
            rec["r"] = r = lr.U.shape[1]
            full, low = _flops(kind, lr, out, r)
            rec["full"], rec["low"] = full, (low if handle is not None else full)
        self.calls.append(rec)

    def norms_served(self) -> int:
        return sum(c["served"] for c in self.calls if c["kind"] == "norm")

    def served_rebuilt(self) -> int:
        """Served entries that some other unpack rebuilt anyway."""
        return len(self.served_entries & self.rebuilt_entries)

    def rows(self) -> list[dict]:
        by: dict[str, list[dict]] = defaultdict(list)
        for c in self.calls:
            by[c["name"]].append(c)
        out = []
        for name, cs in by.items():
            comp = [c for c in cs if c["r"] is not None]
            full, low = sum(c["full"] for c in comp), sum(c["low"] for c in comp)
            why = Counter(c["why"] for c in cs)
            width = cs[0]["width"]
            mean_r = sum(c["r"] for c in comp) / len(comp) if comp else math.nan
            out.append(dict(layer=name, kind=cs[0]["kind"], calls=len(cs), shape="x".join(
                map(str, cs[0]["size"])), width=width, out=cs[0]["out"] or None,
                compressed=len(comp), served=sum(c["served"] for c in cs), mean_rank=mean_r,
                rank_over_width=mean_r / width, gflop_rebuild=full / 1e9,
                gflop_lowrank=low / 1e9, flop_ratio=low / full if full else math.nan,
                outcomes="; ".join(f"{k} {v}" for k, v in why.most_common())))
        return out


def _flops(kind: str, lr: lowrank.LowRankInput, out: int, r: int) -> tuple[float, float]:
    """(rebuild path, from (C, U)) flops of the X-dependent part (module docstring)."""
    if kind == "norm":
        nd = math.prod(lr.shape)
        return 2.0 * nd * r, 4.0 * nd * r
    if lr.layout == "rows":
        n, D = math.prod(lr.shape[:-1]), lr.shape[-1]
        return 2.0 * n * D * r + 2.0 * n * out * D, 2.0 * n * out * r + 2.0 * out * r * D
    B, D, L = lr.shape
    return (2.0 * B * L * D * r + 2.0 * B * D * out * L,
            2.0 * B * D * out * r + 2.0 * B * L * out * r)


class PeakAt(LiveBytes):
    """LiveBytes that also names the autograd node running at the peak, and, per custom
    Function node name in `watch`, the most bytes one such node's backward added above what was
    alive when it started (its rebuilds and temporaries): e.g. "_LinearBackward" shows whether
    a linear layer's backward materialized its N x D input."""

    def __init__(self, watch: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.node = ""
        self.watch = watch
        self.added: dict[str, int] = {}
        self._current = None  # the watched node running now (custom Functions keep identity)
        self._base = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        name = node.name() if node is not None else ""
        if name in self.watch and node is not self._current:
            self._current, self._base = node, self.live()
        before = self.peak
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.peak > before:
            self.node = name or "(engine)"
        if name in self.watch:
            self.added[name] = max(self.added.get(name, 0), self.live() - self._base)
        return out
