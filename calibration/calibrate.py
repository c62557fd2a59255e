"""The work of `eqr calibrate`: record calibration states along FP32 trajectories, build the
FP16/INT8 graphs of an export from them, and measure each precision's tolerance and stopping rule
into manifest.json (docs/algorithm.md#calibrated-stopping-rules, docs/formats.md).
"""
from __future__ import annotations

import importlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from eqr.calibration.config import CalibConfig
from eqr.contract.artifact import PRECISIONS, Artifact, with_cpu_variants
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress
from eqr.runtime.resolve import load_artifact

CALIBRATED = ("fp16", "int8", "int8-cpu")
# built when --precision names none; int8 brings int8-cpu, which ONNX Runtime's CPU provider runs
# for int8 (docs/performance.md#a-cpu-int8-graph)
DEFAULT_CALIBRATED = with_cpu_variants(("fp16", "int8"))
log = logging.getLogger(__name__)


def export_artifact(export_dir: str) -> Artifact:
    """The Artifact of an export directory; EqRError for a checkpoint or a lone graph."""
    artifact = load_artifact(export_dir)
    if artifact.kind != "export":
        raise EqRError(f"{export_dir}: expected an export directory (made by `eqr export`), got a {artifact.kind}")
    return artifact


def checked_against_the_model(entry: dict[str, Any]) -> bool:
    """A graph `eqr export` wrote was checked step by step against the model ("parity"), which
    calibrate, with no model at hand, cannot redo: calibrate keeps it unless told to replace it."""
    return "parity" in entry


