"""Checkpoints: our format, official EqR files, refusal of pickled code, atomic writes."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from official import write_official_checkpoint

from eqr.contract.errors import CheckpointError
from eqr.contract.io import atomic_open
from eqr.model.checkpoint import OfficialObject, official_to_eqr, read_checkpoint, safe_load, save_checkpoint
from eqr.model.load import load_model
from eqr.model.network import EqRModel


def _save_tiny(path: Path, with_ema: bool = True) -> EqRModel:
    model = EqRModel(tiny_config(), seed=1)
    ema = {k: v + 1.0 for k, v in model.state_dict().items()} if with_ema else None
    save_checkpoint(path, model.config, model.state_dict(), ema, {"train_command": "eqr train ..."})
    return model


def test_eqr_checkpoint_round_trip_prefers_ema(tmp_path: Path) -> None:
    model = _save_tiny(tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # plain weights_only load works
    assert raw["format"] == "eqr-checkpoint" and raw["version"] == 1
    ema = load_model(tmp_path / "m.pt")
    raw_weights = load_model(tmp_path / "m.pt", weights="model")
    torch.testing.assert_close(raw_weights.embed.weight, model.embed.weight)
    torch.testing.assert_close(ema.embed.weight, model.embed.weight + 1.0)
    assert ema.source.kind == "eqr" and ema.source.weights == "ema"
    assert raw_weights.source.weights == "model"
    assert ema.metadata["train_command"] == "eqr train ..."
    assert ema.config == model.config


def test_missing_ema_falls_back_to_model_weights_and_says_so(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "m.pt", with_ema=False)
    model = load_model(tmp_path / "m.pt", weights="ema")
    assert model.source.weights == "model" and "no EMA" in model.source.note


@pytest.mark.parametrize("compiled", [True, False])
def test_official_checkpoint_loads_ema_without_the_official_code(tmp_path: Path, compiled: bool) -> None:
    config = tiny_config(seq_len=81, vocab_size=11, hidden_size=32)
    ema = write_official_checkpoint(tmp_path / "eqr.pth", config, compiled=compiled)
    model = load_model(tmp_path / "eqr.pth")
    assert model.source.kind == "official" and model.source.weights == "ema"
    expected = official_to_eqr(ema)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[key])
    assert model.config.hidden_size == 32 and model.config.seq_len == 81 and model.config.vocab_size == 11
    assert model.config.mlp_t and model.config.H_cycles == config.H_cycles
    assert model.config.forward_dtype == "float32"
    assert model.metadata["official"]["forward_dtype"] == "bfloat16"


def test_official_carry_becomes_inert_placeholders(tmp_path: Path) -> None:
    write_official_checkpoint(tmp_path / "eqr.pth", tiny_config(seq_len=81, vocab_size=11))
    raw = safe_load(tmp_path / "eqr.pth")
    carry = raw["carry"]
    assert isinstance(carry, OfficialObject) and type(carry).__module__ == "models.eqr"
    assert isinstance(carry.inner_carry, OfficialObject)
    assert carry.inner_carry.z_H.dtype == torch.bfloat16
    assert raw["numpy"][0] == "MT19937" and raw["numpy"][1].shape == (624,)
    assert isinstance(raw["python"], tuple)


def test_official_without_ema_uses_model_weights(tmp_path: Path) -> None:
    weights = write_official_checkpoint(tmp_path / "eqr.pth", tiny_config(seq_len=81, vocab_size=11), with_ema=False)
    model = load_model(tmp_path / "eqr.pth")
    assert model.source.weights == "model"
    torch.testing.assert_close(model.lm_head.weight, official_to_eqr(weights)["lm_head.weight"])


class _RunsCode:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("fn", [os.system, eval], ids=["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused_by_name(tmp_path: Path, fn) -> None:
    marker = tmp_path / "pwned"
    payload = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {"arch": {}}, "x": _RunsCode(fn, payload)}, path)
    with pytest.raises(CheckpointError, match="refused to load") as err:
        read_checkpoint(path)
    assert ("system" in str(err.value)) or ("eval" in str(err.value))
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_plain_pickle_file_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(_RunsCode(os.system, f"touch {marker}")))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_foreign_files_give_one_line_errors(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello, not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for name, needle in [("trunc.pt", "truncated"), ("text.pt", "checkpoint"), ("other.pt", "not an eqr or official"),
                         ("missing.pt", "no such file")]:
        with pytest.raises(CheckpointError, match=needle) as err:
            read_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value)


def test_unknown_missing_and_misshaped_keys_are_named(tmp_path: Path) -> None:
    config = tiny_config(seq_len=81, vocab_size=11)
    write_official_checkpoint(tmp_path / "ok.pth", config)
    raw = safe_load(tmp_path / "ok.pth")
    raw["ema"]["shadow"]["_orig_mod.model.inner.H_init"] = torch.zeros(16)
    torch.save({k: v for k, v in raw.items() if k != "carry"}, tmp_path / "trm.pth")
    with pytest.raises(CheckpointError, match=r"unknown keys .*H_init"):
        read_checkpoint(tmp_path / "trm.pth")

    model = EqRModel(tiny_config(), seed=0)
    state = model.state_dict()
    state.pop("lm_head.weight")
    save_checkpoint(tmp_path / "missing.pt", model.config, state)
    with pytest.raises(CheckpointError, match=r"missing keys lm_head.weight"):
        load_model(tmp_path / "missing.pt")

    state = model.state_dict()
    state["blocks.0.mlp.down.weight"] = torch.zeros(3, 3)
    save_checkpoint(tmp_path / "shape.pt", model.config, state)
    with pytest.raises(CheckpointError, match=r"blocks.0.mlp.down.weight: checkpoint \[3, 3\] vs model \[16, 256\]"):
        load_model(tmp_path / "shape.pt")


def test_interrupted_write_keeps_the_old_file_and_leaves_no_partial(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "m.pt"
    _save_tiny(target)
    before = target.read_bytes()

    def crash(_fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        _save_tiny(target, with_ema=False)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_atomic_open_never_creates_the_target_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "out.bin") as f:
        f.write(b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~mask
