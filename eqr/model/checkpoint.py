"""Checkpoint files: eqr's own format and official EqR training checkpoints, never executing pickles.

eqr format: one `torch.save` dict, written atomically and read with `weights_only=True`:
    {"format": "eqr-checkpoint", "version": 1, "config": ModelConfig dict,
     "model": state dict, "ema": state dict or None, "metadata": JSON-able dict,
     "train_state": optional plain containers and tensors (training resume)}

Official EqR files (docs/formats.md#checkpoints) pickle their training carry as `models.eqr.*` dataclasses and
hold numpy RNG arrays. They are read with torch's weights-only unpickler after a scan of the
pickle's globals: official carry classes load as inert `OfficialObject` placeholders, numpy
arrays load through an explicit allow-list, and any other global is refused by name.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eqr.contract.config import ModelConfig
from eqr.contract.errors import CheckpointError
from eqr.contract.io import atomic_open, sha256_file

FORMAT = "eqr-checkpoint"
VERSION = 1
OFFICIAL_CLASS_PREFIXES = ("models.eqr.", "models.trm.")


@dataclass
class Checkpoint:
    """A checkpoint read from disk, with state dicts already in eqr's key layout."""

    kind: str  # "eqr" or "official"
    path: str
    sha256: str
    config: ModelConfig
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    metadata: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None


# --------------------------------------------------------------------------- safe unpickling


class OfficialObject:
    """Inert stand-in for an official carry class: holds the pickled fields, runs no code."""

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} placeholder: {', '.join(sorted(vars(self)))}>"


def _numpy_globals() -> dict[str, Any]:
    """Exactly what numpy RNG states and arrays need; both numpy 1 and 2 spellings."""
    # numpy 2 renamed numpy.core to numpy._core. numpy 1.26.1+ has numpy._core as an alias whose
    # submodules load only on import (np._core.multiarray may be unset); 1.26.0 has no alias.
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{module}._reconstruct"] = multiarray._reconstruct
        allowed[f"{module}.scalar"] = multiarray.scalar
    return allowed


def _numpy_dtype_classes() -> list[tuple[type, str]]:
    """Numeric dtype classes: unpickling an array's dtype builds one (never referenced by name)."""
    classes = {type(np.dtype(t)) for t in "?bBhHiIlLqQefdg"}
    return [(cls, f"numpy.dtypes.{cls.__name__}") for cls in classes]


