"""AdamATan2 in pure torch and the learning-rate schedule (docs/training.md#optimizer-and-schedule).

AdamATan2 replaces Adam's m / (sqrt(v) + eps) by atan2(m, sqrt(v)): bounded steps, no eps.
Weight decay is decoupled and scaled by the learning rate, on every parameter (as official).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from eqr.contract.config import TrainConfig


class AdamATan2(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 1.0) -> None:
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid AdamATan2 settings: lr {lr}, betas {betas}, weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1.0 - lr * wd)
                m.lerp_(p.grad, 1.0 - beta1)
                v.lerp_(p.grad.square(), 1.0 - beta2)
                bias1 = 1.0 - beta1**t
                bias2_sqrt = math.sqrt(1.0 - beta2**t)
                p.add_(torch.atan2(m, v.sqrt() / bias2_sqrt), alpha=-lr / bias1)
        return None


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (counted from 0): linear warmup, then cosine to the floor.

    1. warmup: lr * (step + 1) / warmup for the first `lr_warmup_steps` steps;
    2. then cosine from lr down to lr * lr_min_ratio over the remaining epochs
       (lr_min_ratio 1.0, the official value, makes it constant).
    """
    t = step + 1  # the official counter starts at 1
    if t < config.lr_warmup_steps:
        return config.lr * t / config.lr_warmup_steps
    span = max(1, config.epochs - config.lr_warmup_steps)
    progress = min(1.0, (t - config.lr_warmup_steps) / span)
    floor = config.lr * config.lr_min_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
