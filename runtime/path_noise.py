"""Path noise at inference, drawn on the host: sigma * eps for every damped update of a step.

The official code adds sigma * N(0, 1) at every damped update, at inference too (docs/algorithm.md#path-noise).
The runtime draws those addends here, per trajectory and step, and feeds them to the noisy step
graph as its `noise` input (float32 [B, U, L, D], U = H_cycles * (L_cycles + 1) updates in the
order `EqRModel.step` applies them), so one graph serves every sigma and every backend (torch,
ONNX Runtime, TensorRT) adds the same numbers.

Reproducibility: the noise of step n (1-based) of trajectory (puzzle i, breadth k) in a run with
seed s comes from numpy's Philox generator seeded by SeedSequence([s, i, k], spawn_key=(n,)),
the step-n child of the seed its initial state is drawn from (eqr.runtime.solver.initial_states).
It is a function of (s, i, k, n) and sigma alone: neither the batch a row shares, nor its slot,
nor compaction, nor retries change it.
"""
from __future__ import annotations

import numpy as np


def noise_rng(key: tuple[int, int, int], step: int) -> np.random.Generator:
    """The generator of step `step` (1-based) of the trajectory keyed (seed, puzzle, breadth index)."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(list(key), spawn_key=(step,))))


def draw_noise(keys: np.ndarray, steps: np.ndarray, sigma: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """float32 (R, U, L, D): row r is sigma[r] * eps, eps ~ N(0, 1) from `noise_rng(keys[r], steps[r])`;
    rows with sigma 0 are zeros (nothing drawn). keys int64 (R, 3), steps int (R,), sigma float (R,)."""
    out = np.zeros((len(keys), *shape), np.float32)  # (R, U, L, D)
    for r in np.flatnonzero(np.asarray(sigma) > 0):
        eps = noise_rng(tuple(int(v) for v in keys[r]), int(steps[r])).standard_normal(shape, dtype=np.float32)
        out[r] = eps * np.float32(sigma[r])
    return out
