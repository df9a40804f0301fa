"""The last-arriving-program handoffs compile to a correctly ordered protocol for sm_90.

A program writes its partials (every thread), passes a block barrier, and one thread takes a
ticket with `atom.global.gpu.acq_rel` (release: the partials the barrier made visible to it go
out before the ticket; acquire: the last one sees every other program's partials); a second
barrier hands the ticket to all threads before any of them loads the partials. The
interpreter runs programs one at a time and cannot show a missing barrier or a relaxed
atomic; the compiled PTX can. Compiled as the launchers run them (`_hopper.compile_info`).
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("triton")
from laser_triton.kernels import _hopper  # noqa: E402
from laser_triton.kernels._spec import SPECS  # noqa: E402

TICKET = re.compile(r"atom\.global(\.gpu)?\.acq_rel\.add\.u32")
# (kernel, dtype, mode flags, tickets): compress_finish's row-block ticket; the final Gram's
# chunk ticket and per-site tile ticket (padded rank 128); the apply's per-site chunk ticket
CASES = [("compress_finish", "bf16", None, 1),
         ("orth_gram", "fp32", {"WITH_Z": False, "CHECK": True}, 2),
         ("orth_apply", "fp32", {"REPAIR": False, "CHECK": True}, 1)]


def _ticket_protocol(ptx: str) -> list[str]:
    """What is wrong with each ticket in `ptx` (empty: all well ordered)."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    problems = []
    for i, line in enumerate(lines):
        if "atom." not in line or ".add" not in line:
            continue
        if not TICKET.search(line):
            problems.append(f"line {i}: not a gpu-scope acq_rel atomic: {line}")
            continue
        if not line.startswith("@"):
            problems.append(f"line {i}: taken by every thread, not one: {line}")
        before = next((j for j in range(i - 1, -1, -1) if lines[j].startswith(("st.global",
                       "@%p")) and "st.global" in lines[j]), None)
        if before is None or not any("bar.sync" in ln for ln in lines[before:i]):
            problems.append(f"line {i}: no barrier between the partials' stores and the ticket")
        after = next((j for j in range(i + 1, len(lines)) if re.search(r"\bld\.(volatile\.)?global",
                      lines[j])), None)
        if after is not None and not any("bar.sync" in ln for ln in lines[i:after]):
            problems.append(f"line {i}: loads after the ticket without a barrier")
    return problems


@pytest.mark.parametrize("kernel,dtype,flags,tickets", CASES, ids=[c[0] for c in CASES])
def test_tickets_are_acq_rel_and_fenced_by_barriers(kernel, dtype, flags, tickets):
    r = 128 if kernel == "orth_gram" else 16  # the Gram kernel's CHECK runs at padded rank 128
    ptx = _hopper.compile_info(kernel, 256, r, dtype, SPECS[kernel].defaults, flags=flags)["ptx"]
    assert len(TICKET.findall(ptx)) == tickets
    assert _ticket_protocol(ptx) == []


def test_the_checker_sees_a_missing_barrier_and_a_relaxed_ticket():
    good = ["@%p1 st.global.b32 [ %rd1 + 0 ], { %r1 };", "bar.sync 0;",
            "@%p2 atom.global.gpu.acq_rel.add.u32 %r2, [ %rd2 + 0 ], %r3;", "bar.sync 0;",
            "ld.volatile.global.b32 { %r4 }, [ %rd3 + 0 ];"]
    assert _ticket_protocol("\n".join(good)) == []
    assert _ticket_protocol("\n".join(good[:1] + good[2:]))  # no barrier before the ticket
    assert _ticket_protocol("\n".join(good[:3] + good[4:]))  # none after it
    relaxed = good[2].replace(".acq_rel", "")
    assert _ticket_protocol("\n".join(good[:2] + [relaxed] + good[3:]))
