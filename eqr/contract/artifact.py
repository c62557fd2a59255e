"""The export directory's contract: its files, precisions, manifest, step I/O and tolerance rule.

`eqr export` writes an export directory, the runtime and calibration read it; every fact about
it lives here once (docs/formats.md describes the same contract for readers outside Python).
This module is the bottom floor: it imports neither torch, onnx nor an inference engine.

    manifest.json                     MANIFEST_FILE: format "eqr-export", version 2
    model.step.onnx                   one step graph per precision (the PRECISIONS table)
    model.step.fp16.onnx, model.step.int8.onnx
    model.step.int8.cpu.onnx          INT8 for ONNX Runtime's CPU integer kernels (precision int8-cpu)
    model.step.noisy.onnx, model.step.fp16.noisy.onnx   opt-in (eqr export --noisy): the step with a
                                      `noise` input (path noise at inference; NOISE_INPUT)
    model.step.<p>.<gpu>.trt<v>.engine  TensorRT engines (`engine_file`), each with a .json sidecar
    calib.npz                         CALIB_FILE: calibration states recorded by `eqr calibrate`
    report/                           REPORT_DIR: `eqr report`'s precision report

Every step graph carries the manifest in its ONNX metadata (METADATA_KEY) and its own precision
(PRECISION_KEY), so a graph copied out of its directory still describes itself.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from eqr.contract.config import ModelConfig
from eqr.contract.errors import EqRError
from eqr.contract.io import atomic_write_text

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "eqr-export"
MANIFEST_VERSION = 2  # 2: step graphs take a `done` input
METADATA_KEY = "eqr.manifest"  # ONNX metadata_props key: the manifest JSON
PRECISION_KEY = "eqr.precision"  # ONNX metadata_props key: the graph's precision
CALIB_FILE = "calib.npz"
REPORT_DIR = "report"  # `eqr report`'s default output directory inside the export
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# Files an export owns in its directory (a re-export replaces them; nothing else is touched).
OWN_FILE_PATTERNS = ("model.step*.onnx", "model.step*.engine", "model.step*.engine.json", MANIFEST_FILE)


# --------------------------------------------------------------------------- precisions


@dataclass(frozen=True)
class Precision:
    """One row of the table that drives export and calibration (what to build, from what, with
    which builder, checked how) and load (what a file is). The builders and checks are named
    here and defined in eqr.export.build.BUILDERS and eqr.export.exporter.CHECKS: both `eqr export`
    and `eqr calibrate` build every graph through `eqr.export.build.build_graph`."""

    name: str
    onnx: str  # step graph file in the export directory
    built_from: str | None  # the precision whose graph this one is built from (None: the model itself)
    builder: str  # a key of eqr.export.build.BUILDERS
    checks: tuple[str, ...]  # keys of eqr.export.exporter.CHECKS, run in order on every graph export writes
    roundoff: float  # lowest relative residual this arithmetic reliably reaches: tol never goes below
    unmeasured_tol: float  # tol when no residual floor was measured (a checkpoint, a model in memory)
    calibrated: bool = False  # built from recorded calibration states (eqr.calibration.record)
    engine: bool = True  # TensorRT engines are built from this graph
    # the precision whose graph ONNX Runtime's CPU provider runs in this one's place, when the export
    # has it (int8 -> int8-cpu: TensorRT keeps the int8 graph, a CPU gets integer kernels)
    on_cpu: str | None = None
    # the noisy step graph of this precision (one more input, NOISE_INPUT), written by
    # `eqr export --noisy`; None: this precision has none
    noisy_onnx: str | None = None


_EXPORT_CHECKS = ("io_contract", "parity", "lint")
PRECISIONS: dict[str, Precision] = {row.name: row for row in (
    Precision("fp32", "model.step.onnx", built_from=None, builder="onnx_from_model", checks=_EXPORT_CHECKS,
              roundoff=1e-5, unmeasured_tol=1e-3, noisy_onnx="model.step.noisy.onnx"),
    Precision("fp16", "model.step.fp16.onnx", built_from="fp32", builder="fp16_from_onnx", checks=_EXPORT_CHECKS,
              roundoff=1e-3, unmeasured_tol=1e-2, noisy_onnx="model.step.fp16.noisy.onnx"),
    Precision("int8", "model.step.int8.onnx", built_from="fp32", builder="int8_from_onnx", checks=_EXPORT_CHECKS,
              roundoff=1e-2, unmeasured_tol=5e-2, calibrated=True, on_cpu="int8-cpu"),
    Precision("int8-cpu", "model.step.int8.cpu.onnx", built_from="fp32", builder="int8_cpu_from_onnx",
              checks=_EXPORT_CHECKS, roundoff=1e-2, unmeasured_tol=5e-2, calibrated=True, engine=False),
)}


# the precisions a model is deployed at; a CPU variant (int8-cpu) stands in for its precision on
# ONNX Runtime's CPU provider, so default precision lists (bench, report) leave it out
BASE_PRECISIONS = tuple(p for p in PRECISIONS if p not in {row.on_cpu for row in PRECISIONS.values()})


def with_cpu_variants(precisions: Iterable[str]) -> tuple[str, ...]:
    """`precisions` plus each one's CPU variant (int8 -> int8, int8-cpu), in PRECISIONS order: naming
    a precision builds the graph ONNX Runtime's CPU provider runs in its place too."""
    named = set(precisions)
    named |= {PRECISIONS[p].on_cpu for p in named if p in PRECISIONS and PRECISIONS[p].on_cpu}
    return tuple(p for p in PRECISIONS if p in named)


