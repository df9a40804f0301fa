"""How saved tensors are named as sites: "<role>/<module path>#<k>" (docs/design.md §3).

One definition for `Laser` and for the tools that must name the same sites without
compressing anything (`capture.ActivationRecorder`, `trm.savecount.SavedTensorCounter`):
- `ModuleLabels`: the module path of the forward being run, per thread, from the hooks that
  `watch(model)` registers;
- `SiteOrdinals`: per step, the stack of roles (network calls) and the ordinal of each save
  within its (role, module path). Every save takes a slot, eligible or not, so the k-th save
  of a call names the same site in every call; entering a role restarts its ordinals, so the
  n applications of one network give the same sites.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["ModuleLabels", "SiteOrdinals"]


class ModuleLabels:
    """Per-thread stack of the module paths whose forward is running (under `watch`)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def stack(self) -> list[str]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def current(self) -> str:
        """The innermost running module's path, "" outside any watched module."""
        stack = self.stack()
        return stack[-1] if stack else ""

    def watch(self, model: torch.nn.Module) -> list:
        """Label every submodule's forward with its path. Returns removable hook handles."""
        handles = []
        for path, module in model.named_modules():
            if not path:
                continue
            handles.append(module.register_forward_pre_hook(self._enter(path)))
            # always_call: the label is popped even when the module's forward raises
            handles.append(module.register_forward_hook(self._exit(path), always_call=True))
        return handles

    def _enter(self, path: str):
        def hook(module, args) -> None:
            self.stack().append(path)
        return hook

    def _exit(self, path: str):
        def hook(module, args, output) -> None:  # must return None: a value replaces output
            stack = self.stack()
            # pop this module's label and any left above it (a hook of another watcher or an
            # older stack that missed its exit); never a label pushed by an enclosing module
            if path in stack:
                del stack[len(stack) - 1 - stack[::-1].index(path):]
        return hook


class SiteOrdinals:
    """The roles and save ordinals of one step (one `compress()` block)."""

    def __init__(self) -> None:
        self.roles: list[str] = ["main"]
        self._next: dict[tuple[str, str], int] = {}

    @property
    def role(self) -> str:
        return self.roles[-1]

    def enter_role(self, name: str) -> None:
        """A network call begins: its saves are numbered from 0 again."""
        self.roles.append(name)
        for key in [k for k in self._next if k[0] == name]:
            del self._next[key]

    def exit_role(self) -> None:
        self.roles.pop()

    def next_site(self, label: str) -> str:
        """The site name of the next save under module path `label` in the current role."""
        role = self.roles[-1]
        k = self._next.get((role, label), 0)
        self._next[(role, label)] = k + 1
        return f"{role}/{label}#{k}"
