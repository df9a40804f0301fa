"""Launch contract: every kernel launch, bound the way a compiled CUDA launcher binds it.

Under TRITON_INTERPRET=1 a launch accepts keywords the kernel does not take (they are dropped)
and `_hopper`'s ASTSource compiles never see the launchers' keywords at all; on a GPU,
`JITFunction.run` binds `kernel[grid](*args, **kwargs)` with a generated binder and rejects an
unknown keyword (`KeyError: Keyword argument ... was specified but unrecognised`). This module
runs the real launchers on small CPU tensors with every `@triton.jit` object of the package
replaced by a recorder (nothing executes), then binds each recorded launch exactly as
`JITFunction.run` does for an sm_90 target (Triton's `create_function_from_signature` and
`_pack_args`), checks the grid against CUDA's limits and runs Triton's front end (AST to TTIR)
on the bound constexprs, which rejects a constexpr the kernel body cannot use.

Which configs each launcher uses is pinned through a stand-in config store, so every shipped
entry (and any config the caller passes) reaches the launch it configures. It is generic: the
scenarios call the package's public launchers, and `check` also reports every kernel of the
package that no scenario launched. Needs compiled (non-interpreter) kernels: run it in a
process without TRITON_INTERPRET (`run_check` does that).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
import pkgutil
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction, create_function_from_signature

from ..validation import DTYPES_BY_NAME
from . import _basis, configs
from ._common import INTERPRET

__all__ = ["Case", "Problem", "check", "run_check", "shipped_cases", "default_cases"]

SM90 = GPUTarget("cuda", 90, 32)
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's grid dimension limits (x, y, z)


@dataclass(frozen=True)
class Case:
    """One config to check: `table`'s lookups return `entry` (merged over DEFAULTS) at (D, r)."""

    table: str
    entry: tuple  # sorted items of the config dict (hashable)
    D: int
    r: int
    dtype: str
    source: str

    @property
    def config(self) -> dict:
        return {**configs.DEFAULTS[self.table], **dict(self.entry)}


@dataclass
class Problem:
    where: str  # case and scenario
    kernel: str
    error: str


@dataclass
class _Launch:
    fn: JITFunction
    grid: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JITFunction in its module's globals: records launches, runs nothing."""

    def __init__(self, fn: JITFunction, sink: list) -> None:
        self._fn, self._sink = fn, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._sink.append(_Launch(self._fn, grid, args, kwargs))

    def run(self, *args, grid, warmup=False, **kwargs):
        self._sink.append(_Launch(self._fn, grid, args, kwargs))

    def __getattr__(self, name):
        return getattr(self._fn, name)


class _PinnedStore:
    """A config store whose lookups return the pinned entries, the built-in defaults else."""

    def __init__(self, pins: dict[str, object]) -> None:
        self.pins, self.asked = pins, set()

    def lookup(self, kernel, D, r, dtype, N=None, coeff="bf16"):
        self.asked.add(kernel)
        if kernel == configs.PATH_TABLE:
            return self.pins.get(kernel)
        return {**configs.DEFAULTS[kernel], **self.pins.get(kernel, {})}

    def remember(self, *args, **kwargs) -> None:
        pass

    def remember_path(self, *args, **kwargs) -> None:
        pass


def _kernel_modules() -> list:
    pkg = sys.modules[__package__]
    names = [m.name for m in pkgutil.iter_modules(pkg.__path__)]
    return [importlib.import_module(f"{__package__}.{n}") for n in names if n != "_contract"]


def _jit_objects(modules) -> dict[int, JITFunction]:
    found = {}
    for mod in modules:
        for value in vars(mod).values():
            if isinstance(value, JITFunction):
                found[id(value)] = value
    return found


def _full_name(fn: JITFunction) -> str:
    return f"{fn.__module__}.{fn.__name__}"


