"""Saved-tensor hooks do not stack: the innermost `saved_tensors_hooks` context takes every save
of its block. So `Laser.compress()` refuses to run inside another such context (e.g.
`torch.autograd.graph.save_on_cpu`, whose offloading it would silently replace) and refuses one
opened inside it (which would silently take saves from LASER), instead of letting the innermost
win without a word (issue 14)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["top_hooks", "refuse_outer", "refuse_inner"]


def top_hooks() -> tuple[Callable, Callable] | None:
    """The innermost active saved-tensor hooks (pack, unpack) of this thread, or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def refuse_outer() -> None:
    """Raise if a saved-tensor hook context is active here (compress() is about to push its own)."""
    outer = top_hooks()
    if outer is not None:
        raise RuntimeError(
            f"Laser.compress() entered inside another saved-tensor hook context "
            f"({_name(outer[0])}, e.g. torch.autograd.graph.save_on_cpu): LASER's hooks would "
            "silently take every save from it. Saved-tensor hooks do not stack; use one of "
            "them for this forward")


def refuse_inner(own: Sequence[Callable]) -> None:
    """Raise unless the innermost pack hook is one of LASER's own (`own`)."""
    top = top_hooks()
    if top is None or not any(top[0] == fn for fn in own):
        raise RuntimeError(
            f"a saved-tensor hook context ({_name(top[0]) if top else 'none'}, e.g. "
            "torch.autograd.graph.save_on_cpu) is active inside Laser.compress(): it takes "
            "the saves of its block from LASER. Saved-tensor hooks do not stack; use "
            "laser.raw() for a block to keep exact")
