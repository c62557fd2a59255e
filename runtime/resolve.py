"""What `Solver.load` and `eqr solve` accept, resolved to one `Artifact` description.

ARTIFACT is an export directory, a step .onnx file, a TensorRT engine, an eqr or official
checkpoint, a bundled model name or a preset. The runtime needs only the I/O sizes, the
initial-state stds and the per-precision tolerances; the weights stay wherever they are. The
export directory's facts (file names, manifest, precisions, tol rule) come from `eqr.contract.artifact`.

A step .onnx describes itself: it carries its export's manifest and its precision in its ONNX
metadata, so a file copied out of its directory behaves exactly like the directory. A foreign
.onnx (same I/O contract, no eqr metadata) runs only when `init_std` and `tol` are given.
Checkpoints, bundled names and presets resolve through the torch backend (they need torch).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from eqr.contract.artifact import (ENGINE_SUFFIXES, MANIFEST_FILE, MANIFEST_FORMAT, METADATA_KEY, NOISY_KEY,
                                   PRECISION_KEY, PRECISIONS, Artifact, check_manifest, embedded_manifest, precision_of,
                                   read_manifest, unmeasured_tols)
from eqr.contract.config import ModelConfig
from eqr.contract.errors import EqRError
from eqr.contract.trt_engine import sidecar_path
from eqr.runtime.stopping_rules import stopping_rules
from eqr.tasks import DEFAULT_SIZES, TASKS, Task, get_task, task_from_spec


def load_artifact(location: str | os.PathLike[str], init_std: tuple[float, float] | None = None,
                  tol: float | None = None) -> Artifact:
    """Resolve ARTIFACT (see module docstring); one-line EqRError when it is none of them.
    `init_std` and `tol` describe a foreign .onnx (no eqr metadata); anything else records its own."""
    text = str(location)
    path = Path(text)
    if path.is_file() and path.suffix == ".onnx":
        return _from_onnx(path, text, init_std, tol)
    if init_std is not None:
        raise EqRError(f"--init-std: {text} records its own initial-state std; drop --init-std "
                       "(it is only for a foreign .onnx without eqr metadata)")
    if path.is_dir():
        if not (path / MANIFEST_FILE).is_file():
            raise EqRError(f"{text}: directory has no {MANIFEST_FILE}; pass an export directory made by `eqr export`")
        return _from_manifest(read_manifest(path), path, text)
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
    """An engines entry names its file under "engine" (what `eqr export` writes)."""
    entry = entry.get("engine") if isinstance(entry, dict) else None
    if not isinstance(entry, str):
        raise EqRError(f"{root / MANIFEST_FILE}: malformed engines entry {entry!r}; re-run `eqr export`")
    return root / entry


def _from_manifest(data: dict[str, Any], root: Path, location: str, where: str | None = None) -> Artifact:
    """An export's manifest whose files lie in `root`."""
    where = where or str(root / MANIFEST_FILE)
    try:
        config = ModelConfig.from_dict(data["config"])
        precisions = data.get("precisions") or {}
        onnx = {p: root / entry["onnx"] for p, entry in precisions.items() if entry.get("onnx")}
        noisy = {p: root / entry[NOISY_KEY]["onnx"] for p, entry in precisions.items() if entry.get(NOISY_KEY)}
        tol = unmeasured_tols() | {p: float(entry["tol"]) for p, entry in precisions.items() if "tol" in entry}
        engines: dict[str, Path] = {}
        noisy_engines: dict[str, Path] = {}  # engines of the noisy step graphs (entries marked NOISY_KEY)
        for key, entry in (data.get("engines") or {}).items():
            precision = entry.get("precision", key) if isinstance(entry, dict) else key
            noisy_entry = isinstance(entry, dict) and entry.get(NOISY_KEY)
            (noisy_engines if noisy_entry else engines).setdefault(precision, _engine_path(root, entry))
        std = data.get("init_std") or {}
        init_std = (float(std.get("z_H", config.H_init_std)), float(std.get("z_L", config.L_init_std)))
        b = data.get("batch") or {}
        batch = (int(b.get("min", 1)), int(b.get("opt", 64)), int(b.get("max", 256)))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise EqRError(f"{where}: malformed manifest ({type(e).__name__}: {e}); re-run `eqr export --force`") from None
    task = data.get("task") if isinstance(data.get("task"), dict) and data["task"].get("name") else None
    source = data.get("source") if isinstance(data.get("source"), dict) else None
    return Artifact(kind="export", location=location, seq_len=config.seq_len, hidden_size=config.hidden_size,
                    vocab_size=config.vocab_size, init_std=init_std, config=config, task=task, onnx=onnx,
                    engines=engines, tol=tol, batch=batch, source=source, stopping=stopping_rules(data, where),
                    noisy=noisy, noisy_engines=noisy_engines)


def _single_file(base: Artifact, kind: str, precision: str, path: Path) -> Artifact:
    """`base` (an export) narrowed to one of its files."""
    onnx, engines = ({precision: path}, {}) if kind == "onnx" else ({}, {precision: path})
    noisy = {p: f for p, f in base.noisy.items() if p == precision and kind == "onnx"}
    noisy_engines = {p: f for p, f in base.noisy_engines.items() if p == precision and kind == "engine"}
    return dataclasses.replace(base, kind=kind, onnx=onnx, engines=engines, precision=precision, noisy=noisy,
                               noisy_engines=noisy_engines)


