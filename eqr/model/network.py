"""The Equilibrium Reasoner step f(z, x): one weight-tied block stack, iterated by the caller.

The math is described in docs/algorithm.md#the-step-f (written anew from the official
`locuslab/EqR` models/eqr.py and models/layers.py; TRM for the H/L schedule). This file owns only
the math of one outer step; loops over outer steps live in `eqr.runtime` (inference) and
`eqr.training` (deep supervision).

Shape letters: B batch, L sequence (tokens), D width, V vocab, H heads, E head dim.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from eqr.contract.artifact import INIT_SCALE as TRUNC_NORMAL_SCALE
from eqr.contract.artifact import INIT_TRUNCATION as _TRUNC
from eqr.contract.config import ModelConfig

# --------------------------------------------------------------------------- initialisation

# The truncated normal keeps +-2 standard deviations of the underlying normal, rescaled to have
# exactly the nominal std (the distribution is part of the step contract: eqr.contract.artifact).
_Z = math.erf(_TRUNC / math.sqrt(2.0))


def trunc_normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Compensated truncated normal: std exactly `std`, support +-2.2737 std (docs/algorithm.md#initial-states)."""
    if std == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    c = std * TRUNC_NORMAL_SCALE
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device=device)
    u = (2.0 * u - 1.0) * _Z  # U(erf(-2/sqrt2), erf(2/sqrt2))
    x = math.sqrt(2.0) * torch.erfinv(u) * c
    return x.clamp_(-_TRUNC * c, _TRUNC * c).to(dtype)


def swiglu_intermediate(hidden: int, expansion: float) -> int:
    """ceil_to_multiple(round(expansion * hidden * 2/3), 256); Python's round (halves to even)."""
    size = round(expansion * hidden * 2 / 3)
    return -(-size // 256) * 256


# --------------------------------------------------------------------------- layers


class Linear(nn.Module):
    """Bias-free (unless asked) linear layer, fp32 weights cast to the input dtype at use."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in]
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            self.weight.copy_(trunc_normal(tuple(self.weight.shape), 1.0 / math.sqrt(self.weight.shape[1]), generator))
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale-free RMSNorm over the last dim, computed in fp32 and cast back."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, expansion: float) -> None:
        super().__init__()
        inter = swiglu_intermediate(hidden, expansion)
        self.gate_up = Linear(hidden, 2 * inter)  # fused [gate | up], gate first
        self.down = Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two matmuls on row slices of the fused weight instead of one matmul and a split: the
        # same numbers, and the exported graph loses a Split that cost ONNX Runtime 28% of a step.
        weight = self.gate_up.weight.to(x.dtype)  # [2I, in]: gate rows first
        inter = weight.shape[0] // 2
        gate, up = F.linear(x, weight[:inter]), F.linear(x, weight[inter:])
        return self.down(F.silu(gate) * up)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """[L] positions -> [L, dim] angles laid out as [angle, angle] (rotate-half convention)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)  # [dim/2]
    angles = positions.float()[:, None] * inv_freq[None, :]  # [L, dim/2]
    return torch.cat((angles, angles), dim=-1)  # [L, dim]


