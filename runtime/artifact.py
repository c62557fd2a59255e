"""What `Solver.load` and `eqr solve` accept, resolved to one `Artifact` description.

ARTIFACT is an export directory (manifest.json), an ONNX step file, a TensorRT engine, an eqr or
official checkpoint, a bundled model name or a preset. The runtime needs only the I/O sizes,
the initial-state stds and the per-precision tolerances; the weights stay wherever they are.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqr.config import ModelConfig
from eqr.errors import EqRError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "eqr-export"
PRECISIONS = ("fp32", "fp16", "int8")
# Relative-residual tolerances when an artifact has no manifest. Each sits above that
# precision's round-off floor, so an fp32 tol never silently fails to trigger in fp16/int8.
DEFAULT_TOL = {"fp32": 1e-3, "fp16": 1e-2, "int8": 5e-2}
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Artifact:
    """A deployable model, whatever its container."""

    kind: str  # "export" | "onnx" | "engine" | "checkpoint" (files, bundled names and presets)
    location: str  # as the user gave it
    seq_len: int  # L
    hidden_size: int  # D
    vocab_size: int  # V
    init_std: tuple[float, float] = (1.0, 1.0)  # (z_H, z_L) truncated-normal stds
    config: ModelConfig | None = None
    task: dict[str, Any] | None = None  # {"name", "size", ...} when known
    onnx: dict[str, Path] = field(default_factory=dict)  # precision -> step ONNX file
    engines: dict[str, Path] = field(default_factory=dict)  # precision -> TensorRT engine
    tol: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TOL))
    checkpoint: str | None = None  # anything eqr.load.load_model accepts (torch backend)
    batch: tuple[int, int, int] = (1, 64, 256)  # min/opt/max batch the export was built for

    def default_tol(self, precision: str) -> float:
        return self.tol.get(precision, DEFAULT_TOL[precision])


def load_artifact(location: str | os.PathLike[str]) -> Artifact:
    """Resolve ARTIFACT (see module docstring); one-line EqRError when it is none of them."""
    text = str(location)
    path = Path(text)
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise EqRError(f"{text}: directory has no {MANIFEST}; pass an export directory made by `eqr export`")
        return _from_manifest(path / MANIFEST, text)
    if path.is_file() and path.suffix == ".onnx":
        return _from_onnx(path, text)
    if path.is_file() and path.suffix in ENGINE_SUFFIXES:
        return _from_engine(path, text)
    return _from_checkpoint(text)


def _read_json(path: Path) -> dict[str, Any]:  # sidecars
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EqRError(f"{path}: cannot read JSON ({e}); re-run `eqr export`") from None
    if not isinstance(data, dict):
        raise EqRError(f"{path}: expected a JSON object; re-run `eqr export`")
    return data


def _engine_path(root: Path, entry: Any) -> Path:
    """An engines entry is a file name or a dict naming it ("path", "engine" or "file")."""
    if isinstance(entry, dict):
        entry = entry.get("path") or entry.get("engine") or entry.get("file")
    if not isinstance(entry, str):
        raise EqRError(f"{root / MANIFEST}: malformed engines entry {entry!r}; re-run `eqr export`")
    return root / entry


def _from_manifest(manifest: Path, location: str) -> Artifact:
    from eqr.export import read_manifest

    data = read_manifest(manifest.parent)  # EqRError naming the fix when it is not an eqr export
    root = manifest.parent
    try:
        config = ModelConfig.from_dict(data["config"])
        precisions = data.get("precisions") or {}
        onnx = {p: root / entry["onnx"] for p, entry in precisions.items() if entry.get("onnx")}
        tol = dict(DEFAULT_TOL) | {p: float(entry["tol"]) for p, entry in precisions.items() if "tol" in entry}
        engines: dict[str, Path] = {}
        for key, entry in (data.get("engines") or {}).items():
            precision = entry.get("precision", key) if isinstance(entry, dict) else key
            engines.setdefault(precision, _engine_path(root, entry))
        std = data.get("init_std") or {}
        init_std = (float(std.get("z_H", config.H_init_std)), float(std.get("z_L", config.L_init_std)))
        b = data.get("batch") or {}
        batch = (int(b.get("min", 1)), int(b.get("opt", 64)), int(b.get("max", 256)))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise EqRError(f"{manifest}: malformed manifest ({type(e).__name__}: {e}); re-run `eqr export --force`") from None
    task = data.get("task") if isinstance(data.get("task"), dict) and data["task"].get("name") else None
    return Artifact("export", location, config.seq_len, config.hidden_size, config.vocab_size, init_std,
                    config, task, onnx, engines, tol, _source_weights(data.get("source")), batch)


def _source_weights(source: Any) -> str | None:
    """The checkpoint an export came from, when it is still here (lets the torch backend run it)."""
    if not isinstance(source, dict) or source.get("kind") in (None, "init") or not source.get("location"):
        return None
    from eqr.load import resolve

    from eqr.io import sha256_file

    try:
        _, resolved = resolve(source["location"])
    except EqRError:
        return None
    if source.get("sha256") and Path(resolved).is_file() and sha256_file(resolved) != source["sha256"]:
        return None  # the file changed since the export: it is not these weights any more
    return str(source["location"])


def _from_onnx(path: Path, location: str) -> Artifact:
    if (path.parent / MANIFEST).is_file():
        base = _from_manifest(path.parent / MANIFEST, location)
        precision = next((p for p, f in base.onnx.items() if f.resolve() == path.resolve()), "fp32")
        return Artifact("onnx", location, base.seq_len, base.hidden_size, base.vocab_size, base.init_std,
                        base.config, base.task, {precision: path}, {}, base.tol, base.checkpoint, base.batch)
    L, D, V = _onnx_sizes(path)
    return Artifact("onnx", location, L, D, V, onnx={"fp32": path})


def _onnx_sizes(path: Path) -> tuple[int, int, int]:
    """(L, D, V) from the step graph's z_H input [B, L, D] and logits output [B, L, V]."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnx raises several unrelated types for a bad file
        raise EqRError(f"{path}: not a readable ONNX model ({e})") from None

    def dims(values: Any, name: str) -> list[int]:
        for value in values:
            if value.name == name:
                return [d.dim_value for d in value.type.tensor_type.shape.dim]
        raise EqRError(f"{path}: no {name!r} tensor; expected the eqr step graph (export/step_graph.py I/O)")

    _, L, D = dims(graph.input, "z_H")
    V = dims(graph.output, "logits")[2]
    if not (L and D and V):
        raise EqRError(f"{path}: z_H/logits sizes are not static; re-export with a dynamic batch axis only")
    return L, D, V


