"""The work of `eqr calibrate`: record calibration states along FP32 trajectories, build the
FP16/INT8 graphs of an export from them, and measure each precision's tolerance and stopping rule
into manifest.json (docs/algorithm.md#calibrated-stopping-rules, docs/formats.md).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from eqr.calibration.config import CalibConfig
from eqr.contract.artifact import PRECISIONS
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress
from eqr.runtime.backends.base import backend_info
from eqr.contract.artifact import Artifact
from eqr.runtime.resolve import load_artifact

BUILT_BY = "eqr calibrate"  # manifest precisions[p]["built_by"] of the graphs calibrate owns
CALIBRATED = ("fp16", "int8")
log = logging.getLogger(__name__)


def export_artifact(export_dir: str) -> Artifact:
    """The Artifact of an export directory; EqRError for a checkpoint or a lone graph."""
    artifact = load_artifact(export_dir)
    if artifact.kind != "export":
        raise EqRError(f"{export_dir}: expected an export directory (made by `eqr export`), got a {artifact.kind}")
    return artifact


def plan_precisions(manifest: dict[str, Any], root: Path, requested: tuple[str, ...],
                    force: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """-> (graphs to build, export-written graphs kept). Calibrate replaces its own graphs freely;
    one `eqr export` wrote only when named in --precision with --force."""
    def foreign(p: str) -> bool:
        entry = manifest["precisions"].get(p) or {}
        return (root / PRECISIONS[p].onnx).exists() and entry.get("built_by") != BUILT_BY

    if not requested:
        return tuple(p for p in CALIBRATED if not foreign(p)), tuple(p for p in CALIBRATED if foreign(p))
    clash = [str(root / PRECISIONS[p].onnx) for p in requested if foreign(p)]
    if clash and not force:
        raise EqRError(f"{', '.join(clash)}: written by `eqr export`; pass --force to replace "
                       f"{'it' if len(clash) == 1 else 'them'} with calibrated graphs, or leave "
                       f"{'it' if len(clash) == 1 else 'them'} out of --precision")
    return requested, ()


def run_calibrate(export_dir: str, data: str | None, cfg: CalibConfig,
                  progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The work of `eqr calibrate` -> (the manifest entries it wrote, {calib, states, kept, recorded_on})."""
    from eqr.contract.artifact import CALIB_FILE, read_manifest, update_manifest, with_precision
    from eqr.calibration.data import load_puzzles
    from eqr.calibration.quantize import embed_manifest, fp32_onnx
    from eqr.calibration.record import record_calibration, save_calib
    from eqr.contract.io import sha256_file
    from eqr.runtime import Solver

    progress = progress or Progress(quiet=True)
    artifact = export_artifact(export_dir)
    manifest = read_manifest(export_dir)
    fp32_onnx(export_dir)  # the graph the others derive from must be there
    root = Path(export_dir)
    build, kept = plan_precisions(manifest, root, cfg.precisions, cfg.force)
    puzzles = load_puzzles(artifact.task, artifact.seq_len, data, cfg.puzzles, cfg.seed)
    fp32_path = artifact.onnx["fp32"]
    provenance = {"model": {"fp32_onnx": fp32_path.name, "fp32_onnx_sha256": sha256_file(fp32_path),
                            "source": manifest.get("source")},
                  "data": puzzles.source, "config": cfg.to_dict()}
    with progress.bar("recording FP32 trajectories", len(puzzles) * cfg.starts) as advance:
        with Solver.load(artifact, backend="onnxruntime", precision="fp32") as solver:
            calib = record_calibration(solver, puzzles.inputs, cfg.starts, cfg.depths, cfg.seed, provenance,
                                       progress=advance)
            recorded_on = backend_info(solver.backend)
    save_calib(root / CALIB_FILE, calib, force=True)  # calibrate's own file
    rules_on = load_puzzles(artifact.task, artifact.seq_len, data, cfg.rule_puzzles, cfg.seed + 1) \
        if cfg.rule_puzzles else None
    if rules_on is not None and rules_on.labels is None:
        log.warning("--calib-data %s has no labels: the stopping rules are not fitted", data)
        rules_on = None
    calibration = {"file": CALIB_FILE, "states": len(calib), "sha256": sha256_file(root / CALIB_FILE),
                   "puzzles": len(puzzles), "starts": cfg.starts, "depths": list(cfg.depths),
                   "seed": cfg.seed, "data": puzzles.source}
    # fp32 and the export's own graphs only get a stopping rule; the graphs calibrate builds get everything
    measured = ("fp32", *build, *kept) if rules_on is not None else build
    entries: dict[str, dict[str, Any]] = {}
    with progress.bar("building precision graphs and fitting stopping rules", len(measured)) as advance:
        for precision in measured:
            built = precision in build
            entry = build_graph(export_dir, precision, calib, cfg) if built else {}
            onnx_name = entry.get("onnx") or artifact.onnx[precision].name
            entry |= measure_precision(export_dir, precision, onnx_name, puzzles.inputs if rules_on is None
                                       else rules_on.inputs, None if rules_on is None else rules_on.labels, cfg)
            if not built:
                entry.pop("tol"), entry.pop("tol_rule")  # its tol is the export's (its parity run)
            if rules_on is not None:
                entry["stopping"]["data"] = rules_on.source
            update_manifest(export_dir, precision, entry, calibration if built else None, replace=built)
            entries[precision] = entry
            advance(1)
    # Every graph this run built describes itself (a copy of it runs like this directory, with every
    # precision's stopping rule); its own hash cannot be inside it, so manifest.json records that
    # after the metadata is written. Graphs `eqr export` wrote (fp32 included) keep their bytes: the
    # engines built from them and calib.npz's provenance name their hashes; their stopping rules
    # live in manifest.json.
    for precision in build:
        path = root / PRECISIONS[precision].onnx
        manifest = with_precision(read_manifest(export_dir), precision, {})  # a copy
        manifest["precisions"][precision].pop("sha256", None)
        embed_manifest(path, manifest, precision)
        entries[precision]["sha256"] = sha256_file(path)
        update_manifest(export_dir, precision, {"sha256": entries[precision]["sha256"]})
    info = {"calib": str(root / CALIB_FILE), "states": len(calib), "kept": list(kept), "recorded_on": recorded_on}
    return entries, info