def cpu_precision(artifact: "Artifact", precision: str) -> str:
    """The precision ONNX Runtime's CPU provider runs for `precision`: its row's `on_cpu` graph
    when the artifact holds that file, else `precision` itself."""
    variant = PRECISIONS[precision].on_cpu if precision in PRECISIONS else None
    path = artifact.onnx.get(variant) if variant else None
    return variant if path is not None and Path(path).is_file() else precision


def precision_row(name: str, what: str = "precision") -> Precision:
    """The table row of `name` (case-insensitive); EqRError listing the valid names."""
    try:
        return PRECISIONS[name.lower()]
    except (KeyError, AttributeError):
        raise EqRError(f"{what} must be one of {', '.join(PRECISIONS)}, got {name!r}") from None


# Precision cascades "low+high" (docs/algorithm.md): low-precision steps to its residual floor, then
# high-precision steps from that state under the high precision's stopping rule.
CASCADES = ("fp16+fp32", "int8+fp32")


def split_precision(name: str, what: str = "precision") -> tuple[str, ...]:
    """"FP16" -> ("fp16",); a cascade "int8+fp32" -> ("int8", "fp32"); EqRError listing the valid names."""
    text = name.strip().lower() if isinstance(name, str) else name
    if text not in PRECISIONS and text not in CASCADES:
        raise EqRError(f"{what} must be one of {', '.join([*PRECISIONS, *CASCADES])}, got {name!r}")
    return tuple(text.split("+"))


def precision_of(path: str | os.PathLike[str]) -> str | None:
    """The precision a file name means by the table (model.step.int8.onnx -> int8), else None."""
    name = Path(path).name
    return next((row.name for row in PRECISIONS.values() if row.onnx == name), None)


def engine_file(precision: str, gpu_tag: str, trt_version: str, dla_core: int | None = None,
                noisy: bool = False) -> str:
    """model.step.<precision>[.noisy].<gpu tag>[.dla<N>].trt<version>.engine (.noisy: the noisy graph's)"""
    dla = "" if dla_core is None else f".dla{dla_core}"
    return f"model.step.{precision}{'.noisy' if noisy else ''}.{gpu_tag}{dla}.trt{trt_version}.engine"


def noisy_engine_key(precision: str) -> str:
    """The manifest "engines" key of a precision's noisy engine (its entry also says NOISY_KEY: true)."""
    return f"{precision}.{NOISY_KEY}"


# --------------------------------------------------------------------------- tolerance rule

TOL_FACTOR = 3.0  # tol sits this far above the measured residual floor
FLOOR_CAP = 5e-2  # a lowest residual above this is no floor: the step does not converge


def recommended_tol(precision: str, residual_floor: float | None = None) -> dict[str, Any]:
    """The convergence tolerance of a precision, from the residual floor its graph reaches.

    tol = max(roundoff, 3 x floor) when a floor <= FLOOR_CAP was measured; the roundoff bound
    when the measured lowest residual is above the cap (no floor: an untrained model); the
    precision's unmeasured default when nothing was measured. So an fp32 tol never silently
    fails to trigger in fp16 or int8.
    """
    row = precision_row(precision)
    if residual_floor is None:
        return {"tol": row.unmeasured_tol, "residual_floor": None, "floor_reached": False,
                "rule": f"unmeasured: {row.unmeasured_tol:g}"}
    reached = residual_floor <= FLOOR_CAP
    tol = max(row.roundoff, TOL_FACTOR * residual_floor) if reached else row.roundoff
    return {"tol": float(tol), "residual_floor": float(residual_floor), "floor_reached": bool(reached),
            "rule": f"max({row.roundoff:g}, {TOL_FACTOR:g} x residual floor) if floor <= {FLOOR_CAP:g} "
                    f"else {row.roundoff:g}"}


# --------------------------------------------------------------------------- step I/O contract