def plan_precisions(manifest: dict[str, Any], root: Path, requested: tuple[str, ...],
                    force: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """-> (graphs to build, parity-checked graphs kept). Calibrate replaces the graphs it built
    freely; one `eqr export` checked against the model only when named in --precision with --force."""
    def checked(p: str) -> bool:
        return (root / PRECISIONS[p].onnx).exists() and checked_against_the_model(manifest["precisions"].get(p) or {})

    if not requested:
        return (tuple(p for p in DEFAULT_CALIBRATED if not checked(p)),
                tuple(p for p in DEFAULT_CALIBRATED if checked(p)))
    clash = [str(root / PRECISIONS[p].onnx) for p in requested if checked(p)]
    if clash and not force:
        raise EqRError(f"{', '.join(clash)}: written by `eqr export`; pass --force to replace "
                       f"{'it' if len(clash) == 1 else 'them'} with calibrated graphs, or leave "
                       f"{'it' if len(clash) == 1 else 'them'} out of --precision")
    return requested, ()


def run_calibrate(export_dir: str, data: str | None, cfg: CalibConfig,
                  progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The work of `eqr calibrate` -> (the manifest entries it wrote, {calib, states, kept, recorded_on}).

    The graphs it builds are measured from a staging folder and written into the export once,
    each with the final manifest in its metadata (a copy of it runs like this directory, with
    every precision's stopping rule), then manifest.json; a run interrupted while it builds and
    measures leaves the graphs and manifest.json as they were."""
    import onnx

    from eqr.calibration.data import load_puzzles
    from eqr.calibration.record import record_fp32, save_calib
    from eqr.contract.artifact import CALIB_FILE, read_manifest, with_precision, write_manifest
    from eqr.contract.io import sha256_file
    from eqr.export.build import write_graph

    progress = progress or Progress(quiet=True)
    artifact = export_artifact(export_dir)
    manifest = read_manifest(export_dir)
    root = Path(export_dir)
    fp32_path = artifact.onnx.get("fp32")
    if fp32_path is None or not fp32_path.is_file():
        raise EqRError(f"{root}: the FP32 step graph ({PRECISIONS['fp32'].onnx}) is missing; re-run `eqr export`")
    build, kept = plan_precisions(manifest, root, with_cpu_variants(cfg.precisions), cfg.force)
    if build:  # the graph tools (eqr[calibrate]), asked now rather than after the recording
        importlib.import_module("onnx_graphsurgeon")
    puzzles = load_puzzles(artifact.task, artifact.seq_len, data, cfg.puzzles, cfg.seed)
    provenance = {"model": {"fp32_onnx": fp32_path.name, "fp32_onnx_sha256": sha256_file(fp32_path),
                            "source": manifest.get("source")},
                  "data": puzzles.source, "config": cfg.to_dict()}
    with progress.bar("recording FP32 trajectories", len(puzzles) * cfg.starts) as advance:
        calib, recorded_on = record_fp32(fp32_path, (artifact.seq_len, artifact.hidden_size, artifact.init_std),
                                         puzzles.inputs, cfg.starts, cfg.depths, cfg.seed, provenance, advance)
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
    graphs: dict[str, onnx.ModelProto] = {}
    fp32 = onnx.load(str(fp32_path))
    with tempfile.TemporaryDirectory(prefix=".eqr-calibrate-", dir=root) as staging:
        fit_inputs = puzzles.inputs if rules_on is None else rules_on.inputs
        fit_steps = max(cfg.rule_steps if rules_on is not None else cfg.max_depth, 2)
        fit_rows = len(fit_inputs) * (cfg.rule_breadth if rules_on is not None else 1)
        # the unit is one row-step of the recorded runs (the long part at paper size: puzzles x steps per precision)
        note = None if rules_on is None else (lambda eta: rule_fit_note(eta, len(rules_on.inputs)))
        with progress.bar("building precision graphs and fitting stopping rules",
                          len(measured) * fit_rows * fit_steps, long_note=note) as advance:
            for precision in measured:
                built = precision in build
                path = artifact.onnx.get(precision)
                entry: dict[str, Any] = {}
                if built:
                    graphs[precision], entry = build_precision(fp32, precision, calib, cfg)
                    path = Path(staging) / PRECISIONS[precision].onnx
                    path.write_bytes(graphs[precision].SerializeToString())
                entry |= measure_precision(artifact, precision, path, fit_inputs,
                                           None if rules_on is None else rules_on.labels, cfg, advance)
                if not built:
                    entry.pop("tol"), entry.pop("tol_rule")  # its tol is the export's (its parity run)
                if rules_on is not None:
                    entry["stopping"]["data"] = rules_on.source
                manifest = with_precision(manifest, precision, entry, calibration if built else None, replace=built)
                entries[precision] = entry
    # A graph's own hash cannot be inside it: manifest.json records it once the graph is written.
    # Graphs `eqr export` wrote (fp32 included) keep their bytes: the engines built from them and
    # calib.npz's provenance name their hashes; their stopping rules live in manifest.json.
    described = json.loads(json.dumps(manifest))
    for precision, graph in graphs.items():
        path = root / PRECISIONS[precision].onnx
        write_graph(path, graph, described, precision)
        entries[precision]["sha256"] = manifest["precisions"][precision]["sha256"] = sha256_file(path)
    write_manifest(root, manifest)
    info = {"calib": str(root / CALIB_FILE), "states": len(calib), "kept": list(kept), "recorded_on": recorded_on}
    return entries, info


def rule_fit_note(eta_s: float, rule_puzzles: int) -> str:
    """The one hint a long stopping-rule fit gives: fewer --rule-puzzles (a quarter, at least 32)."""
    from eqr.contract.progress import eta_text

    smaller = max(32, rule_puzzles // 4)
    hint = (f"; `--rule-puzzles {smaller}` fits on fewer puzzles (now {rule_puzzles}), at a wider "
            "accuracy margin of noise" if smaller < rule_puzzles else "")
    return f"note: fitting the stopping rules will take about {eta_text(eta_s)} more{hint}"


def build_precision(fp32: Any, precision: str, calib: Any, cfg: CalibConfig) -> tuple[Any, dict[str, Any]]:
    """Calibrate's FP16 or INT8 (TensorRT's, or the CPU's: int8-cpu) graph of the export's FP32 graph
    -> (graph, its manifest entry). Both INT8 graphs quantize from the same recorded states `calib`."""
    from eqr.calibration.quantize import QuantPolicy, build_fp16, build_int8

    if precision == "fp16":
        return build_fp16(fp32, cfg.keep_fp32_ops)
    policy = QuantPolicy(cfg.method, cfg.op_types, cfg.exclude_nodes, cfg.percentile,
                         reduce_range=cfg.reduce_range and precision == "int8-cpu")
    return build_int8(fp32, calib, policy, precision)


def measure_precision(artifact: Artifact, precision: str, onnx_path: Path, inputs: np.ndarray,
                      labels: np.ndarray | None, cfg: CalibConfig, advance: Any = None) -> dict[str, Any]:
    """One recorded fixed-depth run of this graph: the export's tol rule applied to the residual
    floor it reaches and, with labels, the fitted stopping rule (`eqr.calibration.stopping`)."""
    from eqr.calibration.stopping import fit_and_evaluate, record_trajectories
    from eqr.contract.artifact import recommended_tol
    from eqr.runtime import Solver
    from eqr.runtime.backends.ort_backend import OrtBackend

    backend = OrtBackend(onnx_path, precision=precision)
    solver = Solver(backend, artifact.seq_len, artifact.hidden_size, artifact.init_std, precision=precision)
    steps = max(cfg.rule_steps if labels is not None else cfg.max_depth, 2)
    with solver:
        traj = record_trajectories(solver, inputs, steps, cfg.seed, advance,
                                   breadth=cfg.rule_breadth if labels is not None else 1)
    tail = traj.residual[steps // 2:]  # late residuals (N/2, P)
    floor = float(np.median(np.nanmin(np.where(np.isfinite(tail), tail, np.inf), axis=0)))
    rule = recommended_tol(precision, floor)
    entry: dict[str, Any] = {"tol": rule["tol"], "tol_rule": rule}
    if labels is not None:
        entry["stopping"] = fit_and_evaluate(traj, labels, cfg.rule_margin)
    return entry