def _placeholder(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return type(name, (OfficialObject,), {"__module__": module, "__qualname__": name})


def safe_load(path: str | os.PathLike[str]) -> Any:
    """torch.load with weights_only=True, plus official placeholders and numpy; refuses code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file (.pt/.pth)")
    extra: list[tuple[Any, str]] = []
    if zipfile.is_zipfile(path):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({_short(e)}); the file may be truncated") from None
        numpy_allowed = _numpy_globals()
        refused = []
        for name in unsafe:
            if name.startswith(OFFICIAL_CLASS_PREFIXES):
                extra.append((_placeholder(name), name))
            elif name in numpy_allowed:
                extra.append((numpy_allowed[name], name))
            else:
                refused.append(name)
        if any(name in numpy_allowed for name in unsafe):
            extra += _numpy_dtype_classes()
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: the pickle references {', '.join(refused)}, which could run code; "
                "only tensors, plain containers, numpy arrays and official EqR carry classes are accepted")
    try:
        with torch.serialization.safe_globals(extra), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of foreign files
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not a checkpoint, or refused by the safe unpickler ({_short(e)})") from None
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {_short(e)}); "
                              "the file may be truncated or not a torch file") from None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if "WeightsUnpickler error:" in text:  # keep torch's reason, drop its advice to disable safety
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0].strip()
    return (text[:200] + "...") if len(text) > 200 else text


# --------------------------------------------------------------------------- official layout

# Official parameter names (docs/formats.md#checkpoints, after prefix stripping) -> eqr names. Every key must
# match one row; the fused gate|up and q|k|v layouts are kept as they are.
OFFICIAL_KEY_MAP: list[tuple[str, str]] = [
    (r"embed_tokens\.embedding_weight", r"embed.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
    (r"q_head\.(weight|bias)", r"q_head.\1"),
    (r"L_level\.layers\.(\d+)\.mlp_t\.gate_up_proj\.weight", r"blocks.\1.token_mlp.gate_up.weight"),
    (r"L_level\.layers\.(\d+)\.mlp_t\.down_proj\.weight", r"blocks.\1.token_mlp.down.weight"),
    (r"L_level\.layers\.(\d+)\.self_attn\.qkv_proj\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"L_level\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blocks.\1.attn.out.weight"),
    (r"L_level\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", r"blocks.\1.mlp.gate_up.weight"),
    (r"L_level\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blocks.\1.mlp.down.weight"),
]


def strip_official_prefix(key: str) -> str:
    """Drop every `_orig_mod.` segment (torch.compile), then the wrapper's leading `model.inner.`."""
    key = key.replace("_orig_mod.", "")
    return key.removeprefix("model.inner.")


def official_to_eqr(state_dict: dict[str, torch.Tensor], where: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename an official EqR state dict (with or without `_orig_mod.`) to eqr's layout."""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        short = strip_official_prefix(key)
        for pattern, replacement in OFFICIAL_KEY_MAP:
            if re.fullmatch(pattern, short):
                converted[re.sub(pattern, replacement, short)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{where}: unknown keys for an EqR model: {', '.join(unknown[:8])}"
                              + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
                              + "; only EqR (not TRM or HRM) checkpoints load")
    return converted


# Arch keys copied from the official config when present; the rest are structural (read from
# tensor shapes) or meaningless here.
_OFFICIAL_ARCH_FIELDS = ("num_heads", "expansion", "H_layers", "H_cycles", "L_cycles", "pos_encodings",
                         "board_height", "board_width", "rms_norm_eps", "rope_theta", "lambda_", "noise_scale",
                         "H_init_std", "L_init_std", "halt_max_steps", "halt_exploration_prob")


def config_from_official(arch: dict[str, Any], state: dict[str, torch.Tensor], dataset: str = "",
                         where: str = "checkpoint") -> ModelConfig:
    """Hyper-parameters from `config.arch`; vocab, width, layers, mixer and seq_len from shapes."""
    if "embed.weight" not in state:
        raise CheckpointError(f"{where}: missing key embed_tokens.embedding_weight; not an EqR checkpoint")
    if int(arch.get("puzzle_emb_ndim", 0) or 0) > 0:
        raise CheckpointError(f"{where}: has a puzzle-embedding prefix (original TRM); EqR checkpoints have none")
    vocab, hidden = state["embed.weight"].shape
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    mlp_t = "blocks.0.token_mlp.gate_up.weight" in state
    for name, value in (("hidden_size", hidden), ("mlp_t", mlp_t), ("L_layers", len(layers))):
        if name in arch and arch[name] != value:
            raise CheckpointError(f"{where}: config.arch.{name} is {arch[name]} but the weights say {value}")
    if mlp_t:
        seq_len = state["blocks.0.token_mlp.gate_up.weight"].shape[1]
    else:
        seq_len = arch.get("seq_len") or _seq_len_from_board(arch) or _seq_len_from_dataset(dataset)
        if not seq_len:
            raise CheckpointError(f"{where}: cannot infer seq_len of an attention model; name the board in "
                                  "config.arch (board_height/board_width) or the data path (e.g. maze-30x30)")
    fields = {k: arch[k] for k in _OFFICIAL_ARCH_FIELDS if arch.get(k) is not None}
    if "expansion" in fields:
        fields["expansion"] = float(fields["expansion"])
    return ModelConfig(seq_len=int(seq_len), vocab_size=int(vocab), hidden_size=int(hidden),
                       L_layers=len(layers), mlp_t=mlp_t, forward_dtype="float32", **fields)


def _seq_len_from_board(arch: dict[str, Any]) -> int | None:
    h, w = arch.get("board_height"), arch.get("board_width")
    return int(h) * int(w) if h and w else None


def _seq_len_from_dataset(dataset: str) -> int | None:
    match = re.search(r"(\d+)x(\d+)", dataset)
    return int(match[1]) * int(match[2]) if match else None


def _read_official(raw: dict[str, Any], path: str, sha: str) -> Checkpoint:
    cfg = raw.get("config") or {}
    arch = cfg.get("arch") or {}
    if not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path}: official checkpoint has no 'model' state dict")
    model = official_to_eqr(raw["model"], f"{path} [model]")
    shadow = (raw.get("ema") or {}).get("shadow") if isinstance(raw.get("ema"), dict) else None
    ema = official_to_eqr(shadow, f"{path} [ema.shadow]") if shadow else None
    dataset = cfg.get("data_path") or cfg.get("dataset") or ""
    config = config_from_official(arch, model, str(dataset), path)
    metadata = {
        "official": {"step": raw.get("step"), "arch_name": arch.get("name"), "loss": arch.get("loss"),
                     "forward_dtype": arch.get("forward_dtype"), "dataset": str(dataset)},
    }
    return Checkpoint("official", path, sha, config, model, ema, metadata)


def _read_eqr(raw: dict[str, Any], path: str, sha: str) -> Checkpoint:
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{path}: eqr checkpoint version {raw.get('version')} is not supported (this eqr reads {VERSION})")
    for key in ("config", "model"):
        if key not in raw:
            raise CheckpointError(f"{path}: eqr checkpoint is missing its '{key}' entry")
    return Checkpoint("eqr", path, sha, ModelConfig.from_dict(raw["config"]), raw["model"], raw.get("ema"),
                      raw.get("metadata") or {}, raw.get("train_state"))


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read an eqr or official EqR checkpoint safely; state dicts come back in eqr's layout."""
    raw = safe_load(path)
    path_s = str(path)
    sha = sha256_file(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        return _read_eqr(raw, path_s, sha)
    if isinstance(raw, dict) and "model" in raw and isinstance(raw.get("config"), dict) and "arch" in raw["config"]:
        return _read_official(raw, path_s, sha)
    raise CheckpointError(f"{path_s}: not an eqr or official EqR checkpoint (expected a dict with "
                          "'format': 'eqr-checkpoint', or official 'model' and 'config.arch' entries)")


def save_checkpoint(path: str | os.PathLike[str], config: ModelConfig, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None = None, metadata: dict[str, Any] | None = None,
                    train_state: dict[str, Any] | None = None) -> None:
    """Write an eqr checkpoint atomically (temp file + rename): a crash never leaves a partial file."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "ema": None if ema_state is None else {k: v.detach().cpu() for k, v in ema_state.items()},
        "metadata": metadata or {},
        "train_state": train_state,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_open(path) as f:
        f.write(buffer.getbuffer())


def check_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], where: str) -> None:
    """Fail with one line naming missing/unexpected keys or the first shape mismatch."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
        if unexpected:
            parts.append(f"unexpected keys {', '.join(unexpected[:6])}" + (" ..." if len(unexpected) > 6 else ""))
        raise CheckpointError(f"{where}: {'; '.join(parts)}")
    for key, tensor in expected.items():
        if tuple(given[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: shape mismatch for {key}: checkpoint {list(given[key].shape)} "
                                  f"vs model {list(tensor.shape)}")
