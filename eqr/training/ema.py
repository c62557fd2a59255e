"""Exponential moving average of the trainable parameters (docs/training.md#optimizer-and-schedule).

Unlike the official code, the shadow is saved in checkpoints and restored on resume.
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, rate: float) -> None:
        self.rate = rate
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- rate * shadow + (1 - rate) * param."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.rate)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A full model state dict with the EMA parameters (buffers, if any, from the model)."""
        return {k: self.shadow.get(k, v).detach().clone() for k, v in model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
