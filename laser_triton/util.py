"""Small device helpers shared by the torch side."""

from __future__ import annotations

import torch

__all__ = ["HostFuture", "to_device_async"]


class HostFuture:
    """Device scalars and small matrices on their way to the host, without blocking.

    On CUDA the values are packed into one fp64 buffer, copied into pinned memory with
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
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        if flat.is_cuda:
            self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._host.copy_(flat, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
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
