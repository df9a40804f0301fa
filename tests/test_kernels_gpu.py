"""The kernels on a real GPU: bf16 inputs, bitwise repeatability, no host synchronization.

Skipped without CUDA. Compiled kernels differ from the interpreter where it matters: fp32
products could silently become TF32, fp32 atomics reorder, bf16 casts round to nearest even.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_orthonormal

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernels():
    from laser_triton import kernels as k

    return k


def _orth_err(Q):
    Qd = Q.double()
    eye = torch.eye(Q.shape[1], dtype=torch.float64, device=Q.device)
    return float((Qd.t() @ Qd - eye).abs().max())


@pytest.mark.parametrize("path", ["fused", "split", "tma"])
@pytest.mark.parametrize("N,D,r", [(1, 64, 1), (1000, 520, 33), (65536, 512, 64),
                                   (4096, 3072, 128), (777, 8192, 256), (1037, 264, 24)])
def test_compress_pass_bf16_matches_fp64(kernels, N, D, r, path, monkeypatch):
    import importlib

    # The store's compress_path entries outrank the size rule (D = 512 bf16 goes to the TMA
    # design), so each path is forced at the dispatcher itself.
    cp = importlib.import_module("laser_triton.kernels.compress_pass")
    tma = importlib.import_module("laser_triton.kernels.compress_tma")
    if path == "tma" and not tma.tma_fits(D, r, "bf16"):
        pytest.skip("the TMA design covers D <= 512 (a multiple of 8), r <= 64")
    monkeypatch.setattr(cp, "choose_path", lambda *args, **kwargs: path)
    from laser_triton.kernels._common import pow2

    # The fused program holds padded D x r tiles: beyond 32768 elements (520 x 33 pads to
    # 1024 x 64) it cannot fit shared memory, and each failed attempt costs a long compile.
    if path == "fused" and pow2(D) * pow2(r) > 32768:
        pytest.skip("the fused design is for small (padded) D x r")
    X = torch.randn(N, D, device="cuda").bfloat16()
    U = random_orthonormal(D, r, seed=D).float().cuda()
    out = kernels.compress_pass(X, U, True, torch.bfloat16)
    Xd, Ud = X.double(), U.double()
    C = Xd @ Ud
    assert float((out.C.double() - C).norm() / C.norm()) < 4e-3  # bf16 rounding of C
    assert float((out.Y.double() - Xd.t() @ C).norm() / (Xd.t() @ C).norm()) < 1e-5
    assert float(out.e_X) == pytest.approx(float(Xd.square().sum()), rel=1e-5)
    assert float(out.e_C) == pytest.approx(float(C.square().sum()), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_tma_design_on_hopper(kernels, dtype, monkeypatch):
    """The TMA design (what D = 512 launches on an H200) against fp64, fp16 X with |C| past
    fp16's range and zero row blocks first (C's fp16 halves are scaled per row block), and
    bitwise repeatable."""
    import importlib

    cp = importlib.import_module("laser_triton.kernels.compress_pass")
    monkeypatch.setattr(cp, "choose_path", lambda *args, **kwargs: "tma")
    U = random_orthonormal(512, 32, seed=3).float().cuda()
    X = torch.randn(70001, 512, device="cuda")
    X[:4096] = 0.0
    X[-5000:] = 60000.0 * U[:, 0].sign()  # |c_0| ~ 1e6
    X = X.to(dtype)
    out = kernels.compress_pass(X, U, True, torch.float32)
    Xd, Ud = X.double(), U.double()
    C = Xd @ Ud
    assert float(C.abs().max()) > 65504
    assert float((out.C.double() - C).norm() / C.norm()) < 1e-5
    assert float((out.Y.double() - Xd.t() @ C).norm() / (Xd.t() @ C).norm()) < 1e-5
    assert float(out.e_X) == pytest.approx(float(Xd.square().sum()), rel=1e-5)
    again = kernels.compress_pass(X, U, True, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(tuple.__iter__(out), tuple.__iter__(again)))


def test_fp32_products_are_not_tf32(kernels):
    """A TF32 product would show ~1e-3 relative errors in C for fp32 inputs."""
    X = torch.randn(4096, 512, device="cuda")
    U = random_orthonormal(512, 32).float().cuda()
    out = kernels.compress_pass(X, U, True, torch.float32)
    C = X.double() @ U.double()
    assert float((out.C.double() - C).norm() / C.norm()) < 1e-6


def test_bitwise_repeatable(kernels):
    X = torch.randn(65536, 512, device="cuda").bfloat16()
    U = random_orthonormal(512, 64).float().cuda()
    a = kernels.compress_pass(X, U)
    b = kernels.compress_pass(X, U)
    for x, y in zip(tuple.__iter__(a), tuple.__iter__(b)):
        assert torch.equal(x, y)
    Qa, _ = kernels.orthonormalize(a.Y)
    Qb, _ = kernels.orthonormalize(b.Y)
    assert torch.equal(Qa, Qb)


def test_orthonormalize_gpu(kernels):
    Ys = [torch.randn(512, 64, device="cuda") @ torch.diag(torch.logspace(0, -6, 64,
                                                                          device="cuda"))
          for _ in range(32)]
    Qs, ok = kernels.orthonormalize_batched(Ys)
    assert bool(ok.all()) and max(_orth_err(Q) for Q in Qs) <= 1e-5


def test_reconstruct_bf16(kernels):
    C = torch.randn(65536, 64, device="cuda").bfloat16()
    U = random_orthonormal(512, 64).float().cuda()
    out = kernels.reconstruct(C, U, torch.bfloat16)
    ref = C.double() @ U.double().t()
    assert float((out.double() - ref).norm() / ref.norm()) < 4e-3


def test_no_host_sync_on_the_hot_path(kernels):
    """compress -> orthonormalize -> keep-or-replace -> reconstruct, sync debug mode 'error'."""
    X = torch.randn(8192, 512, device="cuda").bfloat16()
    U = random_orthonormal(512, 32).float().cuda()
    kernels.orthonormalize(kernels.compress_pass(X, U).Y)  # warm-up: compile, plan caches
    kernels.reconstruct(kernels.compress_pass(X, U).C, U, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = kernels.compress_pass(X, U)
        Q, ok = kernels.orthonormalize(out.Y)
        U_next = torch.where(ok, Q, U)
        X_hat = kernels.reconstruct(out.C, U, torch.bfloat16)
        # A new set of shapes (same padded rank, so no compile): new site table, still no sync.
        Qs, oks = kernels.orthonormalize_batched([out.Y[:, :30], out.Y[:500]])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert _orth_err(U_next) <= 1e-5 and X_hat.shape == X.shape and bool(oks.all())


def test_ticket_counters_under_graph_replay_and_two_streams(kernels):
    """The last-arriving-program counters (compress_finish; orth Gram/apply, and at padded
    rank 128 the Gram kernel's per-site tile ticket) are zeroed once per stream and reset by
    the kernels: calls captured in a CUDA graph (counters of the capture stream) replay three
    times with the eager bits, calls on two streams at once (one counter buffer each) agree,
    and every counter is back at 0 afterwards."""
    import importlib

    X = torch.randn(20000, 512, device="cuda").bfloat16()
    U = random_orthonormal(512, 32).float().cuda()
    Ys = [torch.randn(512, 64, device="cuda"), torch.randn(300, 100, device="cuda")]

    def step() -> list[torch.Tensor]:
        out = kernels.compress_pass(X, U)
        Qs, ok = kernels.orthonormalize_batched(Ys)
        return [t for t in tuple.__iter__(out) if t is not None] + Qs + [ok]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b))

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as bench_kernels does
        step()
    torch.cuda.current_stream().wait_stream(side)
    main_out = step()
    with torch.cuda.stream(side):  # overlaps the call above: its own counters
        side_out = step()
    torch.cuda.synchronize()
    assert same(eager, main_out) and same(eager, side_out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(3):
        for t in captured:
            t.fill_(float("nan") if t.is_floating_point() else 0)
        graph.replay()
        torch.cuda.synchronize()
        assert same(eager, captured)
    counters = list(importlib.import_module("laser_triton.kernels._common")._TICKETS.values())
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)


@pytest.mark.parametrize("N", [5, 4099])
def test_tma_design_reads_views(kernels, N, monkeypatch):
    """Saved activations are often views: X a row slice of a wider buffer (a storage offset
    and a row pitch of 520 elements, both 16-byte multiples) through the TMA descriptor, fewer
    rows than one box (N = 5) and a partial last box, against fp64."""
    import importlib

    cp = importlib.import_module("laser_triton.kernels.compress_pass")
    tma = importlib.import_module("laser_triton.kernels.compress_tma")
    monkeypatch.setattr(cp, "choose_path", lambda *args, **kwargs: "tma")
    base = torch.randn(N + 1, 520, device="cuda").bfloat16()
    X = base[1:, 8:]
    assert X.storage_offset() == 528 and tma.x_ok(X)
    U = random_orthonormal(512, 48, seed=5).float().cuda()
    out = kernels.compress_pass(X, U, True, torch.float32)
    Xd, Ud = X.double(), U.double()
    C = Xd @ Ud
    assert float((out.C.double() - C).norm() / C.norm()) < 1e-5
    assert float((out.Y.double() - Xd.t() @ C).norm() / (Xd.t() @ C).norm()) < 1e-5
    assert float(out.e_X) == pytest.approx(float(Xd.square().sum()), rel=1e-5)
    assert float(out.e_C) == pytest.approx(float(C.square().sum()), rel=1e-5)
