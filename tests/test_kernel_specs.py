"""One declaration per kernel (`KernelSpec`): the config store, the sm_90 compile checks and
the autotune sweep all read it, and kernels/ has no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("triton")
from laser_triton.kernels import _hopper, configs  # noqa: E402
from laser_triton.kernels._spec import SPECS, Shape  # noqa: E402

from laser_triton.tools import autotune  # noqa: E402

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
SHAPE = Shape(N=1000, D=512, r=32, dtype="bf16")


def test_every_kernel_is_declared_next_to_its_jit_function():
    names = _hopper.kernel_names()
    assert {"compress_fused", "compress_coeff", "compress_y", "compress_finish", "reconstruct",
            "split_basis", "orth_gram", "orth_factor", "orth_apply"} <= set(names)
    for name, spec in SPECS.items():
        runtime, consts, options = spec.compile_args(SHAPE, dict(spec.defaults))
        assert set(runtime) | set(consts) >= set(spec.fn.arg_names), name
        assert options["num_warps"] in (1, 2, 4, 8, 16)
        assert set(spec.interpreter) <= set(spec.defaults), name
        assert set(spec.tuning) <= set(spec.defaults), name
        assert all(g >= 1 for g in spec.grid(SHAPE, dict(spec.defaults), 132)), name


def test_store_defaults_and_sweep_grid_come_from_the_specs():
    for name in autotune.KERNELS:
        spec = SPECS[name]
        assert configs.DEFAULTS[name] == spec.defaults
        assert configs.INTERPRETER_DEFAULTS[name] == {**spec.defaults, **spec.interpreter}
        assert configs.validate_entry(name, spec.defaults) is None
        cands = autotune.candidates(name)
        assert cands[0] == spec.defaults
        for field, values in spec.tuning.items():
            assert {c[field] for c in cands} >= set(values), (name, field)


def test_tensor_core_variants_are_the_default_and_in_the_grid():
    for name in ("compress_fused", "compress_coeff", "compress_y", "reconstruct"):
        assert SPECS[name].tensor_cores and SPECS[name].defaults["PRECISION"] == "bf16x3"
        assert {c["PRECISION"] for c in autotune.candidates(name)} == {"bf16x3"}
        assert {c["PRECISION"] for c in autotune.candidates(name, allow_split=False)} == {"ieee"}


def test_prune_only_ladder_is_the_launchers_fallback():
    ladder = autotune.ladder("compress_fused")
    assert ladder[0] == SPECS["compress_fused"].defaults
    assert ladder[1]["num_stages"] == ladder[0]["num_stages"] - 1
    assert all(min(c[k] for k in ("BLOCK_N", "BLOCK_K", "BLOCK_R")) >= 16 for c in ladder)
    assert len(ladder) == len({tuple(sorted(c.items())) for c in ladder})


def test_prune_ladder_tries_preferred_configs_before_the_defaults():
    """compress_coeff's 256-row, 16-warp blocks ship only where they pass the audit; the
    defaults and their fallback follow for the shapes where they do not."""
    spec = SPECS["compress_coeff"]
    ladder = autotune.ladder("compress_coeff")
    assert ladder[0] == {**spec.defaults, "BLOCK_N": 256, "num_warps": 16}
    assert ladder[1] == {**spec.defaults, "BLOCK_N": 256, "BLOCK_D": 32, "num_warps": 16,
                         "num_stages": 2}
    assert ladder[2] == spec.defaults and ladder[3]["num_stages"] == spec.defaults["num_stages"] - 1
    assert autotune.ladder("compress_y")[0] == SPECS["compress_y"].defaults


def test_launch_specialization_matches_tritons_rule():
    """Integers divisible by 16 get divisibility 16, 1 becomes a constant (Triton's JIT)."""
    _, args, _ = _hopper.specialize("compress_coeff", Shape(N=87_000, D=512, r=32, dtype="bf16"),
                                    dict(SPECS["compress_coeff"].defaults))
    by_name = {a[0]: a[1:] for a in args}
    assert by_name["N"] == ("i32", "")  # 87000 is not a multiple of 16
    assert by_name["D"] == ("i32", "D") and by_name["stride_xn"] == ("i32", "D")
    assert by_name["stride_xd"] == ("constexpr", 1)
    assert by_name["x_ptr"] == ("*bf16", "D")


def _module_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:  # module level only: lazy imports inside functions are fine
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module or "")
    return out


def test_no_import_cycle_between_configs_hopper_and_kernels():
    kernels = {"compress_pass", "compress_kernels", "compress_finish", "compress_plan",
               "reconstruct", "orthonormalize", "_cholesky", "_basis"}
    for infra in ("_spec.py", "configs.py", "_hopper.py"):
        assert not (_module_imports(KERNELS_DIR / infra) & kernels), infra
    assert _module_imports(KERNELS_DIR / "_spec.py") == set()
