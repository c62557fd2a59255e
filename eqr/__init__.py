"""eqr: Equilibrium Reasoners, exported and deployed.

    from eqr import load_model
    model = load_model("paper-sudoku")            # or a checkpoint path / bundled name
    state = model.initial_state(8, generator=g)   # LatentState(z_H, z_L), each [B, L, D]
    out = model.step(state, tokens)               # StepOutput(state, logits, q_halt)
"""
__version__ = "0.1.0"

from eqr.config import ModelConfig, TrainConfig  # noqa: E402
from eqr.errors import EqRError  # noqa: E402
from eqr.load import load_model  # noqa: E402
from eqr.model import EqRModel, LatentState, StepOutput  # noqa: E402

__all__ = ["EqRError", "EqRModel", "LatentState", "ModelConfig", "StepOutput", "TrainConfig", "load_model", "__version__"]
