"""Small device helpers shared by the torch side.

Rules every CUDA interaction of LASER follows (README, "GPU"):
- device: kernels launch and events are recorded under `device_guard(tensor.device)`, never on
  whatever device happens to be current (Triton launches on the current device; a DDP rank
  that forgot `set_device` would otherwise run rank 1's tensors on GPU 0);
- stream: an event is recorded on the current stream *of the tensor's device*, the stream
  the copies it guards were issued on;
- arithmetic: LASER's own math runs under `own_math`, without the caller's autocast, and its
  fp32 products use `mm_fp32`, which does not let a TF32 setting (old or new API) in.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from . import launches

__all__ = ["HostFuture", "to_device_async", "device_guard", "record_event", "own_math",
           "no_autocast", "reduced_fp32_matmul", "mm_fp32"]

F = TypeVar("F", bound=Callable)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.cuda.device(device)` for a CUDA device (launches and events go there), else a
    no-op."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def record_event(device: torch.device):
    """A CUDA event recorded on `device`'s current stream (not the current device's)."""
    device = torch.device(device)
    with device_guard(device):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
    return event


def _autocast_devices() -> list[str]:
    kinds = ["cpu"]
    if torch.cuda.is_available():
        kinds.append("cuda")
    return [k for k in kinds if torch.is_autocast_enabled(k)]


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Autocast off for every device type where the caller turned it on."""
    with contextlib.ExitStack() as stack:
        for kind in _autocast_devices():
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def own_math(fn: F) -> F:
    """Decorator: run `fn` (a hook or decision step) without the caller's autocast, so LASER's
    fp32 products, norms and error estimates stay fp32 inside a user's bf16 autocast region."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _autocast_devices():
            return fn(*args, **kwargs)
        with no_autocast():
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def reduced_fp32_matmul(device: torch.device) -> bool:
    """Whether an fp32 matmul on `device` may run at reduced precision (TF32 on CUDA, bf16 /
    TF32 on CPU's oneDNN) under the caller's settings. Reads the new API
    (`torch.backends[.cuda|.mkldnn].matmul.fp32_precision`) and the legacy flags; a mix of the
    two makes torch raise on reading, which counts as "may be reduced"."""
    kind = torch.device(device).type
    backend = torch.backends.cuda if kind == "cuda" else getattr(torch.backends, "mkldnn", None)
    try:
        local = getattr(getattr(backend, "matmul", None), "fp32_precision", "none")
        effective = local if local != "none" else getattr(torch.backends, "fp32_precision",
                                                          "none")
        if effective not in ("none", "ieee"):
            return True
        if kind == "cuda":
            return bool(torch.backends.cuda.matmul.allow_tf32)
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # torch refuses to read a setting made with both APIs
        return True


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 a @ b at full fp32 accuracy whatever the TF32/precision settings: in fp64 when
    the caller's settings may reduce it (a TF32 basis is only ~1e-3 accurate, docs/design.md §6.4)."""
    if a.dtype == torch.float32 and reduced_fp32_matmul(a.device):
        return (a.double() @ b.double()).float()
    return a @ b


class HostFuture:
    """Device scalars and small matrices on their way to the host, without blocking.

    On CUDA the values are packed into one buffer (one cat, fp32 or fp64 as the inputs
    promote; integers and flags exactly representable), copied into pinned memory with
    non_blocking=True and followed by an event: `ready()` polls the event, `get()` waits on it
    (cudaEventSynchronize, not a stream or device sync). On CPU everything is ready at once.
    `get()` returns the values as host tensors in the order given.
    """

    def __init__(self, tensors: list[torch.Tensor]):
        self._shapes = [tuple(t.shape) for t in tensors]
        self._event = None
        if not tensors:
            self._host = torch.zeros(0, dtype=torch.float64)
            return
        parts = [t.detach().reshape(-1) for t in tensors]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)  # one launch; promotes dtypes
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.double()
        if not flat.is_cuda:
            launches.add(1)  # the device-to-host copy a GPU run issues here
        if flat.is_cuda:
            self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            with device_guard(flat.device):
                self._host.copy_(flat, non_blocking=True)
            self._event = record_event(flat.device)  # the copy's stream, flat's device
        else:
            self._host = flat

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def get(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
        out, i = [], 0
        for shape in self._shapes:
            n = 1
            for s in shape:
                n *= s
            out.append(self._host[i:i + n].view(shape))
            i += n
        return out


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to `device` without a synchronizing copy (pinned, non-blocking on CUDA)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
