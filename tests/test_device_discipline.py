"""Device and stream discipline, checked with mocks (no CUDA needed).

Triton launches on the *current* CUDA device and `torch.cuda.Event().record()` records on the
current device's stream. A rank whose tensors live on cuda:1 while cuda:0 is current would
launch kernels with cuda:1 pointers on GPU 0 and read stale decision flags. Every launch and
event must therefore run under the tensor's device, on that device's current stream.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from laser_triton import ops, util

CUDA1 = torch.device("cuda", 1)


class _GuardLog:
    """Stands in for torch.cuda.device: records which device each guard was entered with."""

    def __init__(self):
        self.entered, self.depth = [], 0

    def __call__(self, device):
        log = self

        @contextlib.contextmanager
        def guard():
            log.entered.append(torch.device(device))
            log.depth += 1
            try:
                yield
            finally:
                log.depth -= 1
        return guard()


def test_device_guard_enters_the_cuda_device_and_nothing_for_cpu(monkeypatch):
    log = _GuardLog()
    monkeypatch.setattr(torch.cuda, "device", log)
    with util.device_guard(CUDA1):
        assert log.depth == 1
    with util.device_guard(torch.device("cpu")):
        pass
    assert log.entered == [CUDA1]


def test_event_recorded_on_the_tensors_device_current_stream(monkeypatch):
    log = _GuardLog()
    recorded = []

    class FakeEvent:
        def record(self, stream=None):
            recorded.append((stream, log.depth, log.entered[-1]))

    monkeypatch.setattr(torch.cuda, "device", log)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream", device))
    util.record_event(CUDA1)
    # Recorded explicitly on cuda:1's current stream, inside a cuda:1 guard.
    assert recorded == [(("stream", CUDA1), 1, CUDA1)]


class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports cuda:1, to drive HostFuture's CUDA branch without a GPU."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return CUDA1


def test_host_future_copies_and_records_under_the_tensors_device(monkeypatch):
    log = _GuardLog()
    events = []
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):  # no pinned memory without CUDA
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "device", log)
    monkeypatch.setattr(util.torch, "empty", empty)
    monkeypatch.setattr(util, "record_event",
                        lambda device: events.append(torch.device(device)) or None)
    fut = util.HostFuture([torch.tensor([1.0, 2.0]).as_subclass(_OnCuda1)])
    assert log.entered == [CUDA1] and events == [CUDA1]
    assert fut.get()[0].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("op", ["compress_pass", "reconstruct", "orthonormalize",
                                "orthonormalize_batched"])
def test_every_kernel_call_runs_under_the_tensors_device(monkeypatch, op):
    """ops is the one dispatch point to the kernels: each call enters the guard with the
    tensor's device and stays inside it for the whole launcher."""
    log, calls = _GuardLog(), []

    class Kernels:
        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, log.depth)) or _result(name)

    def _result(name):
        if name == "orthonormalize":
            return torch.zeros(70, 5), torch.ones((), dtype=torch.bool)
        if name == "orthonormalize_batched":
            return [torch.zeros(70, 5)], torch.ones(1, dtype=torch.bool)
        return None

    monkeypatch.setattr(ops, "device_guard", log)
    monkeypatch.setattr(ops, "_triton_kernels", lambda: Kernels())
    monkeypatch.setattr(ops, "backend_for", lambda *a: "triton")
    X, U = torch.randn(37, 70), torch.linalg.qr(torch.randn(70, 5))[0]
    args = {"compress_pass": (X, U), "reconstruct": (torch.randn(37, 5), U),
            "orthonormalize": (torch.randn(70, 5),),
            "orthonormalize_batched": ([torch.randn(70, 5)],)}[op]
    getattr(ops, op)(*args)
    assert calls == [(op, 1)] and log.entered == [torch.device("cpu")]
