"""The Tiny Recursive Model (arXiv 2510.04871) with LASER around its gradient-carrying cycle.

One supervision step (`TRM.forward`) runs T = H_cycles answer updates, each after n = L_cycles
latent updates, with a single network:

    z <- net(z, y + x)   (n times)        x: embedded question, y: answer state, z: latent
    y <- net(y, z)

The first T-1 cycles run under torch.no_grad(); only the last keeps gradients, so autograd saves
the intermediates of (n+1) network calls. That cycle runs inside `laser.compress()`, each call
inside `laser.role("z")` / `laser.role("y")`, so LASER can store the saved activations in
low rank; `laser=None` (the default) trains plainly. Deep supervision follows the reference: the
carry (y, z, step counters, current puzzles) persists across optimizer steps, one supervision
step per training step, and halted samples are replaced by new data; evaluation runs all
`halt_max_steps` steps. The Q-halt head reads the first prefix position.

Deliberate differences from SamsungSAILMontreal/TinyRecursiveModels (trm.py, layers.py,
sparse_embedding.py, losses.py):
- The puzzle embedding is an nn.Parameter (with its own SparseSignSGD, see sparse.py) instead of
  a buffer plus a gradient-carrying copy, so `parameters()` counts it (512 more for Sudoku).
- H_init/L_init (here `y_init`/`z_init`) are fp32 buffers cast to the activation dtype at use;
  the reference stores them in bf16. Values round identically.
- The activation dtype follows the device (bf16 on CUDA, fp32 on CPU) unless set explicitly.
- The first carry is built from y_init/z_init instead of torch.empty; every sample starts
  halted, so it is replaced before use either way.
- Exploration draws from an explicit torch.Generator (for exact resume) instead of the global
  RNG, and `q_continue` bootstrapping (the reference's `no_ACT_continue=False`) is not
  implemented: the paper's configuration trains the halt head only.
- Attention saves only its qkv projection and recomputes RoPE + SDPA in backward
  (attention.py); gradients are those of plain autograd.
- Optional (`lean_saves=True`, off by default): RMSNorm saves its output and row scales instead
  of an fp32 copy of its input, the SwiGLU tail saves only the gate/up output, and projections
  save their input as given and the fp32 weight instead of copies (lean.py). Same forward bit
  for bit; SwiGLU gradients are bit-identical, RMSNorm's differ by rounding.
- Compiling the whole model works with LASER inside: LASER's hooks are excluded from tracing.
- Not compiled by default (the reference compiles the whole model); the trainer compiles the
  network with `compile=True`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .config import TRMConfig
from .layers import CastedEmbedding, CastedLinear, ReasoningNet, RotaryEmbedding, trunc_normal_
from .sparse import PuzzleEmbedding

__all__ = ["TRM", "Carry", "SaveContext"]


class SaveContext(Protocol):
    """What the model needs from LASER (or from a saved-tensor counter with the same shape)."""

    def compress(self) -> contextlib.AbstractContextManager: ...
    def role(self, name: str) -> contextlib.AbstractContextManager: ...


@dataclass
class Carry:
    """State carried across supervision steps (and so across optimizer steps)."""

    y: torch.Tensor  # (B, total_len, D) answer state, detached
    z: torch.Tensor  # (B, total_len, D) latent, detached
    steps: torch.Tensor  # (B,) int32 supervision steps taken on the current puzzle
    halted: torch.Tensor  # (B,) bool; halted samples take new data at the next step
    data: dict[str, torch.Tensor]  # the puzzles being worked on

    def state_dict(self) -> dict[str, object]:
        return {"y": self.y, "z": self.z, "steps": self.steps, "halted": self.halted,
                "data": dict(self.data)}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> Carry:
        return cls(state["y"], state["z"], state["steps"], state["halted"], dict(state["data"]))


def _where_rows(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view((-1,) + (1,) * (b.ndim - 1)), a, b)


class TRM(nn.Module):
    """Tiny Recursive Model. `laser`: a `laser_triton.Laser` (or anything with `compress()` and
    `role(name)` context managers) wrapped around the gradient-carrying cycle; None trains
    plainly."""

    def __init__(self, config: TRMConfig, laser: SaveContext | None = None) -> None:
        super().__init__()
        self.config = config
        self.laser = laser
        D = config.hidden_size
        self.embed_scale = math.sqrt(D)
        # Scaled by sqrt(D) at use, so embeddings start at unit scale like the hidden states.
        self.embed_tokens = CastedEmbedding(config.vocab_size, D, init_std=1.0 / self.embed_scale)
        self.lm_head = CastedLinear(D, config.vocab_size)
        self.q_head = CastedLinear(D, 2, bias=True)  # [halt, continue] logits
        with torch.no_grad():  # Q starts near "do not halt" (sigmoid(-5)) for bootstrapping
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.puzzle_emb = (PuzzleEmbedding(config.num_puzzle_ids, config.puzzle_emb_dim)
                           if config.puzzle_emb_dim > 0 else None)
        self.rotary = (RotaryEmbedding(config.head_dim, config.total_len, config.rope_theta)
                       if config.pos_encodings == "rope" else None)
        self.embed_pos = (CastedEmbedding(config.total_len, D, init_std=1.0 / self.embed_scale)
                          if config.pos_encodings == "learned" else None)
        self.net = ReasoningNet(config)
        # Fixed (never trained) initial states of y and z.
        self.register_buffer("y_init", trunc_normal_(torch.empty(D), std=1.0))
        self.register_buffer("z_init", trunc_normal_(torch.empty(D), std=1.0))

    # -- helpers --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def act_dtype(self) -> torch.dtype:
        return self.config.resolve_dtype(self.device)

    def main_parameters(self) -> Iterator[nn.Parameter]:
        """Everything AdamW (and the EMA) trains: all parameters but the puzzle embedding."""
        sparse = set() if self.puzzle_emb is None else {id(self.puzzle_emb.weight)}
        return (p for p in self.parameters() if id(p) not in sparse)

    def _grad_scope(self) -> contextlib.AbstractContextManager:
        if self.laser is None or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        return self.laser.compress()

    def _role(self, name: str) -> contextlib.AbstractContextManager:
        if self.laser is None or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        return self.laser.role(name)

    def input_embeddings(self, inputs: torch.Tensor, puzzle_ids: torch.Tensor) -> torch.Tensor:
        """x: (B, total_len, D) = sqrt(D) * [puzzle prefix ; token embeddings]."""
        cfg, dtype = self.config, self.act_dtype
        x = self.embed_tokens(inputs.long(), dtype)
        if cfg.puzzle_emb_len > 0:
            B = inputs.shape[0]
            if self.puzzle_emb is not None:
                pe = self.puzzle_emb(puzzle_ids, dtype)
                # Zero-pad to the prefix: only the first position carries the embedding.
                pad = cfg.puzzle_emb_len * cfg.hidden_size - pe.shape[-1]
                prefix = torch.nn.functional.pad(pe, (0, pad)).view(B, cfg.puzzle_emb_len, -1)
            else:
                prefix = x.new_zeros(B, cfg.puzzle_emb_len, cfg.hidden_size)
            x = torch.cat((prefix, x), dim=1)
        if self.embed_pos is not None:  # 1/sqrt(2) keeps the variance of the sum
            x = 0.707106781 * (x + self.embed_pos.weight.to(dtype))
        return self.embed_scale * x

    # -- one supervision step without the ACT bookkeeping ---------------------------------------
    def recurse(self, y: torch.Tensor, z: torch.Tensor, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """T cycles of (n latent updates, one answer update); gradients flow through the last."""
        cfg, net = self.config, self.net
        cos_sin = self.rotary() if self.rotary is not None else None
        with torch.no_grad():
            for _ in range(cfg.H_cycles - 1):
                for _ in range(cfg.L_cycles):
                    z = net(z, y + x, cos_sin)
                y = net(y, z, cos_sin)
        with self._grad_scope():
            for _ in range(cfg.L_cycles):
                with self._role("z"):
                    z = net(z, y + x, cos_sin)
            with self._role("y"):
                y = net(y, z, cos_sin)
        return y, z

    def inner(self, y: torch.Tensor, z: torch.Tensor, data: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (y, z, token logits (B, seq_len, V), Q logits (B, 2) in fp32)."""
        x = self.input_embeddings(data["inputs"], data["puzzle_ids"])
        y, z = self.recurse(y, z, x)
        logits = self.lm_head(y)[:, self.config.puzzle_emb_len:]
        q_logits = self.q_head(y[:, 0]).float()
        return y, z, logits, q_logits

    # -- deep supervision ---------------------------------------------------------------------
    def initial_carry(self, batch: dict[str, torch.Tensor]) -> Carry:
        """A carry where every sample is halted, so the first step loads the whole batch."""
        B, cfg = batch["inputs"].shape[0], self.config
        shape = (B, cfg.total_len, cfg.hidden_size)
        return Carry(
            y=self.y_init.to(self.act_dtype).expand(shape).clone(),
            z=self.z_init.to(self.act_dtype).expand(shape).clone(),
            steps=torch.zeros(B, dtype=torch.int32, device=self.device),
            halted=torch.ones(B, dtype=torch.bool, device=self.device),
            data={k: v.clone() for k, v in batch.items()},
        )

    def forward(self, carry: Carry, batch: dict[str, torch.Tensor],
                generator: torch.Generator | None = None
                ) -> tuple[Carry, dict[str, torch.Tensor]]:
        """One supervision step. Samples halted in `carry` restart from y_init/z_init on the
        puzzle at the same index of `batch`; the others continue their puzzle."""
        cfg, reset = self.config, carry.halted
        dtype = self.act_dtype
        y = _where_rows(reset, self.y_init.to(dtype), carry.y)
        z = _where_rows(reset, self.z_init.to(dtype), carry.z)
        steps = torch.where(reset, 0, carry.steps)
        data = {k: _where_rows(reset, batch[k], v) for k, v in carry.data.items()}

        y, z, logits, q_logits = self.inner(y, z, data)
        outputs = {"logits": logits, "q_halt_logits": q_logits[:, 0],
                   "q_continue_logits": q_logits[:, 1]}

        with torch.no_grad():
            steps = steps + 1
            halted = steps >= cfg.halt_max_steps
            if self.training and cfg.halt_max_steps > 1:
                halted = halted | (outputs["q_halt_logits"] > 0)
                # Exploration: with probability p, forbid halting before a random step in
                # [2, halt_max_steps].
                B = steps.shape[0]
                explore = torch.rand(B, generator=generator, device=steps.device) \
                    < cfg.halt_exploration_prob
                min_steps = torch.randint(2, cfg.halt_max_steps + 1, (B,), generator=generator,
                                          device=steps.device, dtype=steps.dtype)
                halted = halted & (steps >= explore * min_steps)
        return Carry(y.detach(), z.detach(), steps, halted, data), outputs