BATCH_DIM = "B"  # the one dynamic axis of every step graph
INPUTS = {"tokens": "int32", "z_H": "float32", "z_L": "float32", "done": "bool"}  # name -> dtype
# `done` freezes rows: where done[b], the state outputs are the state inputs bit for bit (and
# residual[b] is 0). Static-shape backends (CUDA-graph replay) feed their frozen slots there;
# the others feed all False. The loop hands a backend's step the other three (STEP_FEEDS).
OUTPUTS = {"z_H_out": "float32", "z_L_out": "float32", "logits": "float32", "preds": "int32",
           "residual": "float32", "logit_delta": "float32", "q_halt": "float32"}
INPUT_NAMES = tuple(INPUTS)
STEP_FEEDS = ("tokens", "z_H", "z_L")
OUTPUT_NAMES = tuple(OUTPUTS)
STATE_OUTPUTS = {"z_H": "z_H_out", "z_L": "z_L_out"}  # state input -> the output fed back as it
# The noisy step graph's extra (last) input: float32 [B, U, L, D], the addends sigma * eps of the
# step's U = H_cycles * (L_cycles + 1) damped updates, drawn by the host (docs/algorithm.md#path-noise).
# The loop adds it to a backend's feeds only on steps where a running row has noise.
NOISE_INPUT = "noise"
NOISY_KEY = "noisy"  # manifest["precisions"][p]["noisy"]: {"onnx", "updates", "parity"} of the noisy graph


