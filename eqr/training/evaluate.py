"""Held-out evaluation of a model at several depths, and how fast each answer settles.

A simple loop over `model.step` (the runtime's solver is for deployment; here we need every
step's prediction). Random initial states always; path noise on by default, as in official
evaluation (`noise=0.0` measures the noise-free map the runtime iterates).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from eqr.model.network import EqRModel
from eqr.training.data import step_seed
from eqr.training.losses import IGNORE_LABEL


@torch.no_grad()
def trajectory_predictions(model: EqRModel, inputs: torch.Tensor, depth: int, seed: int,
                           batch_size: int = 256, noise: float | None = None) -> torch.Tensor:
    """Argmax predictions after every outer step: [N, B, L] for inputs [B, L] (N = depth)."""
    noise = model.config.noise_scale if noise is None else noise
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(inputs), batch_size):
        tokens = inputs[start:start + batch_size].long()  # [b, L]
        generator = torch.Generator().manual_seed(step_seed(seed, start, 7))
        state = model.initial_state(len(tokens), generator)
        preds = []
        for _ in range(depth):
            state, logits, _ = model.step(state, tokens, noise=noise, generator=generator)
            preds.append(logits.argmax(-1).to(torch.uint8))  # [b, L]
        chunks.append(torch.stack(preds))  # [N, b, L]
    model.train(was_training)
    return torch.cat(chunks, dim=1)  # [N, B, L]


def exact_by_step(preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, B] bool: every valid label matched after step n+1."""
    valid = labels != IGNORE_LABEL  # [B, L]
    return ((preds.long() == labels) | ~valid).all(-1)


def steps_to_stable(preds: torch.Tensor) -> torch.Tensor:
    """[B] the first outer step from which the prediction never changes again (1-based)."""
    N = preds.shape[0]
    same_as_final = (preds == preds[-1]).all(-1)  # [N, B]
    # last step whose prediction differs from the final one; stable from the step after it
    differs = ~same_as_final
    last_diff = torch.where(differs, torch.arange(1, N + 1)[:, None], 0).amax(0)  # [B]
    return last_diff + 1


def evaluate(model: EqRModel, inputs: torch.Tensor, labels: torch.Tensor, depths: Sequence[int], seed: int,
             tiers: Sequence[str] | None = None, batch_size: int = 256,
             groups: dict[str, Sequence[str]] | None = None, noise: float | None = None) -> dict[str, Any]:
    """Exact and cell accuracy at each depth; steps-to-stable-answer by tier (if tiers are given)
    and by any other labelling in `groups` (name -> one label per puzzle), e.g. maze path length.
    noise: path noise sigma (None: the model's training noise_scale)."""
    depths = sorted(set(int(d) for d in depths))
    preds = trajectory_predictions(model, inputs, depths[-1], seed, batch_size, noise)  # [N, B, L]
    exact = exact_by_step(preds, labels)  # [N, B]
    valid = labels != IGNORE_LABEL
    cell = ((preds.long() == labels) & valid).sum(-1) / valid.sum(-1).clamp_min(1)  # [N, B]
    report: dict[str, Any] = {
        "n": len(inputs),
        "by_depth": [{"depth": d, "exact": float(exact[d - 1].float().mean()), "cell": float(cell[d - 1].mean())}
                     for d in depths],
    }
    labellings = dict(groups or {})
    if tiers is not None:
        labellings = {"tier": tiers} | labellings
    stable = steps_to_stable(preds)  # [B]
    for name, labels_of_rows in labellings.items():
        report[f"steps_to_stable_by_{name}"] = _stable_by_group(stable, exact[-1], list(labels_of_rows))
        report["max_depth"] = depths[-1]
    return report


def _stable_by_group(stable: torch.Tensor, final_correct: torch.Tensor, labels: list[str]) -> list[dict[str, Any]]:
    """Mean/median steps-to-stable and final exact accuracy per label (first-seen order)."""
    rows = []
    for label in dict.fromkeys(labels):
        mask = torch.tensor([x == label for x in labels])
        rows.append({"tier": str(label), "n": int(mask.sum()),
                     "mean_steps_to_stable": float(stable[mask].float().mean()),
                     "median_steps_to_stable": float(stable[mask].float().median()),
                     "exact_at_max_depth": float(final_correct[mask].float().mean())})
    return rows
