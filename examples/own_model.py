"""LASER around your own recursive model: a weight-tied transformer block applied n times.

    .venv/bin/python examples/own_model.py      # CPU: about 20 s of one core (README)
    .venv/bin/python examples/own_model.py --steps 50 --tau 0.1 --device cuda

What it shows, on a model that is not the TRM:
- the three calls a model needs: `laser.watch(net)` (site names), `laser.compress()` around the
  part whose activations should be compressed, `laser.role(...)` per application of the shared
  network, and `laser.raw()` around attention internals;
- a training loop with the plain model and the LASER model side by side from the same
  weights: bytes autograd saved vs bytes LASER held, and how far LASER's gradients are from the
  plain ones (each rebuilt activation is within tau of the original, so gradients move by about
  tau);
- checkpointing LASER's state with the model's (`laser.state_dict()`).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import laser_triton as lt
from laser_triton.tools.cliutil import add_threads_argument, apply_threads, positive_int


class SharedBlock(nn.Module):
    """Post-norm transformer block; attention runs inside `laser.raw()` when LASER is on."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(4 * width, width, bias=False)
        self.laser: lt.Laser | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, L, D = h.shape
        q, k, v = self.qkv(h).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # SDPA saves its output and logsumexp for an exact softmax backward: keep them exact.
        with self.laser.raw() if self.laser is not None else torch.enable_grad():
            a = F.scaled_dot_product_attention(q, k, v)
        h = F.rms_norm(h + self.out(a.transpose(1, 2).reshape(B, L, D)), (D,))
        return F.rms_norm(h + self.down(F.gelu(self.up(h))), (D,))


class Recursive(nn.Module):
    """z <- block(z + x), n times; only the last `grad_steps` applications keep gradients."""

    def __init__(self, width: int, heads: int, n: int, grad_steps: int) -> None:
        super().__init__()
        self.block = SharedBlock(width, heads)
        self.head = nn.Linear(width, 1)
        self.n, self.grad_steps = n, grad_steps

    def forward(self, x: torch.Tensor, laser: lt.Laser | None) -> torch.Tensor:
        self.block.laser = laser
        z = torch.zeros_like(x)
        with torch.no_grad():
            for _ in range(self.n - self.grad_steps):
                z = self.block(z + x)
        ctx = laser.compress() if laser is not None else torch.enable_grad()
        with ctx:
            for i in range(self.grad_steps):
                # one role per application: LASER tracks each role's sites across steps
                with laser.role(f"step{i}") if laser is not None else torch.enable_grad():
                    z = self.block(z + x)
            return self.head(z).squeeze(-1)


def batch(step: int, B: int, L: int, D: int, device: torch.device) -> tuple:
    """Inputs from a slowly varying low-dimensional family (activations that compress)."""
    g = torch.Generator().manual_seed(step)
    basis = torch.randn(8, D, generator=torch.Generator().manual_seed(0))
    x = torch.randn(B, L, 8, generator=g) @ basis + 0.05 * torch.randn(B, L, D, generator=g)
    return x.to(device), x.sum(-1).sign().to(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=positive_int, default=12)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--width", type=positive_int, default=256, help="a multiple of 4 (heads)")
    ap.add_argument("--device", default="cpu")
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    if args.width % 4:
        ap.error(f"--width must be a multiple of the 4 attention heads, got {args.width}")
    device = torch.device(args.device)
    apply_threads(args.threads, device.type, prog="own_model")
    torch.manual_seed(0)
    plain = Recursive(args.width, heads=4, n=6, grad_steps=3).to(device)
    model = copy.deepcopy(plain)
    laser = lt.Laser(lt.LaserConfig(tau=args.tau, rank=16, max_rank=128))
    laser.watch(model)  # sites named like "step0/block.up#1"
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in (plain, model)]
    print(f"{'step':>4} {'plain loss':>10} {'LASER loss':>10} {'grad err':>9} {'held/saved':>10}")
    for step in range(args.steps):
        x, y = batch(step, 16, 64, args.width, device)
        grads = []
        for m, opt, lz in ((plain, opts[0], None), (model, opts[1], laser)):
            loss = F.binary_cross_entropy_with_logits(m(x, lz), (y > 0).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads.append((loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])))
            opt.step()
        (lp, gp), (ll, gl) = grads
        s = laser.summary()
        print(f"{step:>4} {lp:>10.4f} {ll:>10.4f} {float((gl - gp).norm() / gp.norm()):>9.4f} "
              f"{s['ratio']:>10.2f}")
    report = laser.report()
    print(report[report.width > 0][["site", "width", "rank", "tensors", "raw_bytes",
                                    "stored_bytes", "max_rel_err", "resets"]].to_string(index=False))
    state = {"model": model.state_dict(), "laser": laser.state_dict()}  # resume with both
    restored = lt.Laser(laser.cfg)
    restored.load_state_dict(state["laser"])
    print(f"LASER held {s['stored_bytes'] / 2**20:.2f} MiB for the {s['raw_bytes'] / 2**20:.2f} "
          f"MiB autograd saved in the last step; state of {len(restored.trackers)} sites saved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
