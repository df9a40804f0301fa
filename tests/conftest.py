"""Shared test setup.

TRITON_INTERPRET must be set before any kernel module is imported (docs/design.md §8), so it is set
here, at collection time, whenever no CUDA device is present.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Small shapes: one intra-op thread is faster and immune to a busy neighbour core, where
# OpenMP spin-waiting made fp64 eigh 200x slower in a probe.
torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs and scratch buffers start as NaN, so an element a kernel fails to write
    shows up as a NaN (kernels._common.POISON)."""
    from laser_triton.kernels import _common

    monkeypatch.setattr(_common, "POISON", True)


@pytest.fixture
def use_configs(tmp_path, monkeypatch):
    """Make the kernels read `kernels` (a {kernel: {key: entry}} map) as this machine's file."""
    import json

    from laser_triton.kernels import configs

    def install(kernels: dict) -> None:
        dev = torch.device("cuda" if _HAS_CUDA else "cpu")
        name = configs.sanitize_gpu_name(configs.gpu_name(dev)) + ".json"
        (tmp_path / name).write_text(json.dumps({"triton_version": "x", "kernels": kernels}))
        monkeypatch.setenv("LASER_TRITON_CONFIG_DIR", str(tmp_path))
        monkeypatch.setattr(configs, "_STORES", {})

    return install