def top_level_kernels() -> set[str]:
    """The package's JIT functions that no other JIT function calls: the launched kernels."""
    fns = list(_jit_objects(_kernel_modules()).values())
    srcs = {id(f): inspect.getsource(f.fn) for f in fns}
    return {_full_name(f) for f in fns
            if not any(re.search(rf"\b{f.__name__}\b", s) for i, s in srcs.items() if i != id(f))}


# ----------------------------------------------------------------------------- scenarios


def scenarios(D: int, r: int, dtype: str) -> list[tuple[str, dict, Callable[[], object]]]:
    """(name, path pin, call) for every launched mode of the public launchers at (D, r)."""
    from . import compress_pass, grad_coeff, orthonormalize_batched, reconstruct  # noqa: PLC0415
    from .orthonormalize import orthonormalize  # noqa: PLC0415

    dt = DTYPES_BY_NAME[dtype]
    N = 1000 + 37  # not a multiple of any block size
    r = min(r, D)
    gen = torch.Generator().manual_seed(D * 1009 + r)
    X = torch.randn(N, D, generator=gen).to(dt)
    Xt = torch.randn(D, N, generator=gen).to(dt).t()  # column-major X: no unit row stride
    U = torch.linalg.qr(torch.randn(D, r, generator=gen))[0]  # column-major, like the hooks'
    C = torch.randn(N, r, generator=gen).to(dt)
    out = []
    coeffs = sorted({dt, torch.float32, torch.bfloat16}, key=str)
    for path, need_y, det, coeff in itertools.product(("fused", "split"), (True, False),
                                                      (True, False), coeffs):
        def run(path=path, need_y=need_y, det=det, coeff=coeff):
            return compress_pass(X, U, need_y, coeff, deterministic=det)
        out.append((f"compress_pass(path={path}, need_y={need_y}, deterministic={det}, "
                    f"coeff={coeff})", {configs.PATH_TABLE: path}, run))
    # The TMA design reads a bf16 X whose rows are 16-byte aligned (D a multiple of 8)
    D8 = min(8 * -(-D // 8), 512)
    X8 = torch.randn(N, D8, generator=gen).to(torch.bfloat16)
    U8 = torch.linalg.qr(torch.randn(D8, min(r, 64), generator=gen))[0]
    for need_y, det in itertools.product((True, False), (True, False)):
        out.append((f"compress_pass(path=tma, D={D8}, need_y={need_y}, deterministic={det})",
                    {configs.PATH_TABLE: "tma"},
                    lambda need_y=need_y, det=det: compress_pass(X8, U8, need_y, None,
                                                                 deterministic=det)))
    out.append(("compress_pass(strided X)", {},
                lambda: compress_pass(Xt, U.contiguous(), True, dt)))
    for out_dt in sorted({dt, torch.float32}, key=str):
        out.append((f"reconstruct(out={out_dt})", {},
                    lambda out_dt=out_dt: reconstruct(C, U, out_dt)))
    out.append(("reconstruct(C^T view)", {}, lambda: reconstruct(C.t().contiguous().t(), U)))
    G = torch.randn(2, N, D, generator=gen)
    for g_dt, c_dt in sorted({(dt, dt), (dt, torch.float32), (torch.bfloat16, dt)}, key=str):
        out.append((f"grad_coeff(G {g_dt}, C {c_dt})", {},
                    lambda g_dt=g_dt, c_dt=c_dt: grad_coeff(
                        G.to(g_dt), torch.randn(2, N, r, generator=gen).to(c_dt))))
    C1 = torch.randn(1, N, r, generator=gen).to(dt)
    out.append(("grad_coeff(C shared across the batch)", {},
                lambda: grad_coeff(G.to(dt), C1.expand(2, N, r))))
    Y = torch.randn(D, r, generator=gen)
    out.append(("orthonormalize", {}, lambda: orthonormalize(Y)))
    Y2 = torch.randn(max(r, D // 2 + 3), max(1, r // 2 + 1), generator=gen)
    out.append(("orthonormalize_batched(mixed)", {}, lambda: orthonormalize_batched([Y, Y2])))
    return out


# ----------------------------------------------------------------------------- binding


@dataclass
class _Binder:
    target: GPUTarget = SM90
    backend: object = None
    binders: dict = field(default_factory=dict)
    front_ends: dict = field(default_factory=dict)

    def __post_init__(self):
        from triton.compiler import make_backend  # noqa: PLC0415

        self.backend = make_backend(self.target)

    def bind(self, launch: _Launch) -> tuple:
        """Raise what a compiled launcher would raise for this launch; the front-end key."""
        fn = launch.fn
        binder = self.binders.get(id(fn))
        if binder is None:
            binder = self.binders[id(fn)] = create_function_from_signature(
                fn.signature, fn.params, self.backend)
        kwargs = dict(launch.kwargs)  # as JITFunction.run adds them
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound, spec, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound,
                                                              spec, options)
        grid = launch.grid(bound) if callable(launch.grid) else launch.grid
        if not 1 <= len(grid) <= 3:
            raise ValueError(f"grid {grid} has {len(grid)} dimensions")
        for g, limit in zip(grid, GRID_LIMITS):
            if not isinstance(g, int) or not 1 <= g <= limit:
                raise ValueError(f"grid {tuple(grid)}: {g!r} is not an int in [1, {limit}]")
        # The front end runs later, once the recorders are out of the modules' globals (the
        # kernels call helpers through them); one per distinct specialization.
        key = (id(fn), str(signature), str(sorted(constexprs.items())), str(attrs))
        self.front_ends.setdefault(key, (fn, signature, constexprs, attrs, options))
        return key

    def front_end(self, fn, signature, constexprs, attrs, options) -> None:
        """Triton's AST -> TTIR step for one bound launch (what `triton.compile` runs first)."""
        from triton._C.libtriton import ir  # noqa: PLC0415
        from triton.compiler import ASTSource  # noqa: PLC0415

        src = ASTSource(fn, signature, constexprs, attrs)
        context = ir.context()
        ir.load_dialects(context)
        self.backend.load_dialects(context)
        src.make_ir(self.target, options, self.backend.get_codegen_implementation(options),
                    self.backend.get_module_map(), context)


# ----------------------------------------------------------------------------- cases


def _parse_key(key: str) -> tuple[int, int, str]:
    fields = dict(p.split("=") for p in key.split(","))
    return int(fields["D"]), int(fields["r"]), fields["dtype"]


def shipped_cases() -> list[Case]:
    """Every kernel entry of every shipped config file, at its own (D, r, dtype)."""
    import importlib.resources  # noqa: PLC0415
    import json  # noqa: PLC0415

    out = []
    for f in importlib.resources.files(configs.PACKAGE).iterdir():
        if not f.name.endswith(".json"):
            continue
        for table, entries in json.loads(f.read_text())["kernels"].items():
            if table == configs.PATH_TABLE:
                continue
            for key, entry in entries.items():
                out.append(Case(table, tuple(sorted(entry.items())), *_parse_key(key), f.name))
    return out


def default_cases(shapes: Iterable[tuple[int, int]] = ((70, 20), (512, 64), (1000, 200)),
                  dtypes: Iterable[str] = ("fp32", "bf16")) -> list[Case]:
    """The built-in DEFAULTS and INTERPRETER_DEFAULTS of every table at a few shapes."""
    out = []
    for label, table_set in (("DEFAULTS", configs.DEFAULTS),
                             ("INTERPRETER_DEFAULTS", configs.INTERPRETER_DEFAULTS)):
        for table, cfg in table_set.items():
            for (D, r), dtype in itertools.product(shapes, dtypes):
                out.append(Case(table, tuple(sorted(cfg.items())), D, r, dtype, label))
    return out


@contextlib.contextmanager
def recording(sink: list) -> Iterator[list]:
    """Every `@triton.jit` object in the package's module globals replaced by a recorder that
    appends launches to `sink` (nothing runs); the CPU device's config store is restored after
    (callers pin their own store in `configs._STORES`)."""
    if INTERPRET:
        raise RuntimeError("launch contract: kernels are interpreter objects here; run it in a "
                           "process without TRITON_INTERPRET (run_check does)")
    saved = []
    for mod in _kernel_modules():
        for name, value in list(vars(mod).items()):
            if isinstance(value, JITFunction):
                saved.append((mod, name, value))
                setattr(mod, name, _Recorder(value, sink))
    cpu_name = configs.gpu_name(torch.device("cpu"))
    old_store = configs._STORES.get(cpu_name)
    try:
        yield sink
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        if old_store is None:
            configs._STORES.pop(cpu_name, None)
        else:
            configs._STORES[cpu_name] = old_store


def check(cases: Iterable[Case], front_end: bool = True) -> tuple[list[Problem], dict]:
    """Run every scenario that uses each case's table with that config pinned; bind every
    launch. Returns (problems, coverage) where coverage maps kernel -> number of launches,
    with kernels no scenario launched and tables no scenario looked up under 'unlaunched'
    and 'unused_tables'."""
    sink: list[_Launch] = []
    binder = _Binder()
    first_use: dict[tuple, str] = {}  # front-end key -> the first case that bound it
    problems: list[Problem] = []
    launched: dict[str, int] = {}
    tables_asked: set[str] = set()
    cpu_name = configs.gpu_name(torch.device("cpu"))
    with recording(sink):
        by_shape: dict[tuple, list[Case]] = {}
        for case in cases:
            by_shape.setdefault((case.D, case.r, case.dtype), []).append(case)
        for (D, r, dtype), shape_cases in by_shape.items():
            for name, pins, call in scenarios(D, r, dtype):
                for case in shape_cases:
                    store = _PinnedStore({**pins, case.table: dict(case.entry)})
                    configs._STORES[cpu_name] = store
                    sink.clear()
                    _basis.clear_cache()  # each call launches what a first call launches
                    where = f"{case.source} {case.table} D={D},r={r},{dtype} {dict(case.entry)}" \
                            f" via {name}"
                    try:
                        call()
                    except Exception as exc:  # the launcher itself failed
                        problems.append(Problem(where, "(launcher)", f"{type(exc).__name__}: {exc}"))
                        continue
                    tables_asked |= store.asked
                    if case.table not in store.asked:
                        continue  # this scenario does not use the case's table
                    for launch in sink:
                        kname = _full_name(launch.fn)
                        launched[kname] = launched.get(kname, 0) + 1
                        try:
                            first_use.setdefault(binder.bind(launch), where)
                        except Exception as exc:
                            problems.append(Problem(where, kname, f"{type(exc).__name__}: {exc}"))
    for key, spec in binder.front_ends.items() if front_end else ():
        try:
            binder.front_end(*spec)
        except Exception as exc:
            problems.append(Problem(first_use[key], _full_name(spec[0]),
                                    f"{type(exc).__name__}: {exc}"))
    coverage = {"launches": launched,
                "unlaunched": sorted(top_level_kernels() - set(launched)),
                "unused_tables": sorted({c.table for c in cases} - tables_asked)}
    return problems, coverage


def _check_summary(cases: list[Case], front_end: bool) -> tuple[list[tuple[str, str, str]], dict]:
    problems, coverage = check(cases, front_end)
    return [(p.where, p.kernel, p.error) for p in problems], coverage


def run_check(cases: list[Case], front_end: bool = True):
    """`check` in this process, or in a clean spawned one when this one interprets."""
    if not INTERPRET:
        return _check_summary(cases, front_end)
    from ._hopper import _worker_pool  # noqa: PLC0415

    return _worker_pool().submit(_check_summary, cases, front_end).result()
