"""Static audit of the sm_90 binaries: registers, spills, shared memory, SASS instruction mix.

Each kernel config is compiled for sm_90 at the launch specialization (`_hopper`) and its
cubin read with the tools that ship with Triton (`cuobjdump -res-usage`, `nvdisasm`):
- REG / STACK / LOCAL (local memory) from the resource usage; spills show up as LOCAL/STACK
  and as LDL/STL instructions;
- counts of HMMA (mma.sync tensor cores), HGMMA (wgmma), DMMA (fp64 tensor cores), FFMA;
- the loop structure: instructions of the innermost loop bodies (backward branches) and of
  the loops around them, which the performance model turns into an issue-slot bound;
- the wgmma shapes: a 64xNx16 HGMMA with both operands in shared memory reads 2 KiB + 32 N
  bytes at 128 B/clk per SM but does only N/2 clocks of math, so narrow N is bound by
  shared-memory bandwidth (`wgmma_clocks`; efficiency N = 16: 0.40, N = 32: 0.67,
  N >= 64: 1.0), summed per loop level for the model's tensor bound.
`check(facts)` lists what breaks the budget (the CI gate and the autotune prune use it).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import triton

from ._hopper import compile_info
from ._spec import SPECS

__all__ = ["Facts", "audit", "check", "sass_facts", "wgmma_efficiency", "MAX_REGS",
           "MAX_COMPILE_S"]

MAX_REGS = 255  # per thread on sm_90 (more spills); the budget below is per warps
REG_FILE = 65_536  # 32-bit registers per SM
SHARED_LIMIT = 232_448
MAX_COMPILE_S = 10.0
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_OP = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)"
                 r"(.*?);", re.M)
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass
class Facts:
    kernel: str
    config: str
    regs: int
    stack: int
    local: int
    spill_ops: int  # LDL + STL instructions
    shared: int
    num_warps: int
    hmma: int
    hgmma: int
    dmma: int
    ffma: int
    instructions: int
    loop_body: int  # instructions in the innermost loop bodies (per iteration, all of them)
    outer_body: int  # instructions of the loops around those, outside the inner bodies
    loop_mma: int  # tensor-core instructions in those bodies
    compile_s: float  # CPU seconds (compiler + ptxas; a Triton cache hit costs ~0)
    compile_wall_s: float
    mma_eff: float = 1.0  # tensor-pipe efficiency of the loop HGMMA shapes (wgmma_efficiency)
    # Tensor-pipe clocks (per warpgroup) of the HGMMAs in the innermost loop bodies, in the
    # loops around them, and outside loops (`wgmma_clocks`): the model's shape-aware bound.
    mma_clk_inner: float = 0.0
    mma_clk_outer: float = 0.0
    mma_clk_once: float = 0.0

    def row(self) -> dict:
        return asdict(self)


def _tool(name: str, *args: str) -> str:
    out = subprocess.run([str(_TOOLS / name), *args], capture_output=True, text=True, check=True)
    return out.stdout


SMEM_BYTES_PER_CLK = 128  # shared-memory bandwidth per SM
_HGMMA_SHAPE = re.compile(r"\.64x(\d+)x(\d+)\.")


def wgmma_clocks(suffix: str, operands: str) -> tuple[float, float]:
    """(math clocks, issue-limited clocks) of one HGMMA on one SM: math = 64 N K / 2048
    (16-bit MACs per clock per SM; tf32 at half rate) against shared-memory clocks =
    (A bytes unless A is in registers + B bytes) / 128 B/clk. An estimate from the shape."""
    m = _HGMMA_SHAPE.search(suffix)
    if not m:
        return 0.0, 0.0
    n, k = int(m[1]), int(m[2])
    elem = 2 if k == 16 else 1 if k == 32 else 4  # k16: 16-bit, k32: 8-bit, k8: tf32
    a_in_regs = re.match(r"\s*R\d+\s*,\s*R\d+", operands) is not None
    c_math = 64 * n * k / 2048 * (2 if elem == 4 else 1)
    c_smem = ((0 if a_in_regs else 64 * k * elem) + n * k * elem) / SMEM_BYTES_PER_CLK
    return c_math, max(c_math, c_smem)


def wgmma_efficiency(hgmmas: list[tuple[str, str]]) -> float:
    """Fraction of the tensor pipe's peak these HGMMAs ((suffix, operands) from the SASS)
    allow when shared-memory bandwidth is the other limit (`wgmma_clocks`); 1.0 if none."""
    clocks = [wgmma_clocks(s, o) for s, o in hgmmas]
    total = sum(c for _, c in clocks)
    return round(sum(m for m, _ in clocks) / total, 3) if total else 1.0


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(`cuobjdump -res-usage` text, `nvdisasm -c` SASS) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return _tool("cuobjdump", "-res-usage", path), _tool("nvdisasm", "-c", path)
    finally:
        os.unlink(path)


def loop_structure(sass: str) -> tuple[list, list, list]:
    """(ops, bodies, inner) of a SASS listing: ops are (address, opcode, suffix, operands);
    a branch to an earlier address closes a loop body [target, branch]; the innermost bodies
    contain no other (the self-loop at the end is the exit trap)."""
    ops = [(int(m[1], 16), m[2], m[3], m[4]) for m in _OP.finditer(sass)]
    # Labels (".L_x_3:") name the address of the next instruction.
    labels, pending = {}, []
    for line in sass.splitlines():
        lab = re.match(r"^(\.L_x_\d+):", line)
        if lab:
            pending.append(lab[1])
            continue
        m = _OP.match(line + "\n")
        if m and pending:
            labels.update({name: int(m[1], 16) for name in pending})
            pending = []
    bodies = []
    for addr, op, _, rest in ops:
        target = re.search(r"\((\.L_x_\d+)\)", rest) if op == "BRA" else None
        if target and target[1] in labels and labels[target[1]] < addr:
            bodies.append((labels[target[1]], addr))
    inner = [b for b in bodies if not any(o != b and b[0] <= o[0] and o[1] <= b[1]
                                          for o in bodies)]
    return ops, bodies, inner


def sass_facts(cubin: bytes) -> dict:
    """Resource usage and instruction counts of a cubin."""
    res_usage, sass = disassemble(cubin)
    res = _RES.search(res_usage)
    ops4, bodies, inner = loop_structure(sass)
    ops = [(a, op, rest) for a, op, _, rest in ops4]
    count = Counter(op for _, op, _ in ops)
    in_loop = [(a, op) for a, op, _ in ops if any(lo <= a <= hi for lo, hi in inner)]
    outer = [b for b in bodies if b not in inner and any(b[0] <= i[0] and i[1] <= b[1]
                                                           for i in inner)]
    in_outer = [a for a, _, _ in ops if any(lo <= a <= hi for lo, hi in outer)
                and not any(lo <= a <= hi for lo, hi in inner)]
    mma = ("HMMA", "HGMMA", "DMMA")
    in_inner = {a for a, _, _ in ops if any(lo <= a <= hi for lo, hi in inner)}
    in_outer_set = set(in_outer)
    hgmma = [(a, suffix, rest) for a, op, suffix, rest in ops4 if op == "HGMMA"]

    def clocks(where) -> float:  # tensor-pipe clocks of the HGMMAs at these addresses
        return round(sum(wgmma_clocks(s, r)[1] for a, s, r in hgmma if where(a)), 2)
    return {"regs": int(res[1]), "stack": int(res[2]), "local": int(res[4]),
            "spill_ops": count["LDL"] + count["STL"], "hmma": count["HMMA"],
            "hgmma": count["HGMMA"], "dmma": count["DMMA"], "ffma": count["FFMA"],
            "instructions": len(ops), "loop_body": len(in_loop), "outer_body": len(in_outer),
            "loop_mma": sum(op in mma for _, op in in_loop),
            "mma_eff": wgmma_efficiency([(s, r) for a, s, r in hgmma
                                         if a in in_inner or a in in_outer_set] or
                                        [(s, r) for _, s, r in hgmma]),
            "mma_clk_inner": clocks(lambda a: a in in_inner),
            "mma_clk_outer": clocks(lambda a: a in in_outer_set),
            "mma_clk_once": clocks(lambda a: a not in in_inner and a not in in_outer_set)}


def config_label(cfg: dict, flags: dict | None = None) -> str:
    items = {**cfg, **(flags or {})}
    return ";".join(f"{k}={v}" for k, v in sorted(items.items()))


def audit(kernel: str, D: int, r: int, dtype: str, cfg: dict, N: int | None = None,
          flags: dict | None = None, coeff: str = "bf16") -> Facts:
    """Compile `cfg` (over the spec's defaults) at this shape for sm_90, C stored as `coeff`
    (a non-bf16 C is part of the config label: it is a different binary), and read it."""
    cfg = {**SPECS[kernel].defaults, **cfg}
    kw = {} if N is None else {"N": N}
    info = compile_info(kernel, D, r, dtype, cfg, flags=flags, coeff=coeff, **kw)
    sf = sass_facts(info["cubin"])
    label = config_label(cfg, flags) + ("" if coeff == "bf16" else f";C={coeff}")
    return Facts(kernel=kernel, config=label, shared=info["shared"],
                 num_warps=info["num_warps"], compile_s=round(info["compile_s"], 2),
                 compile_wall_s=round(info["compile_wall_s"], 2), **sf)


def check(facts: Facts, needs_tensor_cores: bool | None = None) -> list[str]:
    """What breaks the static budget (empty when the variant is fine)."""
    bad = []
    if facts.local or facts.stack or facts.spill_ops:
        bad.append(f"spills/local memory (LOCAL {facts.local}, STACK {facts.stack}, "
                   f"{facts.spill_ops} LDL/STL)")
    if facts.regs * 32 * facts.num_warps > REG_FILE:
        bad.append(f"{facts.regs} registers x {facts.num_warps} warps exceed the register file")
    if facts.shared > SHARED_LIMIT:
        bad.append(f"shared memory {facts.shared} > {SHARED_LIMIT}")
    if needs_tensor_cores is None:
        needs_tensor_cores = SPECS[facts.kernel].tensor_cores and "PRECISION=ieee" not in \
            facts.config
    if needs_tensor_cores and facts.hmma + facts.hgmma == 0:
        bad.append("no tensor-core instructions (HMMA/HGMMA)")
    if facts.compile_s > MAX_COMPILE_S:
        bad.append(f"compile time {facts.compile_s} CPU s > {MAX_COMPILE_S} s")
    return bad
