"""Persistent grids cover every output tile exactly once, for any shape and program count.

reconstruct deals (D tile, row block) tiles out in contiguous runs, one per program;
compress_tma strides its programs over row blocks. Both size the grid from the GPU's SM count,
so on CPU (4 "SMs") a bad tile walk would only show on a GPU with 132 SMs. Here the SM count
is varied (1 up to more programs than tiles) over small shapes with partial tiles, N below one
row block, and outputs NaN-poisoned (a tile no program writes stays NaN; the fp64 comparison
catches a tile written twice with a wrong sum or read past its end).
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from helpers import assert_close, random_orthonormal
from kernel_checks import DEV, KERNEL_MARKS, check_compress, inputs

pytest.importorskip("triton")
from laser_triton.kernels import compress_pass, reconstruct  # noqa: E402

pytestmark = KERNEL_MARKS

RC = importlib.import_module("laser_triton.kernels.reconstruct")
CP = importlib.import_module("laser_triton.kernels.compress_pass")
TMA = importlib.import_module("laser_triton.kernels.compress_tma")
SMS = (1, 3, 7, 200)  # one program; a few; more programs than tiles


def test_reconstruct_tile_runs_cover_each_tile_once(use_configs, monkeypatch):
    # One entry per rank class the shapes use (configs.rank_class: r = 3, 5, 9 and r = 16 are
    # different binaries), keyed by the C dtype of the calls.
    cfg = {"BLOCK_N": 16, "BLOCK_D": 32, "PROGRAMS_PER_SM": 1, "PRECISION": "ieee"}
    use_configs({"reconstruct": {f"D=40,r={r},dtype=fp32,C=fp32": cfg for r in (8, 16)}})
    seen = set()
    for sms, (N, D, r) in itertools.product(SMS, [(1, 8, 3), (17, 33, 16), (50, 70, 5),
                                                 (33, 96, 9)]):
        monkeypatch.setattr(RC, "num_sms", lambda device, sms=sms: sms)
        C = torch.randn(N, r, generator=torch.Generator().manual_seed(N + D)).to(DEV)
        U = random_orthonormal(D, r, seed=D).float().to(DEV)
        out = reconstruct(C, U, torch.float32)
        assert not out.isnan().any(), (sms, N, D, r)
        assert_close(out, C.double() @ U.double().t(), rtol=1e-6, atol=1e-6)
        seen.add(RC.programs(N, D, {"BLOCK_N": 16, "BLOCK_D": 32, "PROGRAMS_PER_SM": 1},
                             sms))
    tiles_per = {per for _, per in seen}
    assert 1 in tiles_per and max(tiles_per) >= 4  # one tile per program, and long runs


def test_compress_tma_row_blocks_cover_each_row_once(use_configs, monkeypatch):
    monkeypatch.setattr(CP, "choose_path", lambda *args, **kwargs: "tma")
    use_configs({"compress_tma": {f"D=40,r={r},dtype=bf16,C=fp32": {"BLOCK_N": 16}
                                  for r in (1, 8, 31)}})  # the rank classes of r = 1, 8, 17
    launches = []
    kernel = CP._compress_tma_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid[0])
            return kernel[grid]

    monkeypatch.setattr(CP, "_compress_tma_kernel", Spy())
    for sms, (N, D, r) in itertools.product(SMS, [(1, 8, 1), (15, 24, 17), (40, 264, 8)]):
        monkeypatch.setattr(CP, "num_sms", lambda device, sms=sms: sms)
        X, U = inputs(N, D, r, torch.bfloat16, seed=N + D + sms)
        check_compress(compress_pass(X, U, True, torch.float32), X, U, torch.float32)
    assert len(launches) == len(SMS) * 3 and min(launches) == 1 and max(launches) == 3
