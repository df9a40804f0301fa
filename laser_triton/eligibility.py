"""Which saved tensors LASER may compress (docs/design.md §2.2).

Parameters, views and cast copies of weights, integer tensors, and (without `watch()`)
history-less tensors are kept as they are; `ineligible` names the rule, which `report()`
counts under "(raw: <rule>)".
"""

from __future__ import annotations

import weakref

import torch

from .storage import storage_key
from .validation import FLOAT_DTYPES

__all__ = ["weight_leaf", "WatchedModels", "ineligible"]

# Autograd nodes that only view or cast: a saved tensor whose history reaches a leaf
# (AccumulateGrad) through these alone is a weight copy, e.g. F.linear(x, w.to(bf16)).
_VIEW_CAST_NODES = {
    "ToCopyBackward0", "TBackward0", "TransposeBackward0", "TransposeBackward1",
    "PermuteBackward0", "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0",
    "ExpandBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "SliceBackward0", "SelectBackward0", "AsStridedBackward0",
    "CloneBackward0", "AliasBackward0", "DetachBackward0", "ContiguousBackward0",
    "NarrowBackward0", "SplitBackward0", "UnbindBackward0",
}


def weight_leaf(t: torch.Tensor, max_depth: int = 12) -> torch.Tensor | None:
    """The leaf (parameter) that t derives from through views and casts only, else None."""
    node = t.grad_fn
    for _ in range(max_depth):
        if node is None:
            return None
        name = type(node).__name__
        if name == "AccumulateGrad":
            return node.variable
        if name not in _VIEW_CAST_NODES:
            return None
        nxt = [fn for fn, _ in node.next_functions if fn is not None]
        if len(nxt) != 1:
            return None
        node = nxt[0]
    return None


class WatchedModels:
    """The models given to `watch()`: the storages of their parameters and buffers, and the
    (transposable) shapes of their 2-D weights, re-read by `refresh()` because
    model.to(dtype or device) gives them new storages. Models are held weakly."""

    def __init__(self) -> None:
        self._models: list[weakref.ref] = []
        self.state: set = set()  # storage keys of parameters and buffers
        self.weight_shapes: set = set()  # shapes (and transposes) of 2-D ones

    def add(self, model: torch.nn.Module) -> None:
        self._models.append(weakref.ref(model))
        self.refresh()

    def refresh(self) -> None:
        state, shapes, live = set(), set(), []
        for ref in self._models:
            model = ref()
            if model is None:
                continue
            live.append(ref)
            for t in list(model.parameters()) + list(model.buffers()):
                if t.layout != torch.strided:
                    continue
                state.add(storage_key(t))
                if t.dim() == 2:
                    shapes.update({tuple(t.shape), tuple(t.shape[::-1])})
        self._models, self.state, self.weight_shapes = live, state, shapes

    def ineligible(self, t: torch.Tensor) -> str | None:
        """`ineligible(t, ...)` with these models' facts."""
        return ineligible(t, self.state, self.weight_shapes)


def ineligible(t: torch.Tensor, model_state: set, weight_shapes: set) -> str | None:
    """Why a saved tensor is kept as it is, or None when LASER may compress it (docs/design.md
    §2.2). `model_state`, `weight_shapes`: the storages and (transposable) 2-D shapes of the
    watched models' parameters and buffers, empty without `watch()`.

    "dtype": not floating; "parameter": a parameter or a view of one (no extra memory);
    "leaf": no autograd history and nothing watched, so it cannot be told from a parameter;
    "weight copy": a cast or shaped copy of a weight (history reaching a leaf through views
    and casts only, or, history-less under watch, shaped like a watched weight).
    """
    if t.dtype not in FLOAT_DTYPES:
        return "dtype"
    if t.grad_fn is None:
        if t.requires_grad or storage_key(t) in model_state:
            return "parameter"
        if not model_state:
            return "leaf"
        if t.dim() == 2 and tuple(t.shape) in weight_shapes:
            return "weight copy"
        return None
    leaf = weight_leaf(t)
    if leaf is not None:
        # A view of the parameter itself costs nothing; a cast copy (w.to(bf16)) does.
        return "parameter" if storage_key(leaf) == storage_key(t) else "weight copy"
    return None
