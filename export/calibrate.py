"""Built-in INT8 calibration data: step inputs recorded along FP32 trajectories, all depths.

Until the calibration module supplies scales, `eqr export --precision int8` calibrates on
(tokens, z_H, z_L) as the step sees them in deployment: task puzzles, random initial states,
and every state along noise-free FP32 trajectories (deployment spec: not only k = 0).

`--calib-data FILE.npz` replaces the puzzles, or the whole set:
    tokens (or inputs)  int [N, L]          puzzles; trajectories are run from random states
    z_H, z_L            float32 [N, L, D]   optional: recorded states, used as they are
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from eqr.config import ModelConfig
from eqr.errors import EqRError
from eqr.export.parity import StepFn, feeds_of

ROWS_PER_FEED = 16  # calibration batch (rows) per ONNX Runtime call


def trajectory_feeds(step: StepFn, tokens: np.ndarray, z_H: np.ndarray, z_L: np.ndarray, steps: int,
                     progress=None) -> list[dict[str, np.ndarray]]:
    """Feeds of the states at depths 0..steps-1 of trajectories driven by `step` (the FP32 graph)."""
    rows_t, rows_H, rows_L = [], [], []
    for _ in range(steps):
        rows_t.append(tokens)
        rows_H.append(z_H)
        rows_L.append(z_L)
        out = step(tokens, z_H, z_L)
        z_H, z_L = out["z_H_out"], out["z_L_out"]
        if progress:
            progress(1)
    return split_feeds(np.concatenate(rows_t), np.concatenate(rows_H), np.concatenate(rows_L))


def split_feeds(tokens: np.ndarray, z_H: np.ndarray, z_L: np.ndarray,
                rows: int = ROWS_PER_FEED) -> list[dict[str, np.ndarray]]:
    """[N, ...] arrays -> feeds of at most `rows` rows."""
    return [feeds_of(tokens[i:i + rows], z_H[i:i + rows], z_L[i:i + rows]) for i in range(0, len(tokens), rows)]


def read_calib_npz(path: str, config: ModelConfig) -> dict[str, Any]:
    """Validate a --calib-data file -> {"tokens": int32 [N, L], "z_H"/"z_L": float32 [N, L, D] or None}."""
    file = Path(path)
    if not file.is_file():
        raise EqRError(f"--calib-data {path}: no such file; pass an .npz with a 'tokens' array [N, {config.seq_len}]")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EqRError(f"--calib-data {path}: not a readable .npz file ({e})") from None
    key = "tokens" if "tokens" in arrays else "inputs" if "inputs" in arrays else None
    if key is None:
        raise EqRError(f"--calib-data {path}: has {sorted(arrays)}, needs a 'tokens' (or 'inputs') array "
                       f"[N, {config.seq_len}]")
    tokens = arrays[key]
    L, D, V = config.seq_len, config.hidden_size, config.vocab_size
    if tokens.ndim != 2 or tokens.shape[1] != L or len(tokens) == 0:
        raise EqRError(f"--calib-data {path}: '{key}' has shape {list(tokens.shape)}, expected [N, {L}] with N >= 1")
    if not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() >= V:
        raise EqRError(f"--calib-data {path}: '{key}' must hold integer token ids 0..{V - 1}")
    states = [arrays.get("z_H"), arrays.get("z_L")]
    if (states[0] is None) != (states[1] is None):
        raise EqRError(f"--calib-data {path}: give both 'z_H' and 'z_L' or neither")
    if states[0] is not None:
        for name, value in zip(("z_H", "z_L"), states):
            if value.shape != (len(tokens), L, D) or not np.issubdtype(value.dtype, np.floating):
                raise EqRError(f"--calib-data {path}: '{name}' has shape {list(value.shape)} ({value.dtype}), "
                               f"expected float [{len(tokens)}, {L}, {D}]")
            if not np.isfinite(value).all():
                raise EqRError(f"--calib-data {path}: '{name}' holds NaN or Inf")
        states = [v.astype(np.float32) for v in states]
    return {"tokens": tokens.astype(np.int32), "z_H": states[0], "z_L": states[1], "path": str(file)}
