"""The launch counter of issue 13 (laser_triton.launches) and the budget it checks."""

from __future__ import annotations

import pytest
import torch

from laser_triton import launches, ops

kernels = pytest.importorskip("laser_triton.kernels")


@pytest.fixture
def triton_runs(monkeypatch):
    """Counts real Triton kernel launches (under the interpreter, or compiled on a GPU) and
    the torch ops the launchers issue besides (a counted section around each launcher)."""
    seen = _Runs()
    if torch.cuda.is_available():
        from triton.runtime.jit import JITFunction as cls
    else:
        from triton.runtime.interpreter import InterpretedFunction as cls
    real = cls.run

    def run(self, *args, **kwargs):
        c = launches.active()
        if c is not None:
            c.booking += 1  # the interpreter's own tensor handling is no device launch
        try:
            if not kwargs.get("warmup", False):
                seen.append(self.__name__ if hasattr(self, "__name__") else self.fn.__name__)
            return real(self, *args, **kwargs)
        finally:
            if c is not None:
                c.booking -= 1

    monkeypatch.setattr(cls, "run", run)
    return seen


class _Runs(list):
    def around(self, fn, *args):
        """Run a launcher; returns its device launches (kernels + torch ops), once its plan for
        these shapes is cached (the first call for a shape set builds and uploads it)."""
        fn(*args)
        self.clear()
        with launches.LaunchCounter() as c:
            launches.counted("x")(fn)(*args)
        return len(self) + c.launches["x"]


@pytest.mark.parametrize("D,r,need_y", [(40, 5, True), (40, 5, False), (300, 70, True),
                                        (300, 70, False)])
def test_launch_count_of_compress_pass_is_what_its_launcher_launches(triton_runs, D, r, need_y):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    X = torch.randn(67, D, device=dev)
    U = torch.linalg.qr(torch.randn(D, r, dtype=torch.float64))[0].float().to(dev)
    n = triton_runs.around(kernels.compress_pass, X, U, need_y, torch.bfloat16)
    assert n == kernels.launch_count("compress_pass", X, U, need_y=need_y)


def test_launch_count_of_orthonormalize_and_reconstruct(triton_runs):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    Ys = [torch.randn(50, 3, device=dev), torch.randn(37, 9, device=dev)]
    assert triton_runs.around(kernels.orthonormalize_batched, Ys) == \
        kernels.launch_count("orthonormalize", *Ys)
    assert triton_runs.around(kernels.orthonormalize, Ys[1]) == \
        kernels.launch_count("orthonormalize", Ys[1])
    C, U = torch.randn(20, 9, device=dev), torch.randn(37, 9, device=dev)
    assert triton_runs.around(kernels.reconstruct, C, U) == \
        kernels.launch_count("reconstruct", C, U) == 1
    for n in (30, 3000):  # one row split, then several (their partial sums add one launch)
        G, Cg = torch.randn(1, n, 9, device=dev), torch.randn(1, n, 4, device=dev)
        assert triton_runs.around(kernels.grad_coeff, G, Cg) == \
            kernels.launch_count("grad_coeff", G, Cg) == (1 if n == 30 else 2)


@launches.counted("pack")
def _bookkeeping(X: torch.Tensor, U: torch.Tensor) -> float:
    out = ops.compress_pass(X, U, True, torch.bfloat16)  # booked as its kernels' launches
    v = X.view(-1)[:5]  # views launch nothing
    w = v + 1.0  # one launch
    return float(w.sum() + out.e_X)  # two launches, one host sync


def test_counter_books_ops_counts_aten_and_host_syncs():
    X, U = torch.randn(30, 40), torch.linalg.qr(torch.randn(40, 4))[0]
    with launches.LaunchCounter() as c:
        _bookkeeping(X, U)
        X + 1  # outside LASER's sections: the model's own work is not counted
    assert c.ops[("pack", "compress_pass")] == 1
    assert c.launches["pack"] == kernels.launch_count("compress_pass", X, U) + 3
    assert c.syncs["pack"] == 1
    assert launches.active() is None
    _bookkeeping(X, U)  # no counter: runs as usual