def graph_feeds(tokens: np.ndarray, z_H: np.ndarray, z_L: np.ndarray,
                done: np.ndarray | None = None, noise: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """numpy feeds of a step graph (ONNX Runtime sessions, calibration): done defaults to all False;
    `noise` [B, U, L, D] only for a noisy graph."""
    done = np.zeros(len(tokens), bool) if done is None else np.asarray(done, bool)
    feeds = dict(zip(INPUT_NAMES, (np.ascontiguousarray(tokens, np.int32), np.ascontiguousarray(z_H, np.float32),
                                   np.ascontiguousarray(z_L, np.float32), done)))
    return feeds if noise is None else feeds | {NOISE_INPUT: np.ascontiguousarray(noise, np.float32)}


# Initial states z_H, z_L: i.i.d. per trajectory, token and channel, a normal truncated to
# +-INIT_TRUNCATION of its own std and rescaled by INIT_SCALE so that the result has exactly
# the manifest's init_std (JAX-style compensation): z = INIT_SCALE * std * t, t ~ N(0, 1) | |t| <= 2.
INIT_TRUNCATION = 2.0
_Z = math.erf(INIT_TRUNCATION / math.sqrt(2.0))
_PHI = math.exp(-INIT_TRUNCATION**2 / 2.0) / math.sqrt(2.0 * math.pi)
INIT_SCALE = 1.0 / math.sqrt(1.0 - 2.0 * INIT_TRUNCATION * _PHI / _Z)  # ~= 1.13685


def io_contract(seq_len: int, hidden: int, vocab: int, updates: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes of every step graph's inputs and outputs ("B": dynamic batch);
    `updates` U: the noisy graph's, with NOISE_INPUT [B, U, L, D] last."""
    B, L, D, V = BATCH_DIM, seq_len, hidden, vocab
    shapes = {"tokens": [B, L], "z_H": [B, L, D], "z_L": [B, L, D], "done": [B], "z_H_out": [B, L, D], "z_L_out": [B, L, D],
              "logits": [B, L, V], "preds": [B, L], "residual": [B], "logit_delta": [B], "q_halt": [B],
              NOISE_INPUT: [B, updates, L, D]}
    inputs = INPUTS if updates is None else INPUTS | {NOISE_INPUT: "float32"}
    as_dicts = lambda names: [{"name": n, "dtype": t, "shape": shapes[n]} for n, t in names.items()]  # noqa: E731
    return {"inputs": as_dicts(inputs), "outputs": as_dicts(OUTPUTS)}


# --------------------------------------------------------------------------- manifest


def check_manifest(data: Any, where: str | os.PathLike[str]) -> dict[str, Any]:
    """`data` if it is an eqr-export manifest of this version; EqRError naming the fix otherwise."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
        raise EqRError(f"{where}: not an {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest; re-run eqr export --force")
    return data


def manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2) + "\n"


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an export directory; EqRError if missing or not an eqr export."""
    path = Path(directory) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EqRError(f"{directory}: no {MANIFEST_FILE}; not an eqr export directory (run eqr export)") from None
    except (OSError, ValueError) as e:
        raise EqRError(f"{path}: unreadable manifest ({e}); re-run eqr export --force") from None
    return check_manifest(data, path)


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    atomic_write_text(Path(directory) / MANIFEST_FILE, manifest_text(manifest))


def with_precision(manifest: dict[str, Any], precision: str, entry: dict[str, Any],
                   calibration: dict[str, Any] | None = None, replace: bool = False) -> dict[str, Any]:
    """A copy of `manifest` with `entry` merged over (or `replace`-ing) manifest["precisions"][precision]."""
    data = json.loads(json.dumps(manifest))
    precisions = data.setdefault("precisions", {})
    precisions[precision] = entry if replace else dict(precisions.get(precision) or {}) | entry
    if calibration is not None:
        data["calibration"] = calibration
    return data


def update_manifest(directory: str | os.PathLike[str], precision: str, entry: dict[str, Any],
                    calibration: dict[str, Any] | None = None, replace: bool = False) -> dict[str, Any]:
    """Set manifest["precisions"][precision] (merged over what was there, or `replace`d), atomically."""
    data = with_precision(read_manifest(directory), precision, entry, calibration, replace)
    write_manifest(directory, data)
    return data


# The stopping rule `eqr calibrate` fits per precision, in manifest["precisions"][p]["stopping"]:
# {"rule": {RULE_FIELDS...}, "margin", "recorded_steps", "breadth", "fit": {...}, "heldout": {...}, "data"}
# (the rules and their fields: eqr.runtime.stopping_rules; docs/formats.md).
STOPPING_KEY = "stopping"


def graph_metadata(manifest: dict[str, Any], precision: str) -> dict[str, str]:
    """The ONNX metadata_props a step graph of `precision` carries."""
    return {METADATA_KEY: manifest_text(manifest), PRECISION_KEY: precision}


def embedded_manifest(metadata: dict[str, str], where: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest in a step graph's metadata (see `graph_metadata`), None when it has none."""
    if METADATA_KEY not in metadata:
        return None
    try:
        data = json.loads(metadata[METADATA_KEY])
    except ValueError as e:
        raise EqRError(f"{where}: malformed {METADATA_KEY} metadata ({e}); re-run eqr export --force") from None
    return check_manifest(data, f"{where} ({METADATA_KEY} metadata)")


def unmeasured_tols() -> dict[str, float]:
    return {p: recommended_tol(p)["tol"] for p in PRECISIONS}


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A deployable model, whatever its container: what `eqr.runtime.resolve.load_artifact` makes
    of a path or name, and what every backend is built from."""

    kind: str  # "export" | "onnx" | "engine" | "checkpoint" (files, bundled names, presets) | "model" (in memory)
    location: str  # as the user gave it
    seq_len: int  # L
    hidden_size: int  # D
    vocab_size: int  # V
    init_std: tuple[float, float] = (1.0, 1.0)  # (z_H, z_L) truncated-normal stds
    config: ModelConfig | None = None
    task: dict[str, Any] | None = None  # {"name", "size", ...} when known
    onnx: dict[str, Path] = field(default_factory=dict)  # precision -> step ONNX file
    engines: dict[str, Path] = field(default_factory=dict)  # precision -> TensorRT engine
    tol: dict[str, float] = field(default_factory=unmeasured_tols)
    checkpoint: str | None = None  # anything eqr.model.load.load_model accepts (torch backend)
    batch: tuple[int, int, int] = (1, 64, 256)  # min/opt/max batch the export was built for
    source: dict[str, Any] | None = None  # the manifest's record of the weights an export came from
    precision: str | None = None  # the one precision a single .onnx or engine file holds
    # precision -> the stopping rule `eqr calibrate` fitted (eqr.runtime.stopping_rules.RULE_FIELDS)
    stopping: dict[str, dict[str, Any]] = field(default_factory=dict)
    noisy: dict[str, Path] = field(default_factory=dict)  # precision -> its noisy step graph (NOISE_INPUT)
    noisy_engines: dict[str, Path] = field(default_factory=dict)  # precision -> its noisy graph's TensorRT engine

    def default_tol(self, precision: str) -> float:
        return self.tol.get(precision, recommended_tol(precision)["tol"])

    def stopping_rule(self, precision: str) -> dict[str, Any]:
        """The calibrated rule of `precision` (a cascade: its high stage's), else only its tol."""
        precision = split_precision(precision)[-1]
        return dict(self.stopping.get(precision) or {"tol": self.default_tol(precision)})


def missing_noisy_graph(artifact: Artifact, precision: str) -> str:
    """Why `precision` cannot run with path noise on `artifact`, in one line with the fix."""
    row = PRECISIONS.get(precision)
    if row is None or row.noisy_onnx is None:
        have = ", ".join(p for p, r in PRECISIONS.items() if r.noisy_onnx)
        return f"--noise: precision {precision} has no noisy step graph (only {have} do); pick one of those"
    if artifact.kind != "export":
        return (f"--noise: {artifact.location} has no noisy {precision} step graph ({row.noisy_onnx}); run an export "
                f"made with `eqr export MODEL --noisy`, or the torch backend")
    return (f"--noise: {artifact.location} has no {row.noisy_onnx}; re-export with `eqr export MODEL --noisy "
            f"--precision {precision} --out {artifact.location} --force`")
