"""An independent, slow NumPy (float64) reference of one EqR outer step, written from docs/algorithm.md#the-step-f.

It reads the *official* parameter names (docs/formats.md#checkpoints, after prefix stripping) and shares no code
with eqr.model.network, so agreement between the two is evidence that both follow docs/algorithm.md.
"""
from __future__ import annotations

import math

import numpy as np


def rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
    hidden = x @ gate_up.T
    inter = gate_up.shape[0] // 2
    gate, up = hidden[..., :inter], hidden[..., inter:]
    return (silu(gate) * up) @ down.T


def rotate_pairs(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate dim i with dim i + n/2 by angle pos * theta^(-2i/n), element by element."""
    n = x.shape[-1]
    out = np.empty_like(x)
    for i in range(n // 2):
        angle = positions * theta ** (-2.0 * i / n)  # [L]
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]  # broadcast over heads
        a, b = x[:, :, i], x[:, :, i + n // 2]  # [L, H]
        out[:, :, i] = a * c - b * s
        out[:, :, i + n // 2] = b * c + a * s
    return out


def rope(x: np.ndarray, arch: dict) -> np.ndarray:
    """x: [L, H, E] for one sample."""
    L = x.shape[0]
    pos = np.arange(L, dtype=np.float64)
    if arch["pos_encodings"] == "rope":
        return rotate_pairs(x, pos, arch["rope_theta"])
    width = arch.get("board_width") or math.isqrt(L)
    half = x.shape[-1] // 2
    rows = rotate_pairs(x[:, :, :half], pos // width, arch["rope_theta"])
    cols = rotate_pairs(x[:, :, half:], pos % width, arch["rope_theta"])
    return np.concatenate([rows, cols], axis=-1)


def attention(h: np.ndarray, p: dict, prefix: str, arch: dict) -> np.ndarray:
    B, L, D = h.shape
    H = arch["num_heads"]
    E = D // H
    out = np.empty_like(h)
    for b in range(B):
        qkv = h[b] @ p[prefix + "self_attn.qkv_proj.weight"].T  # [L, 3D]
        qkv = qkv.reshape(L, 3 * H, E)
        q, k, v = qkv[:, :H], qkv[:, H:2 * H], qkv[:, 2 * H:]
        if arch["pos_encodings"] != "none":
            q, k = rope(q, arch), rope(k, arch)
        heads = []
        for j in range(H):
            scores = q[:, j] @ k[:, j].T / math.sqrt(E)  # [L, L]
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            heads.append((scores / scores.sum(axis=-1, keepdims=True)) @ v[:, j])
        out[b] = np.concatenate(heads, axis=-1) @ p[prefix + "self_attn.o_proj.weight"].T
    return out


def block(h: np.ndarray, p: dict, i: int, arch: dict) -> np.ndarray:
    prefix = f"L_level.layers.{i}."
    eps = arch["rms_norm_eps"]
    if arch["mlp_t"]:
        t = np.swapaxes(h, 1, 2)  # tokens last: the first norm is over tokens
        t = rms_norm(t + swiglu(t, p[prefix + "mlp_t.gate_up_proj.weight"], p[prefix + "mlp_t.down_proj.weight"]), eps)
        h = np.swapaxes(t, 1, 2)
    else:
        h = rms_norm(h + attention(h, p, prefix, arch), eps)
    return rms_norm(h + swiglu(h, p[prefix + "mlp.gate_up_proj.weight"], p[prefix + "mlp.down_proj.weight"]), eps)


def noisy_module(z: np.ndarray, u: np.ndarray, p: dict, arch: dict) -> np.ndarray:
    h = z + u
    for i in range(arch["L_layers"]):
        h = block(h, p, i, arch)
    return (1 - arch["lambda_"]) * z + arch["lambda_"] * h  # noise 0


def outer_step(p: dict, arch: dict, z_H: np.ndarray, z_L: np.ndarray, tokens: np.ndarray):
    """Returns z_H, z_L, logits [B, L, V], q_halt [B]; p uses official key names, float64."""
    D = p["embed_tokens.embedding_weight"].shape[1]
    x = math.sqrt(D) * p["embed_tokens.embedding_weight"][tokens]
    for _ in range(arch["H_cycles"]):
        for _ in range(arch["L_cycles"]):
            z_L = noisy_module(z_L, z_H + x, p, arch)
        z_H = noisy_module(z_H, z_L, p, arch)
    logits = z_H @ p["lm_head.weight"].T
    q = z_H[:, 0] @ p["q_head.weight"].T + p["q_head.bias"]
    return z_H, z_L, logits, q[:, 0]
