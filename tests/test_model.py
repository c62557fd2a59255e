"""Spec details of the EqR step: init, SwiGLU sizes, heads, damping and injection order, gradients."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from eqr.contract.config import PRESETS
from eqr.model.network import (TRUNC_NORMAL_SCALE, EqRModel, LatentState, flops_per_step, swiglu_intermediate,
                               trunc_normal)


def test_trunc_normal_has_exact_std_and_clipped_support() -> None:
    x = trunc_normal((400_000,), std=1.0, generator=torch.Generator().manual_seed(0))
    assert abs(x.std().item() - 1.0) < 0.02
    assert abs(x.mean().item()) < 0.01
    bound = 2 * TRUNC_NORMAL_SCALE
    assert bound == pytest.approx(2.2737, abs=1e-3)
    assert x.abs().max().item() <= bound + 1e-6
    assert x.abs().max().item() > bound - 0.01  # the support really reaches the clip
    y = trunc_normal((200_000,), std=0.1, generator=torch.Generator().manual_seed(1))
    assert abs(y.std().item() - 0.1) < 0.002


def test_initial_state_is_independent_per_sample_token_channel(tiny_model: EqRModel) -> None:
    g = torch.Generator().manual_seed(0)
    state = tiny_model.initial_state(3, generator=g)
    assert state.z_H.shape == (3, 16, 16) and state.z_L.shape == (3, 16, 16)
    assert not torch.equal(state.z_H[0], state.z_H[1])
    assert not torch.equal(state.z_H[0, 0], state.z_H[0, 1])
    assert not torch.equal(state.z_H, state.z_L)
    again = tiny_model.initial_state(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state.z_H, again.z_H)


@pytest.mark.parametrize("hidden,expected", [(512, 1536), (81, 256), (128, 512), (97, 512)])
def test_swiglu_sizes_follow_the_rounding_rule(hidden: int, expected: int) -> None:
    assert swiglu_intermediate(hidden, 4) == expected


def test_paper_presets_match_the_spec_inventory() -> None:
    sudoku, maze = EqRModel(PRESETS["paper-sudoku"][0]), EqRModel(PRESETS["paper-maze"][0])
    assert sudoku.num_parameters() == 4_855_298
    assert maze.num_parameters() == 263_938
    shapes = {k: tuple(v.shape) for k, v in sudoku.state_dict().items()}
    assert shapes["blocks.0.token_mlp.gate_up.weight"] == (512, 81)
    assert shapes["blocks.1.mlp.down.weight"] == (512, 1536)
    assert {k: tuple(v.shape) for k, v in maze.state_dict().items()}["blocks.0.attn.qkv.weight"] == (384, 128)
    assert flops_per_step(sudoku.config) / 1e9 == pytest.approx(18.73, abs=0.01)
    assert flops_per_step(maze.config) / 1e9 == pytest.approx(13.30, abs=0.01)


def test_q_head_starts_at_weight_zero_bias_minus_five(tiny_model: EqRModel) -> None:
    assert torch.count_nonzero(tiny_model.q_head.weight) == 0
    assert torch.equal(tiny_model.q_head.bias, torch.full((2,), -5.0))
    assert tiny_model.lm_head.bias is None


def _identity_model(lam: float = 0.95) -> EqRModel:
    model = EqRModel(tiny_config(H_cycles=1, L_cycles=2, lambda_=lam))
    model.blocks = nn.ModuleList([nn.Identity()])  # F(z + u) = z + u makes the schedule readable
    return model


def test_damping_mixes_the_pre_injection_state() -> None:
    model = _identity_model(lam=0.95)
    z, u = torch.randn(1, 16, 16), torch.randn(1, 16, 16)
    out = model.damped_update(z, u, noise=0.0, generator=None)
    torch.testing.assert_close(out, 0.05 * z + 0.95 * (z + u))


def test_injection_order_z_L_gets_z_H_plus_x_and_z_H_gets_only_z_L() -> None:
    model = _identity_model(lam=0.5)
    z_H, z_L, x = torch.randn(3, 1, 16, 16).unbind(0)
    out = model.latent_recursion(LatentState(z_H, z_L), x, noise=0.0, generator=None)
    expected_L = z_L
    for _ in range(2):  # L_cycles: z_L <- z_L + lambda (z_H + x)
        expected_L = expected_L + 0.5 * (z_H + x)
    expected_H = z_H + 0.5 * expected_L  # no x in the z_H update
    torch.testing.assert_close(out.z_L, expected_L)
    torch.testing.assert_close(out.z_H, expected_H)


def test_noise_goes_through_the_callers_generator(tiny_model: EqRModel) -> None:
    state = tiny_model.initial_state(2, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 6, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        clean_a = tiny_model.step(state, tokens).logits
        clean_b = tiny_model.step(state, tokens).logits
        noisy_a = tiny_model.step(state, tokens, noise=0.01, generator=torch.Generator().manual_seed(5)).logits
        noisy_b = tiny_model.step(state, tokens, noise=0.01, generator=torch.Generator().manual_seed(5)).logits
        noisy_c = tiny_model.step(state, tokens, noise=0.01, generator=torch.Generator().manual_seed(6)).logits
    assert torch.equal(clean_a, clean_b)
    assert torch.equal(noisy_a, noisy_b)
    assert not torch.equal(noisy_a, noisy_c)
    assert not torch.equal(noisy_a, clean_a)


def test_gradient_flows_only_through_the_last_latent_recursion() -> None:
    model = EqRModel(tiny_config(H_cycles=3, L_cycles=2, L_layers=2))
    calls = {"grad": 0, "no_grad": 0}

    def count(_module, _inputs, output):
        calls["grad" if output.requires_grad else "no_grad"] += 1

    for block in model.blocks:
        block.register_forward_hook(count)
    state = model.initial_state(2, generator=torch.Generator().manual_seed(0))
    out = model.step(state, torch.randint(1, 6, (2, 16)))
    per_recursion = (2 + 1) * 2  # (L_cycles + 1) module calls x L_layers blocks
    assert calls == {"grad": per_recursion, "no_grad": 2 * per_recursion}
    assert not out.state.z_H.requires_grad and not out.state.z_L.requires_grad
    out.logits.sum().backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


def test_bfloat16_forward_keeps_fp32_parameters() -> None:
    model = EqRModel(tiny_config(forward_dtype="bfloat16"))
    state = model.initial_state(2, generator=torch.Generator().manual_seed(0))
    assert state.z_H.dtype == torch.bfloat16
    with torch.inference_mode():
        out = model.step(state, torch.randint(1, 6, (2, 16)))
    assert out.state.z_H.dtype == torch.bfloat16 and out.q_halt.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(out.logits.float()).all()
