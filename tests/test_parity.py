"""model.step against the independent NumPy reference (float64), loading official key names."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from official import official_state_dict
from reference_numpy import outer_step

from eqr.contract.config import ModelConfig
from eqr.model.checkpoint import official_to_eqr
from eqr.model.network import EqRModel

SUDOKU_64 = ModelConfig(seq_len=81, vocab_size=11, hidden_size=64, mlp_t=True)
SUDOKU_512 = ModelConfig(seq_len=81, vocab_size=11, hidden_size=512, mlp_t=True)
ATTN_ROPE = ModelConfig(seq_len=16, vocab_size=6, hidden_size=32, num_heads=4, L_layers=1, H_cycles=2,
                        L_cycles=2, mlp_t=False, pos_encodings="rope")
ATTN_ROPE2D = ModelConfig(seq_len=36, vocab_size=6, hidden_size=32, num_heads=2, L_layers=1, H_cycles=2,
                          L_cycles=2, mlp_t=False, pos_encodings="rope2d")


def _compare(config: ModelConfig, prefix: str, batch: int = 2) -> None:
    official = official_state_dict(config, seed=7, prefix=prefix)
    model = EqRModel(config, seed=123)  # different init: every weight must come from the file
    model.load_state_dict(official_to_eqr(official))
    g = torch.Generator().manual_seed(0)
    state = model.initial_state(batch, generator=g)
    tokens = torch.randint(1, config.vocab_size, (batch, config.seq_len), generator=g)
    with torch.inference_mode():
        out = model.step(state, tokens, noise=0.0)

    params = {k.replace(prefix, ""): v.double().numpy() for k, v in official.items()}
    arch = config.to_dict()
    z_H, z_L, logits, q = outer_step(params, arch, state.z_H.double().numpy(), state.z_L.double().numpy(),
                                     tokens.numpy())
    assert np.abs(out.logits.numpy() - logits).max() < 1e-4
    assert np.abs(out.state.z_H.numpy() - z_H).max() < 1e-4
    assert np.abs(out.state.z_L.numpy() - z_L).max() < 1e-4
    assert np.abs(out.q_halt.numpy() - q).max() < 1e-4


@pytest.mark.parametrize("prefix", ["_orig_mod.model.inner.", "model.inner."])
def test_sudoku_hidden_64_matches_reference(prefix: str) -> None:
    _compare(SUDOKU_64, prefix)


@pytest.mark.slow
def test_sudoku_hidden_512_matches_reference() -> None:
    _compare(SUDOKU_512, "_orig_mod.model.inner.", batch=1)


@pytest.mark.parametrize("config", [ATTN_ROPE, ATTN_ROPE2D], ids=["rope", "rope2d"])
def test_attention_matches_reference(config: ModelConfig) -> None:
    _compare(config, "_orig_mod.model.inner.")


def test_reference_detects_a_wrong_norm_axis() -> None:
    """The comparison is sensitive: normalising the token MLP over channels breaks parity."""
    import reference_numpy as ref

    official = official_state_dict(SUDOKU_64, seed=7, prefix="")
    params = {k: v.double().numpy() for k, v in official.items()}
    arch = SUDOKU_64.to_dict()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 81, 64))
    tokens = rng.integers(1, 11, (1, 81))
    good = outer_step(params, arch, z, z, tokens)[2]
    original = ref.block

    def wrong_block(h, p, i, arch):  # token MLP without the transpose
        prefix = f"L_level.layers.{i}."
        eps = arch["rms_norm_eps"]
        t = np.swapaxes(h, 1, 2)
        t = np.swapaxes(t + ref.swiglu(t, p[prefix + "mlp_t.gate_up_proj.weight"], p[prefix + "mlp_t.down_proj.weight"]), 1, 2)
        h = ref.rms_norm(t, eps)
        return ref.rms_norm(h + ref.swiglu(h, p[prefix + "mlp.gate_up_proj.weight"], p[prefix + "mlp.down_proj.weight"]), eps)

    ref.block = wrong_block
    try:
        bad = outer_step(params, arch, z, z, tokens)[2]
    finally:
        ref.block = original
    assert np.abs(good - bad).max() > 1e-2