def _from_engine(path: Path, location: str) -> Artifact:
    for sidecar in (path.with_name(path.name + ".json"), path.with_suffix(".json"), path.parent / MANIFEST):
        if sidecar.is_file():
            data = _read_json(sidecar)
            if data.get("format") == MANIFEST_FORMAT:
                base = _from_manifest(sidecar, location)
                precision = next((p for p, f in base.engines.items() if f.resolve() == path.resolve()),
                                 data.get("precision", "fp32"))
            else:
                base = _from_manifest(path.parent / MANIFEST, location) if (path.parent / MANIFEST).is_file() else None
                precision = data.get("precision", "fp32")
            if base is not None:
                return Artifact("engine", location, base.seq_len, base.hidden_size, base.vocab_size, base.init_std,
                                base.config, base.task, {}, {precision: path}, base.tol, base.checkpoint, base.batch)
    raise EqRError(f"{location}: engine has no manifest.json or sidecar JSON beside it; "
                   "pass the export directory instead")


def _from_checkpoint(location: str) -> Artifact:
    from eqr.load import resolve

    kind, resolved = resolve(location)  # raises the one-line error for unknown names
    if kind == "preset":
        from eqr.config import PRESETS

        config = PRESETS[resolved][0]
    else:
        from eqr.checkpoint import read_checkpoint

        ckpt = read_checkpoint(resolved)
        config = ckpt.config
        task = ckpt.metadata.get("task") if isinstance(ckpt.metadata, dict) else None
        return Artifact("checkpoint", location, config.seq_len, config.hidden_size, config.vocab_size,
                        (config.H_init_std, config.L_init_std), config, task if isinstance(task, dict) else None,
                        checkpoint=location)
    return Artifact("checkpoint", location, config.seq_len, config.hidden_size, config.vocab_size,
                    (config.H_init_std, config.L_init_std), config, checkpoint=location)