def rope_cos_sin(config: ModelConfig, seq_len: int,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [L, E] for 1D RoPE, or 2D RoPE (rows on the first half, columns on the second),
    computed on `device` (the activations' own: no host tensor, no copy inside a CUDA-graph capture)."""
    E = config.head_dim
    if config.pos_encodings == "rope2d":
        height = config.board_height or math.isqrt(seq_len)
        width = config.board_width or math.isqrt(seq_len)
        if height * width != seq_len:
            raise ValueError(f"rope2d board {height}x{width} does not cover {seq_len} tokens; set board_height/board_width")
        pos = torch.arange(seq_len, device=device)
        rows = _rope_angles(pos // width, E // 2, config.rope_theta)  # [L, E/2]
        cols = _rope_angles(pos % width, E // 2, config.rope_theta)  # [L, E/2]
        angles = torch.cat((rows, cols), dim=-1)  # [L, E]
    else:
        angles = _rope_angles(torch.arange(seq_len, device=device), E, config.rope_theta)  # [L, E]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, two_d: bool) -> torch.Tensor:
    """x: [B, L, H, E]; rotate-half within the whole head (1D) or within each half (2D), in fp32."""
    x32 = x.float()
    cos, sin = cos[:, None, :], sin[:, None, :]  # [L, 1, E]
    if two_d:
        a, b = x32.chunk(2, dim=-1)
        rotated = torch.cat((_rotate_half(a), _rotate_half(b)), dim=-1)
    else:
        rotated = _rotate_half(x32)
    return (x32 * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Non-causal multi-head attention with a fused q|k|v projection and optional RoPE."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.qkv = Linear(D, 3 * D)  # heads 0..H-1 are q, then H of k, then H of v
        self.out = Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        H, E = self.config.num_heads, self.config.head_dim
        q, k, v = self.qkv(x).view(B, L, 3 * H, E).split(H, dim=2)  # each [B, L, H, E]
        if self.config.pos_encodings != "none":
            cos, sin = rope_cos_sin(self.config, L, x.device)
            two_d = self.config.pos_encodings == "rope2d"
            q, k = apply_rope(q, cos, sin, two_d), apply_rope(k, cos, sin, two_d)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, L, E]
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class ReasoningBlock(nn.Module):
    """Post-norm block: token mixing (MLP over tokens or attention), then a channel SwiGLU."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.mlp_t = config.mlp_t
        if config.mlp_t:
            self.token_mlp = SwiGLU(config.seq_len, config.expansion)
        else:
            self.attn = Attention(config)
        self.mlp = SwiGLU(config.hidden_size, config.expansion)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mlp_t:
            t = h.transpose(1, 2)  # [B, D, L]
            # normalised over tokens (docs/algorithm.md#the-block-stack)
            t = rms_norm(t + self.token_mlp(t), self.eps)
            h = t.transpose(1, 2)  # [B, L, D]
        else:
            h = rms_norm(h + self.attn(h), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


# --------------------------------------------------------------------------- the model


# Path noise of the damped updates: sigma (a float: eps drawn at each update from a generator, as in
# training) or the addends sigma * eps themselves, one per update of the step ([B, U, L, D]) or of
# one damped update ([B, L, D]); the runtime draws them on the host (docs/algorithm.md#path-noise).
Noise = float | torch.Tensor


def _update_noise(noise: Noise, u: int) -> Noise:
    """The noise of update u: the float sigma unchanged, or slice u of a per-step tensor."""
    return noise[:, u] if isinstance(noise, torch.Tensor) else noise


def _noise_addend(noise: Noise, generator: torch.Generator | None, z: torch.Tensor) -> torch.Tensor | None:
    """What one damped update of z adds: the given addend, sigma * eps drawn now, or None (noise 0)."""
    if isinstance(noise, torch.Tensor):
        return noise.to(z.dtype)
    if not noise:
        return None
    return noise * torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)


class LatentState(NamedTuple):
    z_H: torch.Tensor  # [B, L, D]
    z_L: torch.Tensor  # [B, L, D]


class StepOutput(NamedTuple):
    state: LatentState  # detached: no gradient flows across outer steps
    logits: torch.Tensor  # [B, L, V]
    q_halt: torch.Tensor  # [B] fp32 halting logit


class EqRModel(nn.Module):
    """The weight-tied EqR network. `step` is one outer step (docs/algorithm.md#the-hl-schedule);
    callers own the loop."""

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        D, V = config.hidden_size, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(ReasoningBlock(config) for _ in range(config.L_layers))
        self.lm_head = Linear(D, V)
        self.q_head = Linear(D, 2, bias=True)  # output 0 is q_halt; output 1 is never used
        self.reset_parameters(torch.Generator().manual_seed(seed))
        self.source = None  # eqr.model.load.ModelSource, set by load_model
        self.metadata: dict = {}  # checkpoint metadata (training command, data, metrics)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.forward_dtype)

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            D = self.config.hidden_size
            self.embed.weight.copy_(trunc_normal(tuple(self.embed.weight.shape), 1.0 / math.sqrt(D), generator))
            for module in self.modules():
                if isinstance(module, Linear):
                    module.reset_parameters(generator)
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)  # sigmoid(-5) ~= 0.0067: "do not halt" at the start

    def initial_state(self, batch_size: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> LatentState:
        """Fresh i.i.d. truncated-normal z_H, z_L per sample, token and channel (docs/algorithm.md#initial-states)."""
        shape = (batch_size, self.config.seq_len, self.config.hidden_size)
        z_H = trunc_normal(shape, self.config.H_init_std, generator, self.dtype, device)
        z_L = trunc_normal(shape, self.config.L_init_std, generator, self.dtype, device)
        return LatentState(z_H, z_L)

    def embed_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> x = sqrt(D) * Embed(tokens), [B, L, D]."""
        scale = math.sqrt(self.config.hidden_size)
        return scale * F.embedding(tokens.long(), self.embed.weight.to(self.dtype))

    def damped_update(self, z: torch.Tensor, injection: torch.Tensor, noise: Noise = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """z <- (1 - lambda) z + lambda Blocks(z + u) + sigma eps; damping mixes the pre-injection z.
        noise: sigma (eps ~ N(0, 1) drawn here from `generator`) or the addend sigma * eps itself, [B, L, D]."""
        h = z + injection
        for block in self.blocks:
            h = block(h)
        lam = self.config.lambda_
        z_next = (1.0 - lam) * z + lam * h
        addend = _noise_addend(noise, generator, z)
        return z_next if addend is None else z_next + addend

    def latent_recursion(self, state: LatentState, x: torch.Tensor, noise: Noise = 0.0,
                         generator: torch.Generator | None = None, first: int = 0) -> LatentState:
        """L_cycles z_L updates (injection z_H + x), then one z_H update (injection z_L only).
        A noise tensor [B, U, L, D] gives update `first + i` of this recursion its addend noise[:, first + i]."""
        z_H, z_L = state
        for i in range(self.config.L_cycles):
            z_L = self.damped_update(z_L, z_H + x, _update_noise(noise, first + i), generator)
        z_H = self.damped_update(z_H, z_L, _update_noise(noise, first + self.config.L_cycles), generator)
        return LatentState(z_H, z_L)

    def step(self, state: LatentState, tokens: torch.Tensor, noise: Noise = 0.0,
             generator: torch.Generator | None = None) -> StepOutput:
        """One outer step: H_cycles latent recursions, gradient only through the last
        (docs/algorithm.md#the-hl-schedule). noise: sigma, drawn from `generator` at every damped
        update, or the addends themselves, float [B, U, L, D] with U = `updates_per_step` in update
        order (recursion h's z_L updates, then its z_H update, at u = h * (L_cycles + 1) + i)."""
        if isinstance(noise, torch.Tensor):
            self.check_noise(noise, state.z_H.shape)
        x = self.embed_input(tokens)  # [B, L, D]
        state = LatentState(state.z_H.to(self.dtype), state.z_L.to(self.dtype))
        per = self.config.L_cycles + 1  # updates per latent recursion
        with torch.no_grad():
            for h in range(self.config.H_cycles - 1):
                state = self.latent_recursion(state, x, noise, generator, first=h * per)
        state = self.latent_recursion(state, x, noise, generator, first=(self.config.H_cycles - 1) * per)
        logits = self.lm_head(state.z_H)  # [B, L, V]
        q_halt = self.q_head(state.z_H[:, 0]).float()[:, 0]  # [B], token 0 (no puzzle prefix)
        return StepOutput(LatentState(state.z_H.detach(), state.z_L.detach()), logits, q_halt)

    def check_noise(self, noise: torch.Tensor, state_shape: torch.Size) -> None:
        """ValueError unless `noise` is [B, U, L, D] for a state [B, L, D] (skipped while tracing)."""
        B, L, D = state_shape
        expected = (B, self.config.updates_per_step, L, D)
        if not torch.jit.is_tracing() and tuple(noise.shape) != expected:
            raise ValueError(f"noise must be [B, U, L, D] = {list(expected)} (U = H_cycles * (L_cycles + 1)), "
                             f"got {list(noise.shape)}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops_per_step(config: ModelConfig) -> int:
    """Forward FLOPs (2 x multiply-accumulate) of one outer step for one sample."""
    L, D, V = config.seq_len, config.hidden_size, config.vocab_size

    def swiglu_params(h: int) -> int:
        return 3 * h * swiglu_intermediate(h, config.expansion)

    block = 2 * swiglu_params(D) * L  # channel MLP on every token
    if config.mlp_t:
        block += 2 * swiglu_params(L) * D  # token MLP on every channel
    else:
        block += 2 * (4 * D * D) * L  # q, k, v and output projections
        block += 2 * 2 * L * L * D  # QK^T and AV
    head = 2 * L * D * V + 2 * D * 2  # lm head on every token, q head on token 0
    return config.blocks_per_step * block + head
