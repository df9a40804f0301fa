"""Worker for tests/test_distributed.py: sync_basis with roles, resets and uneven readiness.

Each step applies a gated MLP (whose saved gate/up halves are partial views of one storage)
three times under roles, on rank-dependent data with a spike on rank 1 at step 2, then saves
two halves of one storage whose energy split differs by rank, so resets (and their
view-tightening scale, which feeds the reset's branches) see different local data. On rank 1
no decision copy is ever "ready": a rank that finalized whenever its own copy arrived would
start a reset's collectives while the other rank was in its next batch's all-reduce.
Writes the bases, counters and the order in which each rank finalized its tensors.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from models import GatedMLP, low_rank_tokens  # noqa: E402

import laser_triton as lt  # noqa: E402
from laser_triton import util  # noqa: E402
from laser_triton.tracker import SiteTracker  # noqa: E402


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A short timeout turns a collective mismatch that would hang into an error.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    if rank == 1:  # this rank's decision copies never arrive early
        util.HostFuture.ready = lambda self: False
    finalized = []
    orig_finalize = SiteTracker.finalize

    def finalize(self, d, passed, *args, **kwargs):
        finalized.append((self.name, self.tensors, bool(passed)))
        return orig_finalize(self, d, passed, *args, **kwargs)

    SiteTracker.finalize = finalize
    torch.manual_seed(0)
    model = GatedMLP()
    laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=48, min_width=64, sync_basis=True,
                                    shrink_every=2, decision_lag=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    view_scale = torch.ones(160)
    if rank == 1:
        view_scale[80:] = 0.03
    for step in range(3):
        x = low_rank_tokens(2, 150, 160, rank=6, seed=100 * step + rank)
        if step == 2 and rank == 1:  # new directions on rank 1 only: a reset on both ranks
            x = x + 3.0 * low_rank_tokens(2, 150, 160, rank=6, seed=777)
        x = x.requires_grad_()
        with laser.compress():
            h = x
            for role in ("z", "z", "y"):
                with laser.role(role):
                    h = model(h)
            with laser.role("v"):  # two saved halves of one storage; on rank 1 the second
                hv = h * view_scale  # holds ~1e-3 of its energy: a tighter reset target there
                g, u = hv.chunk(2, dim=-1)
                loss = h.square().mean() + (g * g).mean() + (u * u).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # keep the replicas identical (what DDP would do)
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
    state = {
        "bases": {k: tr.U.clone() for k, tr in laser.trackers.items() if tr.U is not None},
        "resets": {k: tr.resets for k, tr in laser.trackers.items()},
        "finalized": finalized,
    }
    torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, init_file, out_dir = sys.argv[1:5]
    run(int(rank), int(world), init_file, out_dir)
