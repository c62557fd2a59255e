"""Local contraction at a settled state: the spectral radius of the step Jacobian, estimated by
power iteration with finite differences through the backend itself (no autograd, so it works
on ONNX Runtime, TensorRT and every precision alike).

    J v ~= (f(z + h v) - f(z)) / h,   h = eps * ||z|| per row,  v <- J v / ||J v||

The last ||J v|| estimates |lambda_max| of the outer step at z (TorchDEQ's power method). A
radius near or above 1 means the fixed point barely attracts: quantization error is then
amplified rather than pulled back (fixed-point error <= eps / (1 - rho)). This calls
`backend.step` directly on fixed states; it is not a solve loop.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from eqr.runtime.backends.base import Backend


def _state_out(backend: Backend, tokens: Any, z: np.ndarray) -> np.ndarray:
    """f(z): z float32 [B, 2, L, D] (z_H, z_L stacked) -> the step's output state, same layout."""
    outputs = backend.step({"tokens": tokens, "z_H": backend.upload(np.ascontiguousarray(z[:, 0])),
                            "z_L": backend.upload(np.ascontiguousarray(z[:, 1]))})
    z_H, z_L = backend.download(outputs["z_H_out"]), backend.download(outputs["z_L_out"])
    return np.stack([z_H, z_L], axis=1).astype(np.float64)  # [B, 2, L, D]


def _row_norm(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.square(x).reshape(len(x), -1).sum(axis=1))  # [B]


def spectral_radius(backend: Backend, tokens: np.ndarray, z_H: np.ndarray, z_L: np.ndarray, iters: int,
                    eps: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-row estimate of the step Jacobian's spectral radius at (z_H, z_L) [B, L, D].

    Returns {"radius": fp64 (B,), "history": fp64 (iters, B)} (the estimate after each iteration).
    The backend must be active.
    """
    z = np.stack([z_H, z_L], axis=1).astype(np.float64)  # [B, 2, L, D]
    B = len(z)
    device_tokens = backend.upload(np.ascontiguousarray(tokens, dtype=np.int32))
    f0 = _state_out(backend, device_tokens, z.astype(np.float32))
    h = eps * np.maximum(_row_norm(z), 1e-12)  # [B]
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(z.shape)
    v /= _row_norm(v)[:, None, None, None]
    history = np.zeros((iters, B))
    for i in range(iters):
        probe = (z + h[:, None, None, None] * v).astype(np.float32)
        jv = (_state_out(backend, device_tokens, probe) - f0) / h[:, None, None, None]
        norm = _row_norm(jv)
        history[i] = norm
        v = jv / np.maximum(norm, 1e-30)[:, None, None, None]
    return {"radius": history[-1], "history": history}
