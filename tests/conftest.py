"""Shared fixtures. Tests run single-threaded per process (CI runs two processes on 2 cores)."""
from __future__ import annotations

import pytest
import torch

from eqr.contract.config import ModelConfig
from eqr.model.network import EqRModel

torch.set_num_threads(1)


def tiny_config(**overrides) -> ModelConfig:
    """A few-thousand-parameter EqR for fast tests (mlp_t Sudoku 4x4 layout by default)."""
    base = dict(seq_len=16, vocab_size=6, hidden_size=16, num_heads=2, expansion=2.0, L_layers=2,
                H_cycles=2, L_cycles=2, mlp_t=True)
    return ModelConfig(**(base | overrides))


def contracting_model() -> EqRModel:
    """Block weights x0.1: one attractor per puzzle, residual falls ~0.8x per step."""
    model = EqRModel(tiny_config(), seed=0).eval()
    with torch.no_grad():
        for block in model.blocks:
            for p in block.parameters():
                p.mul_(0.1)
    return model


@pytest.fixture
def tiny_model() -> EqRModel:
    return EqRModel(tiny_config(), seed=0).eval()


@pytest.fixture
def tiny_attn_model() -> EqRModel:
    return EqRModel(tiny_config(mlp_t=False, pos_encodings="rope"), seed=0).eval()
