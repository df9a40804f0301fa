"""LASER's bookkeeping runs eagerly, outside the caller's autocast.

Even when the model around it is compiled whole, the hooks and decision points stay eager
(traced by dynamo they would graph-break on every host decision and recompile per shape and
rank), and they run without the caller's autocast (their fp32 products and error estimates
stay fp32). torch.compiler.disable imports dynamo (and with it sympy and Triton: seconds), so
`eager` only records the function, and the first `Laser` built swaps in the disabled versions
(`disable_compile_on_bookkeeping`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from .util import own_math

__all__ = ["eager", "disable_compile_on_bookkeeping"]

F = TypeVar("F", bound=Callable)

_PENDING: list = []


def eager(fn: F) -> F:
    """Decorator for a module-level function or a method: run it without the caller's
    autocast, and (once a Laser exists) outside torch.compile's tracing."""
    fn = own_math(fn)  # functools.wraps: keeps __module__, __name__ and __qualname__ for the swap
    _PENDING.append(fn)
    return fn


def disable_compile_on_bookkeeping() -> None:
    """Replace every function recorded by `eager` with its torch.compiler.disable'd version,
    where it is defined (its module, or the class its qualified name names)."""
    while _PENDING:
        fn = _PENDING.pop()
        owner = sys.modules[fn.__module__]
        for part in fn.__qualname__.split(".")[:-1]:
            owner = getattr(owner, part)
        setattr(owner, fn.__name__, torch.compiler.disable(fn))
