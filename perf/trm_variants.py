"""The memory-saving variants bench_trm.py compares, built around an unmodified TRM.

Every variant changes only `model.net` (the one network the TRM applies n+1 times per cycle)
or `model.laser`, so the model's own code path (laser_triton/trm) runs unchanged:
- `plain`: nothing;
- `ckpt`: `torch.utils.checkpoint` around each network call (keeps only the call's inputs);
- `sac`: selective activation checkpointing around each call: matmul and attention outputs
  are saved, everything element-wise (norms, SiLU, products, casts) is recomputed;
- `laser_torch`, `laser_triton`: a `laser_triton.Laser` around the gradient-carrying cycle,
  with LASER_TRITON_BACKEND=torch, or =auto on CUDA (the Triton kernels wherever the dispatch
  picks them, as users run it; =triton under the interpreter on CPU); `laser.watch(net)` names
  the sites by module path; the TRM's projections take their weight gradients from LASER's
  (C, U) without rebuilding their inputs where that pays (laser_triton/lowrank.py,
  `lowrank_backward`, on by default);
- `laser_torch_rebuild`, `laser_triton_rebuild`: the same with `lowrank_backward=False`: every
  compressed input is rebuilt in backward (LASER before issue 17);
- `+compile`: the network (or its checkpointing wrapper) under `torch.compile`, with LASER's
  hooks outside it (README "torch.compile").

`LiveBytes` is the CPU stand-in for the CUDA allocator's statistics: it counts the bytes of
tensor storages created while it is active and still alive, by storage, with their peak.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

import laser_triton as lt
from laser_triton.tools.livebytes import LiveBytes  # noqa: F401 - re-exported for trm_run

__all__ = ["BASE_VARIANTS", "CheckpointedNet", "LiveBytes", "Variant", "install_variant",
           "parse_variant", "sac_policy", "state_bytes"]

BASE_VARIANTS = ("plain", "ckpt", "sac", "laser_torch", "laser_triton", "laser_torch_rebuild",
                 "laser_triton_rebuild")
_aten = torch.ops.aten
# Outputs SAC keeps: matrix products and attention (all SDPA backends that exist here).
_SAVE_OPS = {op for op in (
    getattr(_aten, name, None) for name in (
        "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
        "_efficient_attention_forward")) if op is not None}


class Variant:
    """A parsed variant name such as "laser_triton+compile"."""

    def __init__(self, base: str, compiled: bool) -> None:
        if base not in BASE_VARIANTS:
            raise ValueError(f"unknown variant {base!r}; choose from {BASE_VARIANTS} "
                             "(optionally with '+compile')")
        self.base, self.compiled = base, compiled

    @property
    def name(self) -> str:
        return self.base + ("+compile" if self.compiled else "")

    @property
    def laser_backend(self) -> str | None:
        if not self.base.startswith("laser_"):
            return None
        return self.base.removeprefix("laser_").removesuffix("_rebuild")

    @property
    def lowrank_backward(self) -> bool:
        """False for the `_rebuild` variants: LASER rebuilds every input in backward."""
        return not self.base.endswith("_rebuild")

    def __repr__(self) -> str:
        return f"Variant({self.name})"


def parse_variant(name: str) -> Variant:
    base, _, suffix = name.partition("+")
    if suffix not in ("", "compile"):
        raise ValueError(f"variant {name!r}: the only suffix is '+compile'")
    return Variant(base, suffix == "compile")


def sac_policy(ctx, op, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy:
    """Save matmul and attention outputs; recompute the rest (element-wise, cheap)."""
    P = torch.utils.checkpoint.CheckpointPolicy
    packet = getattr(op, "overloadpacket", op)  # the policy sees overloads (aten.mm.default)
    return P.MUST_SAVE if packet in _SAVE_OPS else P.PREFER_RECOMPUTE


class CheckpointedNet(nn.Module):
    """Wraps the TRM's network so each call with gradients is checkpointed (non-reentrant);
    `selective=True` keeps the outputs `sac_policy` names. Calls without grad pass through."""

    def __init__(self, net: nn.Module, selective: bool = False) -> None:
        super().__init__()
        self.net = net
        self.selective = selective

    def forward(self, h: torch.Tensor, injection: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.net(h, injection, cos_sin)
        kwargs = {}
        if self.selective:
            kwargs["context_fn"] = functools.partial(
                torch.utils.checkpoint.create_selective_checkpoint_contexts, sac_policy)
        return torch.utils.checkpoint.checkpoint(self.net, h, injection, cos_sin,
                                                 use_reentrant=False, **kwargs)


def install_variant(model: nn.Module, variant: Variant, laser_cfg: lt.LaserConfig | None = None,
                    compile_backend: str = "inductor") -> lt.Laser | None:
    """Wrap `model.net` / set `model.laser` in place for `variant`; returns the Laser if any."""
    net = model.net
    wrapped: nn.Module = net
    if variant.base in ("ckpt", "sac"):
        wrapped = CheckpointedNet(net, selective=variant.base == "sac")
    laser = None
    if variant.laser_backend is not None:
        cfg = laser_cfg or lt.LaserConfig()
        if not variant.lowrank_backward:
            cfg = dataclasses.replace(cfg, lowrank_backward=False)
        laser = lt.Laser(cfg)
        laser.watch(net)  # before compiling: names sites, tells weights from activations
    model.laser = laser
    if variant.compiled:
        wrapped = torch.compile(wrapped, backend=compile_backend)
    model.net = wrapped
    return laser


def state_bytes(*objs: object) -> int:
    """Bytes of the distinct storages of the tensors in objs (modules, optimizers, dicts...)."""
    seen: set = set()
    total = 0

    def visit(t: torch.Tensor) -> None:
        nonlocal total
        key = StorageWeakRef(t.untyped_storage())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for obj in objs:
        if isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                visit(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for t in tree_leaves(obj.state_dict()["state"]):
                if isinstance(t, torch.Tensor):
                    visit(t)
        else:
            for t in tree_leaves(obj):
                if isinstance(t, torch.Tensor):
                    visit(t)
    return total
