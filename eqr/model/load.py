"""`load_model`: one entry point from a checkpoint path, a bundled model name or a preset name."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eqr.contract.bundled import BUNDLED_FILE, bundled_dir, bundled_names
from eqr.contract.config import PRESETS
from eqr.contract.errors import EqRError
from eqr.model.checkpoint import check_state_dict, read_checkpoint
from eqr.model.network import EqRModel, flops_per_step

WEIGHTS = ("ema", "model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights came from."""

    kind: str  # "official" (EqR training checkpoint), "eqr" (our checkpoint), "bundled", "init" (fresh)
    location: str  # file path, bundled name or preset name
    weights: str  # "ema", "model" or "init"
    sha256: str | None = None
    note: str = ""

    @property
    def description(self) -> str:
        kinds = {"official": "official EqR checkpoint", "eqr": "eqr checkpoint",
                 "bundled": "bundled eqr model", "init": "fresh initialisation"}
        return f"{kinds[self.kind]} {self.location}"


def resolve(path_or_name: str | os.PathLike[str]) -> tuple[str, str]:
    """-> (kind, location): a file path, a bundled model file, or a preset name."""
    text = str(path_or_name)
    if Path(text).exists():
        return "file", text
    bundled = bundled_dir() / text / BUNDLED_FILE
    if bundled.is_file():
        return "bundled", str(bundled)
    if text in PRESETS:
        return "preset", text
    looks_like_path = os.sep in text or text.endswith((".pt", ".pth"))
    options = ", ".join(bundled_names() + sorted(PRESETS))
    if looks_like_path:
        raise EqRError(f"{text}: no such file; pass a checkpoint path, a bundled model or a preset ({options})")
    raise EqRError(f"{text!r} is not a file, bundled model or preset; choose one of: {options}")


def load_model(path_or_name: str | os.PathLike[str], weights: str = "ema", seed: int = 0) -> EqRModel:
    """Build an `EqRModel` from an eqr/official checkpoint, a bundled name, or a preset (fresh init).

    `weights="ema"` uses the EMA weights when the file has them (as official evaluation does)
    and falls back to the raw weights otherwise; `model.source` records which were used.
    `seed` only matters for presets (fresh initialisation).
    """
    if weights not in WEIGHTS:
        raise EqRError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    kind, location = resolve(path_or_name)
    if kind == "preset":
        model = EqRModel(PRESETS[location][0], seed=seed)
        model.source = ModelSource("init", location, "init", note=f"preset, seed {seed}")
        return model.eval()

    ckpt = read_checkpoint(location)
    model = EqRModel(ckpt.config)
    used, note = weights, ""
    state = ckpt.ema if weights == "ema" else ckpt.model
    if state is None:
        used, note, state = "model", "file has no EMA weights; used the raw model weights", ckpt.model
    check_state_dict(model.state_dict(), state, f"{location} [{used}]")
    model.load_state_dict(state)
    source_kind = "bundled" if kind == "bundled" else ckpt.kind
    shown = str(path_or_name) if kind == "bundled" else location
    model.source = ModelSource(source_kind, shown, used, ckpt.sha256, note)
    model.metadata = ckpt.metadata
    return model.eval()


def model_summary(model: EqRModel) -> dict[str, Any]:
    """What `eqr info` prints: architecture, config, size, cost and provenance."""
    config = model.config
    source = model.source or ModelSource("init", "EqRModel(config)", "init")
    mixer = "mlp_t (MLP over tokens)" if config.mlp_t else f"attention ({config.pos_encodings})"
    return {
        "architecture": f"EqR, {config.L_layers} shared post-norm block(s), {mixer}, "
                        f"H_cycles {config.H_cycles} x L_cycles {config.L_cycles}",
        "config": config.to_dict(),
        "parameters": model.num_parameters(),
        "blocks_per_outer_step": config.blocks_per_step,
        "flops_per_outer_step_per_sample": flops_per_step(config),
        "source": asdict(source) | {"description": source.description},
        "metadata": model.metadata,
    }
