"""Data-parallel TRM training with LASER on every rank (torchrun; gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node=2 examples/ddp_laser.py --steps 5 --sync-basis

Each rank compresses its own activations. With --sync-basis the ranks share their bases:
power products are all-reduced and every reset decision is all-reduced first, so all ranks
take the same branch. Prints, on rank 0, the loss and whether parameters and bases agree.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import laser_triton as lt
from laser_triton.data.sudoku import PuzzleStream, generate
from laser_triton.tools.cliutil import apply_threads, choose_threads, nonnegative_int, positive_int
from laser_triton.trm import TRM, TRMConfig
from laser_triton.trm.losses import act_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=positive_int, default=5)
    ap.add_argument("--batch", type=positive_int, default=8, help="per rank")
    ap.add_argument("--sync-basis", action="store_true")
    ap.add_argument("--threads", type=nonnegative_int, default=0,
                    help="intra-op CPU threads per rank; 0 (auto): the cores shared among the "
                    "ranks, 1 when the load average shows them busy")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        # Before anything touches CUDA: NCCL, and every library that launches on the current
        # device (Triton does), must see this rank's GPU, not GPU 0.
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda:  # the ranks share the cores: auto gives each its share (the shared policy
        # of laser_triton.tools.cliutil caps it at 1 on a busy machine)
        share = max(1, (os.cpu_count() or 1) // world)
        threads, _ = choose_threads(args.threads)
        apply_threads(args.threads or min(threads or share, share))

    torch.manual_seed(0)  # identical initialization on every rank
    model = TRM(TRMConfig.tiny()).to(device)
    laser = lt.Laser(lt.LaserConfig(tau=0.05, sync_basis=args.sync_basis))
    laser.watch(model.net)
    model.laser = laser
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    puzzles, solutions = generate(64, seed=0, clues=45)
    stream = PuzzleStream(puzzles, solutions, args.batch, seed=rank)  # each rank its own data
    carry = None
    for step in range(args.steps):
        batch = {k: v.to(device) for k, v in next(stream).items()}
        carry = model.initial_carry(batch) if carry is None else carry
        carry, out = ddp(carry, batch)
        loss, _ = act_loss(out["logits"], out["q_halt_logits"], carry.data["labels"],
                           carry.halted, carry.steps)
        opt.zero_grad()
        (loss / args.batch).backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {float(loss.detach()) / args.batch:.4f}, "
                  f"LASER stored {laser.summary()['ratio']:.2f} of the saved bytes")
    # Check the replicas: parameters always agree; bases agree with --sync-basis.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(same, flat)
    bases = torch.cat([tr.U.reshape(-1) for _, tr in sorted(laser.trackers.items())
                       if tr.U is not None] or [torch.zeros(1, device=device)])
    sizes = [torch.zeros(1, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([float(bases.numel())], device=device))
    bases_same = None
    if len({float(s) for s in sizes}) == 1:
        gathered = [torch.zeros_like(bases) for _ in range(world)]
        dist.all_gather(gathered, bases)
        bases_same = all(torch.equal(bases, g) for g in gathered)
    if rank == 0:
        print("parameters identical across ranks:", all(torch.equal(flat, s) for s in same))
        print("bases identical across ranks:", bases_same)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
