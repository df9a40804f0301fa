"""Compile the kernels for Hopper (sm_90) on the CPU and prove the shipped configs fit.

`triton.compile(..., target=GPUTarget("cuda", 90, 32))` needs no GPU (docs/design.md §8). An H100/H200
block may use at most 232,448 bytes of shared memory; every shipped config must fit, and the
store's validation must reject one that does not.
"""

from __future__ import annotations

import importlib.resources
import json
import logging

import pytest

pytest.importorskip("triton")
from laser_triton.kernels import _hopper  # noqa: E402
from laser_triton.kernels._common import pow2  # noqa: E402
from laser_triton.kernels._spec import SPECS  # noqa: E402
from laser_triton.kernels.configs import (  # noqa: E402
    DEFAULTS,
    PATH_TABLE,
    SHARED_LIMIT_SM90,
    ConfigStore,
    validate_entry,
)

SHIPPED = importlib.resources.files("laser_triton.autotune_configs")


def _shipped_docs():
    return [(f.name, json.loads(f.read_text())) for f in SHIPPED.iterdir()
            if f.name.endswith(".json")]


def _shipped_entries():
    """(file, kernel, key, D, r, dtype, config, C dtype) of every shipped kernel entry."""
    out = []
    for name, doc in _shipped_docs():
        for kernel, table in doc["kernels"].items():
            if kernel == PATH_TABLE:
                continue
            for key, entry in table.items():
                fields = dict(p.split("=") for p in key.split(","))
                out.append((name, kernel, key, int(fields["D"]), int(fields["r"]),
                            fields["dtype"], {**DEFAULTS[kernel], **entry},
                            fields.get("C", "bf16")))
    return out


def _dtype_for(kernel: str) -> str:
    return "fp32" if kernel.startswith("orth") else "bf16"


@pytest.mark.parametrize("kernel", _hopper.kernel_names())
def test_kernel_compiles_for_sm90(kernel):
    info = _hopper.compile_info(kernel, 256, 16, _dtype_for(kernel), SPECS[kernel].defaults)
    assert info["cubin_bytes"] > 0 and ".target sm_90" in info["ptx"]
    assert 0 <= info["shared"] <= SHARED_LIMIT_SM90
    if kernel in ("orth_gram", "orth_apply"):  # the fp64 Gram and apply run on DMMA
        assert "mma.sync.aligned" in info["ptx"] and ".f64.f64.f64.f64" in info["ptx"]


# Mode variants the launchers use besides the default spec above. The interpreter runs code
# that compiled Triton rejects (the reduction once reused a mask name across shapes), so each
# variant a GPU run can launch is compiled here.
_LAUNCHED_VARIANTS = [
    ("compress_fused", {"NEED_Y": False}), ("compress_coeff", {"WRITE_CS": False}),
    ("orth_factor", {"MODE": "plain"}), ("orth_apply", {"REPAIR": False, "CHECK": True}),
    ("orth_gram", {"WITH_Z": False}), ("orth_apply", {"REPAIR": False}),  # padded rank 128
    ("orth_gram", {"WITH_Z": False, "CHECK": True}),
]
_OTHER_VARIANTS = [  # deterministic=False (Y by atomics; the scalars always reduce in order)
    ("compress_fused", {"ATOMIC": True}), ("compress_y", {"ATOMIC": True}),
]


def _compile_variant(kernel, flags):
    info = _hopper.compile_info(kernel, 256, 16, _dtype_for(kernel), SPECS[kernel].defaults,
                                flags=flags)
    assert info["cubin_bytes"] > 0 and 0 <= info["shared"] <= SHARED_LIMIT_SM90


@pytest.mark.parametrize("kernel,flags", _LAUNCHED_VARIANTS,
                         ids=[f"{k}-" + "-".join(map(str, f.values())) for k, f in _LAUNCHED_VARIANTS])
def test_launched_variants_compile_for_sm90(kernel, flags):
    _compile_variant(kernel, flags)


@pytest.mark.slow
@pytest.mark.parametrize("kernel,flags", _OTHER_VARIANTS, ids=[k for k, _ in _OTHER_VARIANTS])
def test_atomic_variants_compile_for_sm90(kernel, flags):
    _compile_variant(kernel, flags)


