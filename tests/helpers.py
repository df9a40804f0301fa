"""Test helpers: synthetic spectra and a tap that compares unpacked tensors with originals."""

from __future__ import annotations

import gc
import importlib.util
import warnings
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef

import laser_triton.hooks as hooks_mod
from laser_triton.storage import Packed, region_view
from laser_triton.trm import act_loss

REPO = Path(__file__).resolve().parents[1]


def load_source(name: str, relpath: str):
    """Execute a repository file that is not on the import path (perf/*.py, examples/*.py) as
    a fresh module called `name`."""
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matrix_with_spectrum(N: int, D: int, sigma: torch.Tensor, seed: int = 0,
                         dtype=torch.float32) -> torch.Tensor:
    """X = A diag(sigma) B^T with orthonormal A (N x k), B (D x k), built in fp64."""
    g = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    A, _ = torch.linalg.qr(torch.randn(N, k, generator=g, dtype=torch.float64))
    B, _ = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))
    return ((A * sigma.double()) @ B.t()).to(dtype)


def sudoku_batch(B: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Sudoku-shaped inputs and labels (81 cells, vocabulary 11), one puzzle id."""
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(1, 11, (B, 81), generator=g),
            "labels": torch.randint(2, 11, (B, 81), generator=g),
            "puzzle_ids": torch.zeros(B, dtype=torch.long)}


def trm_steps(model, b: dict[str, torch.Tensor], steps: int = 1, run=None) -> torch.Tensor:
    """`steps` deep-supervision steps of a TRM on batch b, each with its ACT loss backward,
    through `run` (e.g. the compiled model) if given; returns the last step's logits."""
    run = model if run is None else run
    carry = model.initial_carry(b)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        carry, out = run(carry, b)
        loss, _ = act_loss(out["logits"], out["q_halt_logits"], carry.data["labels"],
                           carry.halted, carry.steps)
        loss.backward()
    return out["logits"].detach()


def random_orthonormal(D: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))[0]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 0.0,
                 atol: float = 0.0, norm: bool = False, msg: str = "") -> None:
    """Assert that `actual` matches `expected` within the given tolerances, compared in fp64.

    Elementwise (default): |actual - expected| <= rtol * |expected| + atol at every element.
    norm=True: ||actual - expected|| <= rtol * ||expected|| + atol in the Frobenius norm, for
    results that are only accurate as a whole (a product summed over a long axis).
    A NaN anywhere fails either check; shapes must match.
    """
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double().to(actual.device)
    if norm:
        err, bound = float((a - e).norm()), rtol * float(e.norm()) + atol
        assert err <= bound, f"{msg} ||diff|| = {err:.3g} > {bound:.3g} (rtol={rtol}, atol={atol})"
        return
    diff = (a - e).abs()
    ok = diff <= rtol * e.abs() + atol
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise AssertionError(
            f"{msg} {int((~ok).sum())} of {ok.numel()} elements differ beyond rtol={rtol}, "
            f"atol={atol:.3g}; first at {bad}: {float(a[tuple(bad)])} vs {float(e[tuple(bad)])}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    nb = b.norm()
    return float((a - b).norm() / nb) if nb > 0 else float((a - b).norm())


class UnpackTap:
    """Records every saved tensor at pack time (a copy) and what unpack returns for it.

    Measures the package from outside: errors are computed here, never read from its report.
    """

    def __init__(self, laser, monkeypatch):
        self.records = []  # [original copy, packed object, list of unpacked results]
        self._by_id = {}
        orig_pack = laser._pack

        self.regions = {}  # id(entry) -> (entry, copy of the whole storage region at save time)

        def pack(t):
            p = orig_pack(t)
            rec = [t.detach().clone(), p, []]
            self.records.append(rec)
            self._by_id[id(p)] = rec
            if isinstance(p, Packed) and id(p.entry) not in self.regions:
                self.regions[id(p.entry)] = (p.entry, region_view(t, p.entry.region).clone())
            return p

        orig_unpack = hooks_mod._unpack

        def unpack(p):
            out = orig_unpack(p)
            if isinstance(p, Packed) and tuple(out.stride()) != p.stride:
                # a lowrank.linear backward took (C, U) instead (a zero-stride placeholder):
                # measure the values those coefficients stand for
                out = p.unpack()
            rec = self._by_id.get(id(p))
            if rec is not None:
                rec[2].append(out.detach().clone())
            return out

        monkeypatch.setattr(laser, "_pack", pack)
        monkeypatch.setattr(hooks_mod, "_unpack", unpack)

    def errors(self):
        """(relative error, exact?) for every unpack seen."""
        out = []
        for orig, _, results in self.records:
            for res in results:
                assert res.shape == orig.shape and res.dtype == orig.dtype
                assert res.stride() == orig.stride()
                out.append((rel_err(res, orig), torch.equal(res, orig)))
        return out


def live_tensor_bytes(exclude: list, device_type: str | None = None) -> int:
    """Bytes of every live tensor storage (on `device_type` if given), minus those of
    `exclude` (LASER's per-site state and caches): what a step's activations leave behind."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    skip = {StorageWeakRef(t.untyped_storage()) for t in exclude}
    seen = {}
    for t in objs:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if device_type is not None and st.device.type != device_type:
            continue
        key = StorageWeakRef(st)
        if key not in skip:
            seen[key] = st.nbytes()
    return sum(seen.values())


def fitted_slope(xs, ys) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
