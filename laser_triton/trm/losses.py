"""Stable-max cross-entropy and the deep-supervision (ACT) loss with its metrics.

Stable-max (Prieto et al., "Grokking at the edge of numerical stability") replaces exp in the
softmax with s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0, which grows linearly and so
does not saturate; the reference computes it in float64 and so does this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_LABEL", "log_stablemax", "stablemax_cross_entropy", "act_loss"]

IGNORE_LABEL = -100


def _s(x: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    return torch.where(x < 0, 1.0 / (1.0 - x + eps), x + 1.0)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    s = _s(x)
    return torch.log(s / s.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position loss (same shape as labels), 0 where labels are ignored."""
    if valid is None:
        valid = labels != IGNORE_LABEL
    logprobs = log_stablemax(logits.to(torch.float64), dim=-1)
    safe = torch.where(valid, labels, 0).long().unsqueeze(-1)
    picked = torch.gather(logprobs, -1, safe).squeeze(-1)
    return -torch.where(valid, picked, 0.0)


def act_loss(logits: torch.Tensor, q_halt_logits: torch.Tensor, labels: torch.Tensor,
             halted: torch.Tensor, steps: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one supervision step, summed over the batch (divide by the batch size before
    backward, as the reference does), and metric sums over the samples that halt now.

    loss = sum_b mean_cells CE(b) + 0.5 * sum_b BCE(q_halt(b), exact(b)): the Q-halt head learns
    to predict whether the current answer is entirely correct.
    """
    valid = labels != IGNORE_LABEL
    counts = valid.sum(-1)
    divisor = counts.clamp_min(1)
    with torch.no_grad():
        preds = logits.argmax(-1)
        correct = valid & (preds == labels)
        exact = correct.sum(-1) == counts
        done = halted & (counts > 0)
        metrics = {
            "count": done.sum(),
            "cell_acc": torch.where(done, correct.sum(-1).float() / divisor, 0.0).sum(),
            "exact_acc": (done & exact).sum(),
            "q_halt_acc": (done & ((q_halt_logits >= 0) == exact)).sum(),
            "steps": torch.where(done, steps, 0).sum(),
        }
    lm_loss = (stablemax_cross_entropy(logits, labels, valid) / divisor.unsqueeze(-1)).sum()
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt_logits, exact.to(q_halt_logits.dtype),
                                                     reduction="sum")
    metrics["lm_loss"] = lm_loss.detach()
    metrics["q_halt_loss"] = q_halt_loss.detach()
    return lm_loss + 0.5 * q_halt_loss, metrics
