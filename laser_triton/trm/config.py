"""TRMConfig: the architecture of a Tiny Recursive Model, with the reference's presets.

The presets follow SamsungSAILMontreal/TinyRecursiveModels (`config/arch/trm.yaml` plus the
per-task overrides of its README):

- `paper_sudoku()`: the mlp_t model of the Sudoku-Extreme runs (`arch.mlp_t=True
  arch.pos_encodings=none`, T=3, n=6): 5,028,866 weights as the reference counts them,
  plus the 512 of the puzzle embedding (see `model.py` for why it is counted here).
- `paper_sudoku_att()`: the attention model of the same runs (RoPE); its two blocks hold
  6,815,744 weights.
- `paper_maze()`: Maze-Hard 30x30 (900 cells + 16 prefix positions = 916 positions, vocabulary
  PAD + "# SGo" = 6, attention, T=3, n=4).
- `tiny()`: a CPU-sized model with the same structure (mlp_t, post-norm blocks, puzzle prefix,
  deep supervision) but narrower and with fewer cycles, so that the demo trains in minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["TRMConfig", "PRESETS", "swiglu_width", "preset_widths"]

_POS_ENCODINGS = ("rope", "learned", "none")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


def swiglu_width(hidden_size: int, expansion: float) -> int:
    """Inner width of a SwiGLU as the reference computes it: round(expansion * h * 2/3),
    rounded up to a multiple of 256 (1536 for h=512, 512 for the 97 mlp_t positions)."""
    inner = round(expansion * hidden_size * 2 / 3)
    return -(-inner // 256) * 256


@dataclass(frozen=True)
class TRMConfig:
    """Architecture of a TRM. Names follow the paper: x the question, y the answer state (the
    reference's z_H), z the latent (the reference's z_L)."""

    # Task
    vocab_size: int = 11  # PAD, blank, digits 1..9 (the reference's Sudoku encoding)
    seq_len: int = 81
    num_puzzle_ids: int = 1  # every Sudoku shares identifier 0 in the reference datasets
    puzzle_emb_len: int = 16  # prefix positions; only the first carries the learned embedding
    puzzle_emb_dim: int = -1  # -1: hidden_size (the reference's `puzzle_emb_ndim: hidden_size`)

    # Network: one 2-block network serves both updates
    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4.0
    num_layers: int = 2
    mlp_t: bool = False  # token-mixing SwiGLU over the sequence axis instead of attention
    pos_encodings: str = "rope"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # Recompute RMSNorm and silu(gate) * up in backward instead of saving fp32 copies and
    # inner-width products (trm/lean.py): same function, fewer saved bytes.
    lean_saves: bool = False

    # Recursion
    H_cycles: int = 3  # T: answer updates per supervision step (the first T-1 without grad)
    L_cycles: int = 6  # n: latent updates per answer update

    # Deep supervision / adaptive halting
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1

    forward_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 elsewhere

    def __post_init__(self) -> None:
        if self.puzzle_emb_dim == -1:
            object.__setattr__(self, "puzzle_emb_dim", self.hidden_size)

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"TRMConfig: {msg}")

        for name in ("vocab_size", "seq_len", "num_puzzle_ids", "hidden_size", "num_heads",
                     "num_layers", "H_cycles", "L_cycles", "halt_max_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.puzzle_emb_len >= 0, "puzzle_emb_len must be >= 0")
        need(self.puzzle_emb_dim >= 0, "puzzle_emb_dim must be >= 0")
        need(self.puzzle_emb_dim <= self.puzzle_emb_len * self.hidden_size,
             "the puzzle embedding must fit in the prefix (puzzle_emb_len * hidden_size)")
        need(self.puzzle_emb_dim == 0 or self.puzzle_emb_len > 0,
             "a puzzle embedding needs prefix positions (puzzle_emb_len > 0)")
        need(self.hidden_size % self.num_heads == 0, "hidden_size must divide into num_heads")
        need(self.mlp_t or (self.hidden_size // self.num_heads) % 2 == 0 or
             self.pos_encodings != "rope", "RoPE needs an even head dimension")
        need(self.expansion > 0, "expansion must be > 0")
        need(self.pos_encodings in _POS_ENCODINGS, f"pos_encodings must be one of {_POS_ENCODINGS}")
        need(not (self.mlp_t and self.pos_encodings == "rope"),
             "mlp_t mixes tokens with a fixed-position MLP and has no attention for RoPE; "
             "use pos_encodings='none' (the reference's Sudoku setting) or 'learned'")
        need(0.0 <= self.halt_exploration_prob <= 1.0, "halt_exploration_prob must be in [0, 1]")
        need(self.forward_dtype in _DTYPES, f"forward_dtype must be one of {_DTYPES}")

    # -- derived sizes -------------------------------------------------------------------
    @property
    def total_len(self) -> int:
        """Positions the network sees: the puzzle prefix plus the puzzle itself."""
        return self.seq_len + self.puzzle_emb_len

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_width(self) -> int:
        return swiglu_width(self.hidden_size, self.expansion)

    @property
    def token_mlp_width(self) -> int:
        return swiglu_width(self.total_len, self.expansion)

    def saved_widths(self) -> tuple[int, ...]:
        """Row widths of the activations this model saves for backward, which LASER may
        compress (it stores those narrower than `LaserConfig.min_width` raw): the hidden size
        (block inputs, norm outputs, projection inputs), the channel SwiGLU's inner width
        (down_proj input) and twice it (the fused gate/up output), then either the mlp_t
        widths (the sequence positions, the token SwiGLU's inner width and twice it) or the
        attention's packed qkv (3 x hidden; attention saves nothing else, trm/attention.py)."""
        widths = {self.hidden_size, self.mlp_width, 2 * self.mlp_width}
        if self.mlp_t:
            widths |= {self.total_len, self.token_mlp_width, 2 * self.token_mlp_width}
        else:
            widths.add(3 * self.hidden_size)
        return tuple(sorted(widths))

    def resolve_dtype(self, device: torch.device | str) -> torch.dtype:
        """The dtype activations run in on `device` (parameters stay fp32)."""
        if self.forward_dtype == "auto":
            return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return getattr(torch, self.forward_dtype)

    def replace(self, **changes: object) -> TRMConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    # -- presets -------------------------------------------------------------------------
    @classmethod
    def paper_sudoku(cls) -> TRMConfig:
        """Sudoku-Extreme, mlp_t (the paper's best Sudoku model): about 5.0M weights."""
        return cls(mlp_t=True, pos_encodings="none", H_cycles=3, L_cycles=6)

    @classmethod
    def paper_sudoku_att(cls) -> TRMConfig:
        """Sudoku-Extreme with self-attention and RoPE: about 6.8M weights."""
        return cls(mlp_t=False, pos_encodings="rope", H_cycles=3, L_cycles=6)

    @classmethod
    def paper_maze(cls) -> TRMConfig:
        """Maze-Hard 30x30: 900 cells plus 16 prefix positions, attention, n=4."""
        return cls(vocab_size=6, seq_len=900, mlp_t=False, pos_encodings="rope",
                   H_cycles=3, L_cycles=4)

    @classmethod
    def tiny(cls) -> TRMConfig:
        """CPU-sized Sudoku model for the demo and tests: hidden 128 (the narrowest width LASER
        compresses by default), mlp_t over the 97 positions, T=2, n=3, 4 supervision steps."""
        return cls(hidden_size=128, num_heads=4, expansion=2.0, mlp_t=True, pos_encodings="none",
                   H_cycles=2, L_cycles=3, halt_max_steps=4)

    @classmethod
    def preset(cls, name: str) -> TRMConfig:
        try:
            return getattr(cls, PRESETS[name])()
        except KeyError:
            raise ValueError(f"unknown TRM preset {name!r}; choose one of {sorted(PRESETS)}") from None


PRESETS: dict[str, str] = {
    "paper_sudoku": "paper_sudoku",
    "paper_sudoku_att": "paper_sudoku_att",
    "paper_maze": "paper_maze",
    "tiny": "tiny",
}


def preset_widths(min_width: int = 1) -> tuple[int, ...]:
    """Every saved row width (`TRMConfig.saved_widths`) of the shipped presets that is at
    least `min_width`: the widths the kernels must serve (the static sm_90 audit's TRM grid,
    perf/audit.py and tests/test_kernel_audit.py, reads them from here)."""
    return tuple(sorted({w for name in PRESETS for w in TRMConfig.preset(name).saved_widths()
                         if w >= min_width}))
