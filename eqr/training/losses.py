"""Deep-supervision losses (docs/training.md#losses): stablemax cross-entropy in fp64 and the q-halt BCE.

Both return sums over the batch; the caller divides by the global batch size, so that summing
gradients over ranks gives the single-process gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_LABEL = -100


def stablemax_log_probs(logits: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """log softmax with s(x) = x + 1 (x >= 0), 1 / (1 - x + eps) (x < 0) in place of exp, in fp64."""
    x = logits.double()
    s = torch.where(x >= 0, x + 1.0, 1.0 / (1.0 - x + eps))
    return torch.log(s / s.sum(dim=-1, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows of each row's mean CE over its valid tokens. logits [B, L, V], labels [B, L]."""
    valid = labels != IGNORE_LABEL  # [B, L]
    safe_labels = torch.where(valid, labels, 0).long()
    log_p = stablemax_log_probs(logits).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # [B, L]
    ce = torch.where(valid, -log_p, 0.0)
    per_row = ce.sum(-1) / valid.sum(-1).clamp_min(1)  # [B]
    return per_row.sum()


def exact_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: the argmax prediction matches every valid label."""
    valid = labels != IGNORE_LABEL
    return ((logits.argmax(-1) == labels) | ~valid).all(-1)


def q_halt_loss(q_halt: torch.Tensor, seq_correct: torch.Tensor) -> torch.Tensor:
    """Summed BCE-with-logits of the halting head against "this row is solved now"."""
    return F.binary_cross_entropy_with_logits(q_halt.float(), seq_correct.float(), reduction="sum")
