"""Launch contract: every launch the launchers make binds like a compiled CUDA launcher.

The interpreter drops keywords a kernel does not take, so a config field passed as a kernel
keyword (PROGRAMS_PER_SM once was) only failed on the first GPU launch. These tests bind every
recorded `kernel[grid](...)` of the real launchers with Triton's compiled binder for sm_90
(`laser_triton.kernels._contract`), for every shipped config, the built-in defaults, every
autotune sweep candidate and every launched mode, in a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from laser_triton.kernels import _contract  # noqa: E402
from laser_triton.kernels._hopper import _worker_pool  # noqa: E402
from laser_triton.kernels.configs import DEFAULTS  # noqa: E402

from laser_triton.tools.autotune import KERNELS, candidates  # noqa: E402


def _sweep_cases() -> list[_contract.Case]:
    out = []
    for kernel in KERNELS:
        for cfg in candidates(kernel, allow_split=True):
            for D, r, dtype in ((1000, 200, "bf16"), (70, 20, "fp32")):
                out.append(_contract.Case(kernel, tuple(sorted(cfg.items())), D, r, dtype,
                                          "sweep candidate"))
    return out


def _assert_clean(problems, coverage) -> None:
    assert not problems, "\n".join(f"{w}: {k}: {e}" for w, k, e in problems[:5])
    assert not coverage["unlaunched"], f"kernels no scenario launched: {coverage['unlaunched']}"
    assert not coverage["unused_tables"], f"tables no launcher used: {coverage['unused_tables']}"


def test_every_launch_binds_like_a_compiled_cuda_launcher():
    """Shipped configs, defaults and sweep candidates, every mode: no unknown keyword, no
    missing argument, grids within CUDA's limits, every kernel and table exercised."""
    cases = _contract.shipped_cases() + _contract.default_cases() + _sweep_cases()
    assert {c.table for c in cases} >= set(DEFAULTS)
    problems, coverage = _contract.run_check(cases, front_end=False)
    _assert_clean(problems, coverage)
    assert all(n > 0 for n in coverage["launches"].values())


def test_default_configs_pass_tritons_front_end_in_every_mode():
    """The bound constexprs of each launched mode compile to TTIR (AST front end, sm_90)."""
    problems, coverage = _contract.run_check(_contract.default_cases(shapes=((70, 20),)))
    _assert_clean(problems, coverage)


@pytest.mark.slow
def test_shipped_configs_pass_tritons_front_end_in_every_mode():
    """Every shipped entry compiles to TTIR. default.json leaves out tables with no proven
    fitting entry (e.g. grad_coeff, orth_factor at r = 64): those launch the built-in defaults,
    which the test above covers, so only the shipped tables must be exercised here."""
    problems, coverage = _contract.run_check(_contract.shipped_cases())
    assert not problems, "\n".join(f"{w}: {k}: {e}" for w, k, e in problems[:5])
    assert not coverage["unused_tables"], f"tables no launcher used: {coverage['unused_tables']}"


def test_contract_rejects_unknown_keyword_and_bad_constexpr():
    bad_key = _contract.Case("compress_fused", tuple(sorted({**DEFAULTS["compress_fused"],
                                                             "BOGUS_FIELD": 1}.items())),
                             70, 20, "fp32", "test")
    bad_block = _contract.Case("reconstruct", tuple(sorted({**DEFAULTS["reconstruct"],
                                                            "BLOCK_N": 48}.items())),
                               70, 20, "fp32", "test")
    problems, _ = _contract.run_check([bad_key, bad_block])
    keyword = [p for p in problems if "BOGUS_FIELD" in p[2]]
    assert keyword and all("unrecognised" in p[2] for p in keyword)
    assert all(p[1].endswith("_compress_fused_kernel") for p in keyword)
    block = [p for p in problems if p[1].endswith("_reconstruct_kernel")]
    assert block and "power of 2" in block[0][2]


_MISSING_ARG = """
import sys, torch
from laser_triton.kernels import _contract
import laser_triton.kernels.reconstruct
mod = sys.modules["laser_triton.kernels.reconstruct"]
C, U, out = torch.randn(37, 5), torch.randn(70, 5), torch.empty(37, 70)
args = (C, U, U, out, 37, 70, 5, 5, 1, 5, 1, 2)  # "ieee": u_ptr and ulo_ptr are both U
kw = dict(BLOCK_N=64, BLOCK_D=64, R_PAD=16, PRECISION="ieee", INTERPRET=False, num_warps=4,
          num_stages=2)
binder = _contract._Binder()
binder.bind(_contract._Launch(mod._reconstruct_kernel, (1, 2), args, kw))  # the real launch
try:
    binder.bind(_contract._Launch(mod._reconstruct_kernel, (1, 2), args[:-1], kw))
except TypeError as exc:
    assert "tiles_per_prog" in str(exc), exc
else:
    raise AssertionError("a launch without tiles_per_prog was accepted")
try:
    binder.bind(_contract._Launch(mod._reconstruct_kernel, (1, 70000, 1), args, kw))
except ValueError as exc:
    assert "65535" in str(exc), exc
else:
    raise AssertionError("a grid over CUDA's y limit was accepted")
"""


def test_contract_rejects_missing_argument_and_oversized_grid():
    if _contract.INTERPRET:  # the compiled kernels exist only in a clean process here
        _worker_pool().submit(exec, _MISSING_ARG).result()
    else:
        exec(_MISSING_ARG)