def _from_onnx(path: Path, location: str, init_std: tuple[float, float] | None, tol: float | None) -> Artifact:
    metadata, sizes = _read_onnx(path)
    manifest = embedded_manifest(metadata, path)
    if manifest is None:
        return _foreign_onnx(path, location, sizes, init_std, tol)
    if init_std is not None:
        raise EqRError(f"--init-std: {path} records its own initial-state std in its metadata; drop --init-std")
    beside = path.parent / MANIFEST_FILE
    if beside.is_file() and _same_export(read_manifest(path.parent), manifest):
        manifest = read_manifest(path.parent)  # the directory's is newer (engines, calibrated tols)
    base = _from_manifest(manifest, path.parent, location, f"{path} ({METADATA_KEY} metadata)")
    own = metadata.get(PRECISION_KEY) or precision_of(path) or next(
        (p for p, f in base.onnx.items() if f.name == path.name), "fp32")
    if own not in PRECISIONS:
        raise EqRError(f"{path}: unknown precision {own!r} in its {PRECISION_KEY} metadata; re-run eqr export --force")
    return _single_file(base, "onnx", own, path)


def _same_export(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.get("config"), a.get("source")) == (b.get("config"), b.get("source"))


def _foreign_onnx(path: Path, location: str, sizes: tuple[int, int, int], init_std: tuple[float, float] | None,
                  tol: float | None) -> Artifact:
    missing = [what for what, value in (("--init-std", init_std), ("--tol", tol)) if value is None]
    if missing:
        raise EqRError(f"{path}: no eqr metadata ({METADATA_KEY}), so its initial-state std and tolerance are "
                       f"unknown; pass {' and '.join(missing)}, or use the export directory it came from")
    L, D, V = sizes
    precision = precision_of(path) or "fp32"
    return Artifact(kind="onnx", location=location, seq_len=L, hidden_size=D, vocab_size=V, init_std=init_std,
                    onnx={precision: path},
                    tol=unmeasured_tols() | {precision: float(tol)}, precision=precision)


def _read_onnx(path: Path) -> tuple[dict[str, str], tuple[int, int, int]]:
    """(metadata_props, (L, D, V) from the z_H input [B, L, D] and logits output [B, L, V])."""
    import onnx  # reading a step graph needs onnx (a core dependency); running it does not

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises several unrelated types for a bad file
        raise EqRError(f"{path}: not a readable ONNX model ({e})") from None
    graph = model.graph

    def dims(values: Any, name: str) -> list[int]:
        for value in values:
            if value.name == name:
                return [d.dim_value for d in value.type.tensor_type.shape.dim]
        raise EqRError(f"{path}: no {name!r} tensor; expected an eqr step graph (the I/O contract in docs/formats.md)")

    _, L, D = dims(graph.input, "z_H")
    V = dims(graph.output, "logits")[2]
    if not (L and D and V):
        raise EqRError(f"{path}: z_H/logits sizes are not static; re-export with a dynamic batch axis only")
    return {prop.key: prop.value for prop in model.metadata_props}, (L, D, V)


def _from_engine(path: Path, location: str) -> Artifact:
    beside = path.parent / MANIFEST_FILE
    for sidecar in (sidecar_path(path), beside):
        if sidecar.is_file():
            data = _read_json(sidecar)
            if data.get("format") == MANIFEST_FORMAT:
                base = _from_manifest(check_manifest(data, sidecar), sidecar.parent, location, str(sidecar))
                precision = next((p for p, f in base.engines.items() if f.resolve() == path.resolve()),
                                 data.get("precision", "fp32"))
            else:
                base = _from_manifest(read_manifest(path.parent), path.parent, location) if beside.is_file() else None
                precision = data.get("precision", "fp32")
            if base is not None:
                return _single_file(base, "engine", precision, path)
    raise EqRError(f"{location}: engine has no {MANIFEST_FILE} or sidecar JSON beside it; "
                   "pass the export directory instead")


def _from_checkpoint(location: str) -> Artifact:
    try:
        from eqr.runtime.backends.torch_backend import checkpoint_artifact
    except ImportError as e:
        if e.name != "torch":
            raise
        raise EqRError(f"{location}: not an export directory, .onnx or engine file here; checkpoints, bundled "
                       "models and presets run on torch: pip install 'eqr[export]'") from None
    return checkpoint_artifact(location)


def resolve_task(artifact: Artifact, override: str | None = None) -> Task:
    """The puzzle task of an artifact: `override` ("NAME[:SIZE]", e.g. --task), the one its
    manifest or checkpoint records, or the only task whose layout fits its L and V."""
    if override:
        task = task_from_spec(override)
    elif artifact.task and artifact.task.get("name") in TASKS:
        task = get_task(artifact.task["name"], artifact.task.get("size"))
    else:
        side = math.isqrt(artifact.seq_len)
        matches = [t for t in _tasks_of_side(side) if side * side == artifact.seq_len
                   and (t.seq_len, t.vocab_size) == (artifact.seq_len, artifact.vocab_size)]
        if not matches:
            raise EqRError(f"{artifact.location}: cannot tell the puzzle task of a model with {artifact.seq_len} tokens "
                           f"and vocab {artifact.vocab_size}; pass --task NAME[:SIZE] ({', '.join(DEFAULT_SIZES)})")
        task = matches[0]
    if (task.seq_len, task.vocab_size) != (artifact.seq_len, artifact.vocab_size):
        raise EqRError(f"task {task!r} has {task.seq_len} tokens / vocab {task.vocab_size}, but {artifact.location} "
                       f"expects {artifact.seq_len} / {artifact.vocab_size}; pass the matching --task")
    return task


def _tasks_of_side(side: int) -> list[Task]:
    tasks = []
    for name in TASKS:
        try:
            tasks.append(get_task(name, side))
        except EqRError:  # no such size for this task
            pass
    return tasks
