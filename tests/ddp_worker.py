"""Worker for tests/test_distributed.py: 2-process gloo DDP training with LASER."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from models import GatedMLP, low_rank_tokens  # noqa: E402

import laser_triton as lt  # noqa: E402


def run(rank: int, world: int, init_file: str, out_dir: str, sync_basis: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)  # same init on every rank (DDP also broadcasts it)
    model = GatedMLP()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    laser = lt.Laser(lt.LaserConfig(tau=0.05, max_rank=48, min_width=64, sync_basis=sync_basis,
                                    shrink_every=2))
    target = torch.randn(2, 150, 160, generator=torch.Generator().manual_seed(5))
    for step in range(4):
        x = low_rank_tokens(2, 150, 160, rank=6, seed=100 * step + rank).requires_grad_()
        if step == 3 and rank == 1:  # a rank-dependent spike: new directions on rank 1 only
            x = (x + 3.0 * low_rank_tokens(2, 150, 160, rank=6, seed=777)).detach().requires_grad_()
        with laser.compress():
            loss = (ddp(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {
        "params": [p.detach().clone() for p in model.parameters()],
        "bases": {k: tr.U.clone() for k, tr in laser.trackers.items() if tr.U is not None},
        "resets": {k: tr.resets for k, tr in laser.trackers.items()},
        "ranks": {k: tr.rank for k, tr in laser.trackers.items()},
    }
    torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, init_file, out_dir, sync = sys.argv[1:6]
    run(int(rank), int(world), init_file, out_dir, sync == "1")
