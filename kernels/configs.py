"""The launch-config store (docs/design.md §7): one config per launch, resolved before the launch.

Triton's multi-config `@triton.autotune` cannot run without a GPU, so every launcher asks the
store for one config. Files map, per kernel, `D=..,r=..,dtype=..[,C=..][,N=..]` to
`{BLOCK_*, num_warps, num_stages, ...}` (N is a bucket, never a raw row count; C is the dtype
of the stored coefficients, LaserConfig.coeff_dtype, for the kernels whose binary depends on
it: `keyed_on_coeff`. A key without C means bf16 C, the default, so older files keep working).

Lookup order, per (kernel, key), cached:
  1. `$LASER_TRITON_CONFIG_DIR/<sanitized GPU name>.json`, exact key;
  2. the shipped `autotune_configs/<sanitized GPU name>.json`, exact key;
  3. the nearest (D, r) entry for the same dtype (and C dtype) in those files;
  4. a safe default: the shipped `default.json` (configs proven to fit sm_90 by compiling them
     on CPU, never timed), exact or nearest, then the built-in DEFAULTS.
A config proven with one C dtype is never used for another (with a wider C the compress
kernels keep the fp32 C tile live longer and spill where a bf16 C does not): a tuned file
holding only bf16-C entries leaves an fp32 C to default.json's fp32-C entries.
Which one was used is logged once per kernel and source. A file written by another Triton
version is still used (logged). Entries are checked for structure here; whether they fit the
GPU is checked by compiling (`fits`) in the sweep and tests, and by catching out-of-resource
errors at launch (`_common.launch`), whose smaller config the launcher then `remember`s.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import triton

from ._spec import SPECS, Shape

log = logging.getLogger("laser_triton")

__all__ = ["ConfigStore", "DEFAULTS", "get_store", "reset_stores", "config_key", "n_bucket",
           "sanitize_gpu_name", "gpu_name", "validate_entry", "keyed_on_coeff", "rank_class",
           "rank_representative",
           "SHARED_LIMIT_SM90", "DEFAULT_COEFF"]

SHARED_LIMIT_SM90 = 232_448  # bytes of shared memory one block may use on H100/H200
SCHEMA = 1
PACKAGE = "laser_triton.autotune_configs"



class _SpecView(Mapping):
    """kernel name -> its spec's defaults (GPU or interpreter), read from the declarations
    next to the kernels (`_spec.SPECS`, filled when the kernel modules are imported)."""

    def __init__(self, interpreter: bool) -> None:
        self._interpreter = interpreter

    def __getitem__(self, kernel: str) -> dict:
        spec = SPECS[kernel]
        if not spec.stored:
            raise KeyError(f"{kernel} has a fixed launch config, not one from the store")
        return spec.interpreter_defaults() if self._interpreter else dict(spec.defaults)

    def __iter__(self):
        return (name for name, spec in SPECS.items() if spec.stored)

    def __len__(self) -> int:
        return sum(spec.stored for spec in SPECS.values())


# Safe built-in defaults (each kernel's KernelSpec.defaults) and, under TRITON_INTERPRET=1
# (CPU tensors, where every tl op costs ~0.1 ms of Python whatever its size), the spec's
# interpreter overrides: big blocks mean few programs and few loop trips.
DEFAULTS: Mapping[str, dict] = _SpecView(interpreter=False)
INTERPRETER_DEFAULTS: Mapping[str, dict] = _SpecView(interpreter=True)
# compress_pass has three designs; this table picks one per key ("fused", "split" or "tma"). Without an
# entry: fused while the D x r fp32 accumulator is small (see compress_pass.FUSED_MAX_ELEMS).
PATH_TABLE = "compress_path"
_BLOCK_KEYS = {"BLOCK_N", "BLOCK_D", "BLOCK_O", "BLOCK_R", "BLOCK_K", "ROWS_PER_CHUNK",
               "GRAM_TILE"}
_DT = "(fp32|bf16|fp16)"
_KEY_RE = re.compile(rf"^D=(\d+),r=(\d+),dtype={_DT}(?:,C={_DT})?(?:,N=(\d+))?$")
DEFAULT_COEFF = "bf16"  # LaserConfig.coeff_dtype's default; keys without C mean this


@functools.cache
def keyed_on_coeff(kernel: str) -> bool:
    """Whether `kernel`'s configs are stored per C dtype: its compile signature (the binary a
    launch runs) depends on `Shape.coeff` (compress_fused and compress_coeff store C,
    reconstruct reads it), or it is the compress design table, which may differ per C."""
    if kernel == PATH_TABLE:
        return True
    spec = SPECS[kernel]
    sigs = [spec.signature(Shape(4096, 512, 32, "bf16", c), dict(spec.defaults))
            for c in ("bf16", "fp32")]
    return sigs[0] != sigs[1]


def sanitize_gpu_name(name: str) -> str:
    """'NVIDIA H200' -> 'NVIDIA_H200' (the file name of that GPU's configs)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "unknown"


def gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter"


def n_bucket(N: int) -> int:
    """Row-count bucket: the power of 4 at or above N, within [1024, 2^20]."""
    return int(min(max(4 ** math.ceil(math.log(max(N, 1), 4)), 1024), 1 << 20))


def _pow2(n: int) -> int:
    """The kernels' padded rank (`_common.pow2`: a power of two, at least 16)."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def rank_class(r: int) -> tuple[int, bool | None]:
    """What of a rank r a compiled binary depends on: its padded width (R_PAD, at least 16)
    and whether Triton's launch specialization marks it divisible by 16 (None: r = 1, a
    constant). r = 127 and r = 128 are different binaries with the same padded width; 97 and
    127 the same one, as are 2..15."""
    return _pow2(r), (None if r == 1 else r % 16 == 0)


def rank_representative(r: int) -> int:
    """The rank whose entries stand for r's class (`rank_class`): the padded width when r is
    a multiple of 16, else one less (the prune writes entries at 31, 63, 127), and 8 for the
    ranks below 16 (the audit's grid point)."""
    if r == 1 or r % 16 == 0:
        return r if r == 1 else _pow2(r)
    return 8 if _pow2(r) == 16 else _pow2(r) - 1


def config_key(D: int, r: int, dtype: str, N: int | None = None,
               coeff: str = DEFAULT_COEFF) -> str:
    """The store key; C appears only when it is not the default (bf16)."""
    key = f"D={D},r={r},dtype={dtype}" + ("" if coeff == DEFAULT_COEFF else f",C={coeff}")
    return key if N is None else f"{key},N={n_bucket(N)}"


def validate_entry(kernel: str, entry: object) -> str | None:
    """Why `entry` is not a usable config for `kernel`, or None when it is well formed."""
    if kernel == PATH_TABLE:
        return None if entry in ("fused", "split", "tma") else \
            f"path {entry!r} is not fused/split/tma"
    if kernel not in DEFAULTS:
        return f"unknown kernel {kernel!r}"
    if not isinstance(entry, dict):
        return "entry is not an object"
    allowed = set(DEFAULTS[kernel])
    for k, v in entry.items():
        if k not in allowed:
            return f"unknown field {k!r}"
        if k == "PRECISION":
            if v not in ("ieee", "bf16x3"):
                return f"PRECISION {v!r}"
        elif not isinstance(v, int) or isinstance(v, bool):
            return f"{k} is not an integer"
        elif k == "num_warps" and v not in (1, 2, 4, 8, 16, 32):
            return f"num_warps={v}"
        elif k == "num_stages" and not 1 <= v <= 8:
            return f"num_stages={v}"
        elif k in _BLOCK_KEYS and (v < 16 or v > 8192 or v & (v - 1)):
            return f"{k}={v} is not a power of two in [16, 8192]"
        elif k == "PROGRAMS_PER_SM" and not 1 <= v <= 32:
            return f"PROGRAMS_PER_SM={v}"
    return None


def _parse_key(key: str) -> tuple[int, int, str, str, int | None] | None:
    """(D, r, dtype, C dtype, N bucket or None); a key without C has bf16 C."""
    m = _KEY_RE.match(key)
    if m is None:
        return None
    return int(m[1]), int(m[2]), m[3], m[4] or DEFAULT_COEFF, (int(m[5]) if m[5] else None)


def _canonical(key: str) -> str:
    """`key` as `config_key` writes it (an explicit C=bf16 is the same key as none)."""
    p = _parse_key(key)
    return key if p is None else config_key(p[0], p[1], p[2], None, p[3]) + (
        "" if p[4] is None else f",N={p[4]}")


class ConfigStore:
    """Configs for one GPU name, from an override dir, the shipped files and the defaults."""

    def __init__(self, gpu: str, env_dir: str | os.PathLike | None = None,
                 shipped_dir=None, interpreter: bool = False, validate_fit: bool = False,
                 arch: int = 90, shared_limit: int = SHARED_LIMIT_SM90) -> None:
        self.gpu = gpu
        # validate_fit: compile each candidate for `arch` and skip those over `shared_limit`
        # (the sweep and tests; at run time a launch failure does the same job, cheaper).
        self.validate_fit, self.arch, self.shared_limit = validate_fit, arch, shared_limit
        # Without a GPU (the interpreter) the shipped GPU files do not apply.
        self.defaults = INTERPRETER_DEFAULTS if interpreter else DEFAULTS
        self.file_name = sanitize_gpu_name(gpu) + ".json"
        self._logged: set[tuple[str, str]] = set()
        self._cache: dict[tuple[str, str], dict | str] = {}
        if shipped_dir is None:
            import importlib.resources  # noqa: PLC0415

            shipped_dir = importlib.resources.files(PACKAGE)
        tuned: list[tuple[str, dict]] = []  # (source label, kernels table), priority order
        if env_dir:
            tuned += self._load(Path(env_dir) / self.file_name, "LASER_TRITON_CONFIG_DIR")
        if not interpreter:
            tuned += self._load(shipped_dir / self.file_name, "shipped")
        self.tuned = tuned
        self.fallback = [] if interpreter else self._load(shipped_dir / "default.json",
                                                          "shipped default")

    def _load(self, path, label: str) -> list[tuple[str, dict]]:
        """[(label, kernels)] for a readable file, [] for a missing or corrupt one (logged)."""
        try:
            if not path.is_file():
                return []
            data = json.loads(path.read_text())
            kernels = data["kernels"]
            if not isinstance(kernels, dict):
                raise ValueError("'kernels' is not an object")
        except Exception as exc:  # corrupt JSON, wrong structure, unreadable
            log.warning("laser_triton: ignoring config file %s (%s: %s)", path,
                        type(exc).__name__, exc)
            return []
        tv = data.get("triton_version")
        if tv != triton.__version__:
            log.info("laser_triton: config file %s was written with Triton %s (running %s); "
                     "using it, entries are checked by fit", path, tv, triton.__version__)
        return [(f"{label} {path}", kernels)]

    def _entries(self, tables, kernel: str):
        for label, kernels in tables:
            table = kernels.get(kernel)
            if not isinstance(table, dict):
                continue
            for key, entry in table.items():
                why = validate_entry(kernel, entry)
                if why is not None:
                    self._log_once(kernel, f"skip-{label}-{key}", "warning",
                                   f"skipping {kernel} entry {key} in {label}: {why}")
                    continue
                yield label, _canonical(key), entry

    def _ranked(self, tables, kernel, D, r, dtype, N, keys, nearest: bool, coeff: str):
        """Entries of `tables` for `kernel`: exact keys in priority order, or all entries of
        the same dtype and C dtype by (log D, log r[, log N]) distance."""
        found = list(self._entries(tables, kernel))
        if not nearest:
            order = {(label, k): i for i, (label, _) in enumerate(tables) for k in keys}
            order = {lk: i * len(keys) + keys.index(lk[1]) for lk, i in order.items()}
            hits = sorted((order[(lb, k)], lb, k, e) for lb, k, e in found if (lb, k) in order)
            return [h[1:] for h in hits]
        scored = []
        for label, key, entry in found:
            parsed = _parse_key(key)
            if parsed is None or parsed[2] != dtype or parsed[3] != coeff or \
                    (parsed[1] % 16 == 0) != (r % 16 == 0):
                continue  # another dtype, C dtype, or divisibility of r: another binary
            d = abs(math.log2(parsed[0] / D)) + abs(math.log2(parsed[1] / r))
            if N is not None and parsed[4] is not None:
                d += 0.25 * abs(math.log(parsed[4] / n_bucket(N), 4))
            scored.append((d, len(scored), label, key, entry))
        return [t[2:] for t in sorted(scored, key=lambda t: t[:2])]

    def fits(self, kernel: str, entry: dict, D: int, r: int, dtype: str,
             coeff: str = DEFAULT_COEFF) -> bool:
        """Whether `entry` compiles for this store's arch within its shared-memory limit and
        passes the static audit (no spills, registers, tensor cores where required), with C
        stored as `coeff`."""
        from ._audit import audit, check  # noqa: PLC0415

        try:
            facts = audit(kernel, D, r, dtype, {**self.defaults[kernel], **entry}, coeff=coeff)
        except Exception as exc:  # does not compile at all (e.g. out of registers/shared)
            log.warning("laser_triton: %s config %s does not compile (%s)", kernel, entry, exc)
            return False
        bad = check(facts)
        if bad:
            log.warning("laser_triton: %s config %s fails the sm_%d audit: %s", kernel, entry,
                        self.arch, "; ".join(bad))
        return not bad and facts.shared <= self.shared_limit

    def lookup(self, kernel: str, D: int, r: int, dtype: str, N: int | None = None,
               coeff: str = DEFAULT_COEFF):
        """The config (a dict; a str for PATH_TABLE, or None when it has no entry) of a
        launch at (D, r, dtype[, N]) with C stored as `coeff` (ignored by the kernels whose
        binary does not depend on it: `keyed_on_coeff`)."""
        coeff = coeff if keyed_on_coeff(kernel) else DEFAULT_COEFF
        ckey = (kernel, config_key(D, r, dtype, N, coeff))
        if ckey in self._cache:
            return self._cache[ckey]
        # r's own entry, then its class representative's (the same binary: `rank_class`)
        ranks = list(dict.fromkeys((r, rank_representative(r))))
        keys = [config_key(D, k, dtype, n, coeff) for k in ranks
                for n in ((N, None) if N else (None,))]
        if kernel == PATH_TABLE:
            # A design chosen at a padded rank holds for every rank padded alike, and one
            # made for bf16 C for another C, unless they have their own entries (set where
            # no config of that design fits them); configs never carry over.
            keys += [config_key(D, k, dtype, None, c) for c in dict.fromkeys((coeff, DEFAULT_COEFF))
                     for k in dict.fromkeys((*ranks, _pow2(r)))]
            keys = list(dict.fromkeys(keys))
        near = kernel != PATH_TABLE  # a path choice does not carry over to other shapes
        steps = [("exact", self.tuned, False), ("nearest", self.tuned, True),
                 ("safe default (exact)", self.fallback, False),
                 ("safe default (nearest)", self.fallback, True)]
        result, used = None, None
        for how, tables, nearest in steps:
            if nearest and not near:
                continue
            for label, key, entry in self._ranked(tables, kernel, D, r, dtype, N, keys, nearest,
                                                  coeff):
                if self.validate_fit and near and not self.fits(kernel, entry, D, r, dtype,
                                                                coeff):
                    self._log_once(kernel, f"unfit-{label}-{key}", "warning",
                                   f"{kernel}: rejecting {key} from {label}: it does not fit "
                                   f"{self.shared_limit} bytes of shared memory")
                    continue
                result = entry if isinstance(entry, str) else {**self.defaults[kernel], **entry}
                used = (how, label, key)
                break
            if used:
                break
        if used is None:
            result = None if kernel == PATH_TABLE else dict(self.defaults[kernel])
            self._log_once(kernel, "built-in", "info",
                           f"{kernel}: no tuned config for {self.gpu}; using built-in defaults")
        else:
            how, label, key = used
            self._log_once(kernel, f"{how}-{label}", "info",
                           f"{kernel}: using {how} configs from {label} (first: {key} for {ckey[1]})")
        self._cache[ckey] = result
        return result

    def remember_path(self, D: int, r: int, dtype: str, path: str,
                      coeff: str = DEFAULT_COEFF) -> None:
        self._cache[(PATH_TABLE, config_key(D, r, dtype, None, coeff))] = path

    def remember(self, kernel: str, D: int, r: int, dtype: str, N: int | None, cfg: dict,
                 coeff: str = DEFAULT_COEFF) -> None:
        """Replace a cached config by one that ran (after an out-of-resource fallback)."""
        coeff = coeff if keyed_on_coeff(kernel) else DEFAULT_COEFF
        self._cache[(kernel, config_key(D, r, dtype, N, coeff))] = dict(cfg)

    def _log_once(self, kernel: str, what: str, level: str, msg: str) -> None:
        if (kernel, what) not in self._logged:
            self._logged.add((kernel, what))
            getattr(log, level)("laser_triton: " + msg)


_STORES: dict[str, ConfigStore] = {}


def get_store(device: torch.device) -> ConfigStore:
    """The store for this device's GPU name (built once; honours LASER_TRITON_CONFIG_DIR)."""
    name = gpu_name(device)
    store = _STORES.get(name)
    if store is None:
        store = _STORES[name] = ConfigStore(name, os.environ.get("LASER_TRITON_CONFIG_DIR"),
                                            interpreter=device.type != "cuda")
    return store


def reset_stores() -> None:
    """Forget every store (tests, or after changing LASER_TRITON_CONFIG_DIR)."""
    _STORES.clear()
