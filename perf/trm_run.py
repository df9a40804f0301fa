"""One TRM training run for bench_trm.py: presets, synthetic batches, the step as the trainer
runs it (or the gradient-carrying cycle alone), and the memory/time measurement of one step."""

from __future__ import annotations

import math
import time

import torch

from laser_triton.tools.training import EMA
from laser_triton.trm import TRM, SparseSignSGD, TRMConfig, act_loss

from .trm_variants import LiveBytes, state_bytes

__all__ = ["CPU_BATCH", "CPU_PRESETS", "CPU_VARIANTS", "DEFAULT_BATCH", "GPU_PRESETS", "GPU_VARIANTS", "Run",
           "make_batches", "measure_step", "preset_config"]

# CPU-only attention twin of `tiny`, so the attention path (and SAC's SDPA rule) runs on CPU.
EXTRA_PRESETS = {"tiny_att": lambda: TRMConfig.tiny().replace(mlp_t=False, pos_encodings="rope")}
GPU_PRESETS = ("paper_sudoku", "paper_sudoku+lean", "paper_sudoku_att", "paper_maze")
DEFAULT_BATCH = {"paper_sudoku": 768, "paper_sudoku_att": 768, "paper_maze": "auto",
                 "tiny": 8, "tiny_att": 8}
DEFAULT_BATCH.update({f"{k}+lean": v for k, v in list(DEFAULT_BATCH.items())})
# Headline first: a time budget drops the least important runs.
GPU_VARIANTS = ("plain", "plain+compile", "laser_triton+compile", "laser_triton",
                "laser_triton_rebuild", "ckpt", "sac", "laser_torch", "ckpt+compile",
                "sac+compile", "laser_torch+compile")
CPU_VARIANTS = ("plain", "ckpt", "sac", "laser_torch", "laser_torch_rebuild")
# On CPU the paper architecture runs at batch 8: byte accounting of the real layer shapes.
CPU_PRESETS = ("tiny", "tiny+lean", "tiny_att", "tiny_att+lean", "paper_sudoku",
               "paper_sudoku+lean")
CPU_BATCH = 8


def preset_config(name: str) -> TRMConfig:
    """A preset by name; the suffix '+lean' turns on lean_saves (e.g. paper_sudoku+lean)."""
    base, lean = (name[:-5], True) if name.endswith("+lean") else (name, False)
    cfg = EXTRA_PRESETS[base]() if base in EXTRA_PRESETS else TRMConfig.preset(base)
    return cfg.replace(lean_saves=True) if lean else cfg


def make_batches(cfg: TRMConfig, batch: int, count: int, seed: int) -> list[dict]:
    """Sudoku presets: generated puzzles (a small pool, augmented); others: random tokens."""
    g = torch.Generator().manual_seed(seed)
    if (cfg.seq_len, cfg.vocab_size) == (81, 11):
        from laser_triton.data.sudoku import PuzzleStream, generate

        pool = generate(min(batch, 32), seed=seed, clues=30)
        stream = PuzzleStream(*pool, batch_size=batch, seed=seed)
        return [next(stream) for _ in range(count)]
    out = []
    for _ in range(count):
        inputs = torch.randint(1, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
        out.append({"inputs": inputs, "labels": torch.randint(1, cfg.vocab_size, inputs.shape,
                                                             generator=g),
                    "puzzle_ids": torch.zeros(batch, dtype=torch.long)})
    return out


class Run:
    """One model, its optimizers and data, for one (preset, scope, variant)."""

    def __init__(self, cfg: TRMConfig, scope: str, batches: list[dict], device: torch.device,
                 seed: int, weights: dict | None) -> None:
        torch.manual_seed(seed)
        self.scope, self.device = scope, device
        self.model = TRM(cfg).to(device)
        if weights is not None:
            self.model.load_state_dict(weights)
        if scope == "cycle":  # recurse() then runs the gradient-carrying cycle only
            self.model.config = cfg.replace(H_cycles=1)
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        self.opt = torch.optim.AdamW(list(self.model.main_parameters()), lr=1e-4,
                                     betas=(0.9, 0.95), weight_decay=1.0)
        emb = self.model.puzzle_emb
        self.sparse_opt = None if emb is None else SparseSignSGD([emb], lr=1e-4, weight_decay=1.0)
        sparse = None if emb is None else emb.weight
        self.named = [(n, p) for n, p in self.model.named_parameters() if p is not sparse]
        self.ema = EMA(self.named, 0.999) if scope == "step" else None
        self.gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.carry = None
        self.k = 0
        if scope == "cycle":
            with torch.no_grad():
                b = self.batches[0]
                x = self.model.input_embeddings(b["inputs"], b["puzzle_ids"])
                self.y = self.model.initial_carry(b).y
                self.z = torch.randn_like(self.y)
            self.x = x.detach().requires_grad_(True)

    def state(self) -> tuple:
        return (self.model, self.opt, self.ema.shadow if self.ema else {},
                self.carry.state_dict() if self.carry else {})

    def step(self, mark) -> None:
        """One step; mark("fwd") before the forward, mark("loss") once the loss exists."""
        model, self.k = self.model, self.k + 1
        if self.scope == "cycle":
            mark("fwd")
            y, _ = model.recurse(self.y, self.z, self.x)
            loss = y.float().square().mean()
            mark("loss")
            loss.backward()
            self.x.grad = None
            model.zero_grad(set_to_none=True)
            return
        data = self.batches[self.k % len(self.batches)]
        if self.carry is None:
            self.carry = model.initial_carry(data)
        mark("fwd")
        self.carry, out = model(self.carry, data, generator=self.gen)
        loss, _ = act_loss(out["logits"], out["q_halt_logits"], self.carry.data["labels"],
                           self.carry.halted, self.carry.steps)
        mark("loss")
        (loss / data["inputs"].shape[0]).backward()
        self.opt.step()
        if self.sparse_opt is not None:
            self.sparse_opt.step()
            self.sparse_opt.zero_grad(set_to_none=True)
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.named)


def measure_step(run: Run, device: torch.device) -> dict:
    """Memory of one step (allocator on CUDA, LiveBytes on CPU) and its time on CUDA."""
    marks: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        run.step(lambda name: marks.__setitem__(name, torch.cuda.memory_allocated()))
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        peak = torch.cuda.max_memory_allocated()
        return dict(peak=peak, act_peak=peak - start, act=marks["loss"] - marks["fwd"], ms=ms)
    base = state_bytes(*run.state())
    with LiveBytes() as live:
        run.step(lambda name: marks.__setitem__(name, live.live()))
    return dict(peak=base + live.peak, act_peak=live.peak, act=marks["loss"] - marks["fwd"],
                ms=math.nan)
