"""Kernels whose programs hand work to the last one to arrive, run with programs in any order.

The Triton interpreter runs a grid's programs one after another in program-id order, so on CPU
the program holding the last atomic ticket is always the highest id, and a kernel that relied
on that (reading its own registers instead of the stored partials, comparing a program id
instead of its ticket, a counter left non-zero) would pass every other test. On a GPU programs
finish in any order. `program_order` makes the interpreter run them reversed or shuffled (each
program still runs exactly once), and these tests require bitwise-identical results in every
order, on the second and third call too (the ticket counters are reused without a memset:
each must be back at 0 after a call).

Kernels with tickets: compress_finish (row-block partials), orth_gram (per (site, tile) chunk
partials, and per site the tile errors of the final Gram), orth_apply (per-site chunk Grams).
compress_tma and reconstruct are persistent grids with no cross-program reads: their results
must not depend on the order either.
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch
from kernel_checks import DEV, KERNEL_MARKS, check_compress, conditioned, inputs, orth_err

pytest.importorskip("triton")
from laser_triton.kernels import compress_pass, orthonormalize_batched, reconstruct  # noqa: E402

pytestmark = [*KERNEL_MARKS, pytest.mark.skipif(DEV != "cpu", reason="patches the interpreter")]

ORDERS = ("forward", "reverse", "shuffle")
FIN = importlib.import_module("laser_triton.kernels.compress_finish")
COMMON = importlib.import_module("laser_triton.kernels._common")
ORTH = importlib.import_module("laser_triton.kernels.orthonormalize")
CP = importlib.import_module("laser_triton.kernels.compress_pass")
TMA = importlib.import_module("laser_triton.kernels.compress_tma")


@pytest.fixture
def program_order(monkeypatch):
    """set(order): the interpreter runs every later grid's programs in `order` ("forward",
    "reverse" or "shuffle", a fixed seed per launch); returns a list of (grid, first ids run)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    state = {"order": "forward", "perm": None, "launch": 0}
    seen: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = []

    def grid_dim(nx, ny, nz):
        n = nx * ny * nz
        perm = list(range(n))
        if state["order"] == "reverse":
            perm.reverse()
        elif state["order"] == "shuffle":
            random.Random(state["launch"]).shuffle(perm)
        state["perm"], state["launch"] = perm, state["launch"] + 1
        return set_dim(nx, ny, nz)

    def grid_idx(x, y, z):
        ny, nz = builder.grid_dim[1], builder.grid_dim[2]
        k = state["perm"][(x * ny + y) * nz + z]  # the interpreter's k-th program runs id k'
        idx = (k // (ny * nz), (k // nz) % ny, k % nz)
        if (x, y, z) == (0, 0, 0):
            seen.append((builder.grid_dim, idx))
        return set_idx(*idx)

    monkeypatch.setattr(builder, "set_grid_dim", grid_dim)
    monkeypatch.setattr(builder, "set_grid_idx", grid_idx)

    def set_order(order: str) -> list:
        state["order"] = order
        seen.clear()
        return seen

    return set_order


def _fields(out) -> list[torch.Tensor]:
    return [t for t in tuple.__iter__(out) if t is not None]


def _counters_zero() -> bool:
    counters = tuple(COMMON._TICKETS.values())
    return bool(counters) and all(int(c.abs().sum()) == 0 for c in counters)


def test_the_hook_reorders_programs(program_order):
    """The fixture really changes which program runs first (else the tests below prove nothing)."""
    seen = program_order("reverse")
    reconstruct(torch.randn(40, 8).to(DEV), torch.randn(33, 8).to(DEV))
    assert seen and all(first != (0, 0, 0) for grid, first in seen if grid != (1, 1, 1))


@pytest.mark.parametrize("path", ["fused", "split", "tma"])
def test_compress_finish_last_program_in_any_order(path, program_order, monkeypatch):
    """The finishing kernel's row programs (ROWS = 16: 19 of them, plus the Y programs) reduce
    to partials whose last-arriving program combines them: same bits in every order."""
    monkeypatch.setitem(FIN.FINISH_CONFIG, "ROWS", 16)
    monkeypatch.setattr(CP, "choose_path", lambda *args, **kwargs: path)
    X, U = inputs(300, 136, 12, torch.bfloat16, seed=5)
    X[7] = 0.0  # a zero row: no row error
    runs = []
    for order in ORDERS * 2:  # each order twice: the counter is reused
        seen = program_order(order)
        runs.append(_fields(compress_pass(X, U, True, torch.float32)))
        assert seen and _counters_zero()
    check_compress(compress_pass(X, U, True, torch.float32), X, U, torch.float32)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("r_pad", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_orth_tickets_in_any_order(r_pad, program_order, use_configs):
    """orthonormalize_batched with 3 row chunks and 4 Gram tiles per site at padded rank 64
    (Gram, Z^T A and column-count partials; the apply's per-site Gram), and at padded rank
    128 (the Gram kernel's per-site ticket over its tiles decides `ok`): Q and ok bitwise
    identical whatever order the chunk and tile programs run in."""
    use_configs({"orth_gram": {f"D=100,r={r_pad},dtype=fp32": {
                     "BLOCK_D": 16, "ROWS_PER_CHUNK": 32, "GRAM_TILE": 32}},
                 "orth_apply": {f"D=100,r={r_pad},dtype=fp32": {"BLOCK_D": 16}}})
    if r_pad == 64:
        Ys = [conditioned(70, 20, 1e3, seed=1), conditioned(50, 33, 10.0, seed=2)]
        Ys[1][:, 5] = 0.0  # a zero column: the completion path (Z^T A tiles and nf)
    else:
        Ys = [conditioned(100, 65, 10.0, seed=3)]
    runs = []
    for order in ORDERS:
        program_order(order)
        Qs, ok = orthonormalize_batched(Ys)
        runs.append((torch.cat([Q.reshape(-1) for Q in Qs]), ok.clone()))
        assert _counters_zero(), f"a ticket counter left non-zero ({order})"
    assert bool(runs[0][1].all()) and max(orth_err(Q) for Q in Qs) <= 1e-5
    for Q, ok in runs[1:]:
        assert torch.equal(Q, runs[0][0]) and torch.equal(ok, runs[0][1])


def test_persistent_grids_in_any_order(program_order, use_configs):
    """compress_tma and reconstruct: several programs each (4 interpreter SMs), N not a
    multiple of a row block; no cross-program reads, so the order cannot matter."""
    use_configs({"compress_tma": {"D=264,r=24,dtype=bf16": {"BLOCK_N": 16}},
                 "reconstruct": {"D=70,r=24,dtype=fp32": {"BLOCK_N": 16, "BLOCK_D": 32,
                                                           "PROGRAMS_PER_SM": 1}}})
    X, U = inputs(150, 264, 24, torch.bfloat16, seed=9)
    C, U2 = torch.randn(45, 24).to(DEV), inputs(1, 70, 24, torch.float32, seed=3)[1]
    runs = []
    for order in ORDERS:
        program_order(order)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(CP, "choose_path", lambda *args, **kwargs: "tma")
            out = compress_pass(X, U, True, torch.bfloat16)
        runs.append([*_fields(out), reconstruct(C, U2, torch.float32)])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_ticket_counters_made_under_graph_capture_are_fresh(monkeypatch):
    """Captured, a counter's zero fill runs only at replay, and a cached counter would live in
    the graph's private pool (read before the first replay, or after the graph is freed): under
    capture every call gets a fresh, uncached buffer; outside it one buffer per stream is reused."""
    dev = torch.device(DEV)
    monkeypatch.setattr(COMMON, "_TICKETS", {})
    monkeypatch.setattr(COMMON, "capturing", lambda device: True)
    a = COMMON.ticket_counters(dev, 3, "test")
    b = COMMON.ticket_counters(dev, 3, "test")
    assert a.data_ptr() != b.data_ptr() and not COMMON._TICKETS
    assert a.numel() >= 3 and int(a.abs().sum()) == 0
    monkeypatch.setattr(COMMON, "capturing", lambda device: False)
    c = COMMON.ticket_counters(dev, 3, "test")
    assert COMMON.ticket_counters(dev, 2, "test").data_ptr() == c.data_ptr()
    assert COMMON.ticket_counters(dev, 3, "other").data_ptr() != c.data_ptr()
    assert FIN.finish_counter(dev).data_ptr() == FIN.finish_counter(dev).data_ptr()


def test_orthonormalize_plan_is_not_built_under_graph_capture(monkeypatch):
    """A site table built inside capture would be a graph node reading a pinned host block the
    allocator reuses: a first call for new shapes under capture fails with a message; after a
    warm-up with the same shapes (plan cached) the captured call runs, on fresh counters."""
    Y = conditioned(77, 6, 10.0, seed=11)
    monkeypatch.setattr(ORTH, "capturing", lambda device: True)
    monkeypatch.setattr(COMMON, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="first time inside CUDA-graph capture"):
        orthonormalize_batched([Y, Y[:, :5]])
    monkeypatch.setattr(ORTH, "capturing", lambda device: False)
    monkeypatch.setattr(COMMON, "capturing", lambda device: False)
    warm, _ = orthonormalize_batched([Y, Y[:, :5]])
    monkeypatch.setattr(ORTH, "capturing", lambda device: True)
    monkeypatch.setattr(COMMON, "capturing", lambda device: True)
    captured, ok = orthonormalize_batched([Y, Y[:, :5]])
    assert bool(ok.all()) and all(torch.equal(a, b) for a, b in zip(warm, captured))
