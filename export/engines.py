"""`add_engines`: TensorRT engines for an export directory that exists, on the machine that runs it.

`eqr engine DIR` (docs/jetson.md): the export was made elsewhere (a workstation with torch) and
copied; the target builds the engines of its step graphs with Polygraphy and TensorRT only, no
torch and no ONNX Runtime. The engines, their sidecars and the manifest's "engines" and
"engine_build" entries are the ones `eqr export --engine` writes (`eqr.export.tensorrt.build_engines`
does both). The manifest is rewritten atomically after each engine, so a build that fails part way
leaves a manifest that names every engine on disk.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eqr.contract.artifact import PRECISIONS, noisy_engine_key, read_manifest, write_manifest
from eqr.contract.config import ModelConfig
from eqr.contract.errors import EqRError, MissingExtra
from eqr.contract.progress import Progress
from eqr.contract.trt_engine import INSTALL_HINT, GpuInfo, sidecar_path
from eqr.export.config import check_engine_options
from eqr.export.tensorrt import EngineBuild, EngineProfile, build_engines, engine_support


@dataclass(frozen=True)
class EngineConfig:
    """What `eqr engine` builds. Field names match the flags."""

    precision: tuple[str, ...] = ()  # () : every step graph the export holds
    batch: tuple[int, int, int] | None = None  # None: the export's profile (manifest "batch")
    workspace_mib: int = 4096  # TensorRT builder workspace limit
    dla_core: int | None = None  # build the fp16/int8 engines for this DLA core (static batch)
    timing_cache: str | None = None  # None: this machine's cache (eqr.export.tensorrt.timing_cache_path)
    force: bool = False  # replace engines the manifest already records
    device: int = 0  # the CUDA device the engines are built on and for


def add_engines(export_dir: str | Path, config: EngineConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Build `config`'s engines into `export_dir` and record them in its manifest -> the manifest."""
    progress = progress or Progress(quiet=True)
    root = Path(export_dir)
    manifest = read_manifest(root)
    precisions = _precisions(root, manifest, config.precision)
    batch = config.batch or _manifest_batch(manifest)
    check_engine_options(precisions, batch, config.workspace_mib, config.dla_core)
    replaced = _replaced(root, manifest, precisions, config.force)
    gpu, trt_version = require_engine_support(config.device)
    model = manifest["config"]
    updates = ModelConfig.from_dict(model).updates_per_step  # the noisy graphs' noise input
    build = EngineBuild(precisions, EngineProfile(batch, int(model["seq_len"]), int(model["hidden_size"]), updates),
                        config.workspace_mib, gpu, trt_version, config.dla_core,
                        Path(config.timing_cache) if config.timing_cache else None)

    def record(precision: str, entry: dict[str, Any]) -> None:
        manifest["engines"] = dict(manifest.get("engines") or {}) | {precision: entry}
        manifest["engine_build"] = build.built()
        write_manifest(root, manifest)
        _remove_stale(root, replaced.get(precision), entry["engine"])

    build_engines(root, build, progress, on_built=record)
    return manifest


def require_engine_support(device: int = 0) -> tuple[GpuInfo, str]:
    """(gpu, tensorrt version) where engines can be built; MissingExtra (exit 2) without TensorRT
    or Polygraphy, EqRError without a usable GPU or TensorRT release."""
    gpu, version, why_not = engine_support(device)
    if version is None:
        raise MissingExtra(f"eqr engine needs tensorrt, which is not installed: {INSTALL_HINT}", "tensorrt")
    if importlib.util.find_spec("polygraphy") is None:
        raise MissingExtra("eqr engine needs polygraphy (its TensorRT loaders build the engines), which is not "
                           "installed: pip install 'eqr[tensorrt]' (on Jetson: pip install polygraphy)", "tensorrt")
    if why_not or gpu is None:
        raise EqRError(f"eqr engine: cannot build TensorRT engines: {why_not}")
    return gpu, version


def _precisions(root: Path, manifest: dict[str, Any], asked: tuple[str, ...]) -> tuple[str, ...]:
    """The precisions to build, in PRECISIONS order: those asked, else every graph the export holds."""
    graphs = {p for p, entry in (manifest.get("precisions") or {}).items()
              if p in PRECISIONS and PRECISIONS[p].engine and (root / PRECISIONS[p].onnx).is_file()}
    missing = [p for p in asked if p not in graphs]
    if missing:
        raise EqRError(f"{root}: no {', '.join(missing)} step graph ({', '.join(PRECISIONS[p].onnx for p in missing)}); "
                       f"it holds {', '.join(sorted(graphs)) or 'none'}: export it (eqr export MODEL --precision "
                       f"{missing[0]}) or build it with eqr calibrate {root} --precision {missing[0]}")
    return tuple(p for p in PRECISIONS if p in (asked or graphs))


def _manifest_batch(manifest: dict[str, Any]) -> tuple[int, int, int]:
    b = manifest.get("batch") or {}
    return int(b.get("min", 1)), int(b.get("opt", 64)), int(b.get("max", 256))


def _replaced(root: Path, manifest: dict[str, Any], precisions: tuple[str, ...], force: bool) -> dict[str, str]:
    """{precision: engine file the manifest records now} for those to be rebuilt; without `force`
    an EqRError naming them, before any work."""
    engines = manifest.get("engines") or {}
    keys = [k for p in precisions for k in (p, noisy_engine_key(p))]  # a noisy graph's engine goes with its precision's
    existing = {p: str((engines[p] or {}).get("engine", "")) for p in keys if p in engines}
    if existing and not force:
        named = ", ".join(f"{p} ({name}, {_built_for(engines[p])})" for p, name in existing.items())
        raise EqRError(f"{root}: the manifest already records engines for {named}; pass --force to rebuild "
                       "them on this machine")
    return existing


def _built_for(entry: Any) -> str:
    entry = entry if isinstance(entry, dict) else {}
    return f"GPU {entry.get('gpu')}, TensorRT {entry.get('tensorrt')}"


def _remove_stale(root: Path, old: str | None, new: str) -> None:
    """The replaced engine and its sidecar, unless the new one has its name (rewritten in place)."""
    if not old or old == new or Path(old).name != old:  # only a plain file name inside the export
        return
    for path in (root / old, sidecar_path(root / old)):
        path.unlink(missing_ok=True)