def build_graph(export_dir: str, precision: str, calib: Any, cfg: CalibConfig) -> dict[str, Any]:
    """Write calibrate's FP16 or INT8 graph of the export -> its manifest entry."""
    from eqr.calibration.quantize import QuantPolicy, build_fp16, build_int8

    if precision == "fp16":
        entry = build_fp16(export_dir, cfg.keep_fp32_ops, force=True)
    else:
        policy = QuantPolicy(cfg.method, cfg.op_types, cfg.exclude_nodes, cfg.percentile)
        entry = build_int8(export_dir, calib, policy, force=True)
    return entry | {"built_by": BUILT_BY}


def measure_precision(export_dir: str, precision: str, onnx_name: str, inputs: np.ndarray,
                      labels: np.ndarray | None, cfg: CalibConfig) -> dict[str, Any]:
    """One recorded fixed-depth run of this graph: the export's tol rule applied to the residual
    floor it reaches and, with labels, the fitted stopping rule (`eqr.calibration.stopping`)."""
    from eqr.contract.artifact import recommended_tol
    from eqr.calibration.stopping import fit_and_evaluate, record_trajectories
    from eqr.runtime import Solver
    from eqr.runtime.backends.ort_backend import OrtBackend

    artifact = export_artifact(export_dir)
    backend = OrtBackend(Path(export_dir) / onnx_name, precision=precision)
    solver = Solver(backend, artifact.seq_len, artifact.hidden_size, artifact.init_std, precision=precision)
    steps = max(cfg.rule_steps if labels is not None else cfg.max_depth, 2)
    with solver:
        traj = record_trajectories(solver, inputs, steps, cfg.seed)
    tail = traj.residual[steps // 2:]  # late residuals (N/2, P)
    floor = float(np.median(np.nanmin(np.where(np.isfinite(tail), tail, np.inf), axis=0)))
    rule = recommended_tol(precision, floor)
    entry: dict[str, Any] = {"tol": rule["tol"], "tol_rule": rule}
    if labels is not None:
        entry["stopping"] = fit_and_evaluate(traj, labels, cfg.rule_margin)
    return entry
