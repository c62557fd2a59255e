"""Builders for official-layout EqR state dicts and checkpoint files (docs/formats.md#checkpoints), for tests."""
from __future__ import annotations

import dataclasses
import random
import sys
import types
from pathlib import Path

import numpy as np
import torch

from eqr.contract.config import ModelConfig
from eqr.model.network import EqRModel


# eqr name -> official name, written out by hand from the official key names
# (docs/formats.md#checkpoints), independent of OFFICIAL_KEY_MAP.
def official_name(key: str) -> str:
    fixed = {"embed.weight": "embed_tokens.embedding_weight", "lm_head.weight": "lm_head.weight",
             "q_head.weight": "q_head.weight", "q_head.bias": "q_head.bias"}
    if key in fixed:
        return fixed[key]
    _, i, mixer, proj, _ = key.split(".")
    official_mixer = {"token_mlp": "mlp_t", "attn": "self_attn", "mlp": "mlp"}[mixer]
    official_proj = {"gate_up": "gate_up_proj", "down": "down_proj", "qkv": "qkv_proj", "out": "o_proj"}[proj]
    return f"L_level.layers.{i}.{official_mixer}.{official_proj}.weight"


def official_state_dict(config: ModelConfig, seed: int, prefix: str = "_orig_mod.model.inner.") -> dict[str, torch.Tensor]:
    """Random weights under official names; the q head is randomised too so it is tested."""
    model = EqRModel(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("q_head"):
            tensor = 0.1 * torch.randn(tensor.shape, generator=g)
        state[prefix + official_name(key)] = tensor.clone()
    return state


def official_arch(config: ModelConfig) -> dict:
    return {"name": "eqr@EqRModel", "loss": {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"},
            "hidden_size": config.hidden_size, "num_heads": config.num_heads, "expansion": config.expansion,
            "L_layers": config.L_layers, "H_layers": 0, "H_cycles": config.H_cycles, "L_cycles": config.L_cycles,
            "mlp_t": config.mlp_t, "pos_encodings": config.pos_encodings, "forward_dtype": "bfloat16",
            "lambda_": config.lambda_, "noise_scale": config.noise_scale, "H_init_std": 1.0, "L_init_std": 1.0,
            "halt_max_steps": 16, "halt_exploration_prob": 0.1, "puzzle_emb_ndim": 0}


def _fake_official_modules() -> dict[str, types.ModuleType]:
    """Stand-ins for the official `models.eqr` carry dataclasses, only to *write* a realistic pickle."""
    eqr_mod = types.ModuleType("models.eqr")

    @dataclasses.dataclass
    class LatentCarry:
        z_H: torch.Tensor
        z_L: torch.Tensor

    @dataclasses.dataclass
    class ModelCarry:
        inner_carry: LatentCarry
        steps: torch.Tensor
        halted: torch.Tensor
        current_data: dict

    for cls in (LatentCarry, ModelCarry):
        cls.__module__ = "models.eqr"
        cls.__qualname__ = cls.__name__
        setattr(eqr_mod, cls.__name__, cls)
    return {"models": types.ModuleType("models"), "models.eqr": eqr_mod}


def write_official_checkpoint(path: Path, config: ModelConfig, seed: int = 0, compiled: bool = True,
                              with_ema: bool = True) -> dict[str, torch.Tensor]:
    """Write an official-layout training checkpoint; returns the official EMA (or model) weights."""
    prefix = "_orig_mod.model.inner." if compiled else "model.inner."
    model_sd = official_state_dict(config, seed, prefix)
    ema_sd = official_state_dict(config, seed + 100, "_orig_mod.model.inner.")
    modules = _fake_official_modules()
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        eqr_mod = modules["models.eqr"]
        B, L, D = 2, config.seq_len, config.hidden_size
        carry = eqr_mod.ModelCarry(
            eqr_mod.LatentCarry(torch.zeros(B, L, D, dtype=torch.bfloat16), torch.zeros(B, L, D, dtype=torch.bfloat16)),
            torch.zeros(B, dtype=torch.int32), torch.ones(B, dtype=torch.bool),
            {"inputs": torch.zeros(B, L, dtype=torch.int32)})
        rng = np.random.RandomState(0)
        payload = {
            "step": 5000, "total_steps": 50000, "iteration": 5000,
            "model": model_sd,
            "optimizers": [{"state": {0: {"step": torch.tensor(5000.0), "exp_avg": torch.zeros(3),
                                          "exp_avg_sq": torch.zeros(3)}},
                            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 1.0, "params": [0]}]}],
            "optimizer_lrs": [1e-4],
            "carry": carry,
            "rng": torch.get_rng_state(), "numpy": rng.get_state(), "python": random.Random(0).getstate(),
            "train_dataset": {"iters": 5000},
            "config": {"arch": official_arch(config), "data_path": "data/sudoku-extreme-1k-aug-1000",
                       "global_batch_size": 768, "lr": 1e-4, "ema": with_ema},
            "wandb_run_id": "abc123",
        }
        if with_ema:
            payload["ema"] = {"mu": 0.999, "shadow": ema_sd}
        torch.save(payload, path)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return ema_sd if with_ema else model_sd
