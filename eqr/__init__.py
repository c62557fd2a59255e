"""eqr: Equilibrium Reasoners, exported and deployed.

    from eqr import load_model
    model = load_model("paper-sudoku")            # or a checkpoint path / bundled name
    state = model.initial_state(8, generator=g)   # LatentState(z_H, z_L), each [B, L, D]
    out = model.step(state, tokens)               # StepOutput(state, logits, q_halt)

The public names load on first use, so `import eqr` (and `eqr --help`) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "eqr.model.load",
    "EqRModel": "eqr.model.network",
    "LatentState": "eqr.model.network",
    "StepOutput": "eqr.model.network",
    "ModelConfig": "eqr.contract.config",
    "TrainConfig": "eqr.contract.config",
    "EqRError": "eqr.contract.errors",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'eqr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