def test_bf16x3_products_use_tensor_cores_and_ieee_does_not():
    cfg = DEFAULTS["compress_coeff"]
    ieee = _hopper.compile_info("compress_coeff", 512, 16, "bf16",
                                {**cfg, "PRECISION": "ieee"})["ptx"]
    split = _hopper.compile_info("compress_coeff", 512, 16, "bf16",
                                 {**cfg, "PRECISION": "bf16x3"})["ptx"]
    assert "mma" not in ieee  # exact fp32 FMA products
    assert ("mma.sync.aligned" in split or "wgmma" in split) and ".bf16" in split


def test_shipped_files_are_well_formed_and_recorded_fits():
    """Structure, and the shared bytes measured when the file was generated (no compile)."""
    docs = _shipped_docs()
    assert any(name == "default.json" for name, _ in docs)
    for name, doc in docs:
        assert doc.get("triton_version") and "kernels" in doc, name
        for kernel, table in doc["kernels"].items():
            for key, entry in table.items():
                assert validate_entry(kernel, entry) is None, (name, kernel, key)
                if kernel != PATH_TABLE:
                    assert 0 < doc["shared_bytes"][kernel][key] <= SHARED_LIMIT_SM90


def test_shipped_configs_fit_sample():
    """Recompile the smallest shipped entry of each kernel (the rest: the slow test below)."""
    smallest = {}
    for e in _shipped_entries():
        if e[1] not in smallest or (e[3], e[4]) < (smallest[e[1]][3], smallest[e[1]][4]):
            smallest[e[1]] = e
    for _, kernel, key, D, r, dtype, cfg, coeff in smallest.values():
        shared = _hopper.compile_info(kernel, D, r, dtype, cfg, coeff=coeff)["shared"]
        assert shared <= SHARED_LIMIT_SM90, key


@pytest.mark.slow
def test_every_shipped_config_fits():
    seen = set()
    for name, kernel, key, D, r, dtype, cfg, coeff in _shipped_entries():
        ident = (kernel, pow2(D) if kernel == "compress_fused" else 0, pow2(r), dtype, coeff,
                 tuple(sorted(cfg.items())))
        if ident in seen:
            continue
        seen.add(ident)
        shared = _hopper.compile_info(kernel, D, r, dtype, cfg, coeff=coeff)["shared"]
        assert shared <= SHARED_LIMIT_SM90, f"{name}: {kernel} {key} needs {shared} bytes"


def _store_with(tmp_path, kernels, **kw):
    (tmp_path / "NVIDIA_H200.json").write_text(json.dumps({"triton_version": "3.6.0",
                                                            "kernels": kernels}))
    return ConfigStore("NVIDIA H200", env_dir=tmp_path, shipped_dir=tmp_path / "none", **kw)


def test_store_validation_rejects_a_config_over_the_limit(tmp_path, caplog):
    """Cheap version: a 16 KiB config against a lowered limit."""
    store = _store_with(tmp_path, {"orth_apply": {"D=512,r=64,dtype=fp32": {"BLOCK_D": 32}}},
                        validate_fit=True, shared_limit=10_000)
    with caplog.at_level(logging.INFO, logger="laser_triton"):
        cfg = store.lookup("orth_apply", 512, 64, "fp32")
    assert "rejecting D=512,r=64,dtype=fp32" in caplog.text
    assert cfg == DEFAULTS["orth_apply"]  # fell through to the built-in default


@pytest.mark.slow
def test_store_validation_rejects_a_config_over_232448_bytes(tmp_path, caplog):
    big = {"BLOCK_D": 512}  # a 512 x 64 fp64 operand tile: 262,144 bytes
    store = _store_with(tmp_path, {"orth_apply": {"D=512,r=64,dtype=fp32": big}},
                        validate_fit=True)
    assert _hopper.shared_bytes("orth_apply", 512, 64, "fp32",
                                {**DEFAULTS["orth_apply"], **big}) > SHARED_LIMIT_SM90
    with caplog.at_level(logging.INFO, logger="laser_triton"):
        assert store.lookup("orth_apply", 512, 64, "fp32")["BLOCK_D"] != 512
    assert "does not fit 232448 bytes" in caplog.text
