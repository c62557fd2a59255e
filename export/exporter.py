"""`export_model`: a model -> a directory of checked step graphs, a manifest, optional engines.

Stages (each reported through `Progress`): FP32 graph, lint, parity; FP16 and/or INT8 graphs
with their checks; manifest; TensorRT engines. Everything is built in a staging directory
beside the output and moved in only when every check passed, so a failed or interrupted
export leaves no partial files; each file is written atomically.

Every ONNX file carries the manifest JSON and its own precision in its `metadata_props`
(`eqr.contract.artifact.graph_metadata`), as the manifest stood when the graphs were written: its
"engines" entry is empty there, because engines are built from those very files; manifest.json
adds them.

INT8 needs calibration feeds, which come from running the step loop on the FP32 graph: the
caller passes a `Calibrate` (eqr export builds one with `eqr.calibration.record.int8_calibration`,
which records them as `eqr calibrate` does), so export itself never runs the runtime.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from eqr import __version__
from eqr.contract.artifact import (CALIB_FILE, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, NOISY_KEY,
                                   OWN_FILE_PATTERNS, PRECISIONS, REPORT_DIR, io_contract, recommended_tol, write_manifest)
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress
from eqr.export import parity
from eqr.export.build import BuildOptions, build_graph, write_graph
from eqr.export.config import ExportConfig
from eqr.export.inputs import TaskInfo, infer_task, initial_states, task_inputs
from eqr.export.noisy import build_noisy_graphs
from eqr.model.network import EqRModel

log = logging.getLogger(__name__)

Feeds = list[dict[str, np.ndarray]]  # step inputs keyed by INPUT_NAMES, one dict per batch
# (the checked FP32 graph, the task, progress) -> (INT8 calibration feeds, their provenance for the manifest)
Calibrate = Callable[[Any, TaskInfo, Progress], tuple[Feeds, dict[str, Any]]]


class ExportError(EqRError):
    """The export ran but a check failed (parity, lint, TensorRT): exit 1, no files written."""

    exit_code = 1


# --------------------------------------------------------------------------- output directory


def default_out_dir(model: EqRModel) -> Path:
    """<model stem>-eqr/ in the working directory (file stem, bundled name or preset name)."""
    location = model.source.location if model.source else "model"
    return Path(f"{Path(location).stem or 'model'}-eqr")


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse an existing directory without --force, a file in the way, or an unwritable parent."""
    if out_dir.exists() and not out_dir.is_dir():
        raise EqRError(f"--out {out_dir}: exists and is not a directory; choose another --out")
    if out_dir.exists() and not force:
        raise EqRError(f"--out {out_dir}: already exists; pass --force to replace the export there "
                       f"(its {CALIB_FILE} and {REPORT_DIR}/ go too), or choose another --out")
    parent = out_dir.absolute().parent
    if not parent.is_dir():
        raise EqRError(f"--out {out_dir}: parent directory {parent} does not exist; create it first")
    target = out_dir if out_dir.exists() else parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise EqRError(f"--out {out_dir}: {target} is not writable; choose another --out")


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    parent = out_dir.absolute().parent
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=parent))
    except OSError as e:
        raise EqRError(f"--out {out_dir}: cannot write in {parent} ({e.strerror}); choose another --out") from None
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out_dir: Path) -> None:
    """Move the staged files into `out_dir`: a rename of the whole directory when it is new."""
    umask = os.umask(0)
    os.umask(umask)
    for path in stage.iterdir():  # temp files are created 0600; exports are ordinary files
        path.chmod(0o666 & ~umask)
    stage.chmod(0o777 & ~umask)
    if not out_dir.exists():
        os.replace(stage, out_dir)
        stage.mkdir()  # staging_dir's cleanup expects it
        return
    new = {p.name for p in stage.iterdir()}
    for pattern in OWN_FILE_PATTERNS:  # stale files of an earlier export (e.g. an old engine)
        for old in out_dir.glob(pattern):
            if old.name not in new:
                old.unlink()
    for path in stage.iterdir():
        os.replace(path, out_dir / path.name)
    remove_derived(out_dir)


def remove_derived(out_dir: Path) -> None:
    """What `eqr calibrate` and `eqr report` derived from the previous export describes other graphs."""
    (out_dir / CALIB_FILE).unlink(missing_ok=True)
    report = out_dir / REPORT_DIR
    if (report / "report.json").is_file():
        shutil.rmtree(report)


# --------------------------------------------------------------------------- manifest


def library_versions() -> dict[str, str | None]:
    import onnx
    import onnxruntime
    import polygraphy

    from eqr.export.tensorrt import tensorrt_version

    return {"eqr": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "polygraphy": polygraphy.__version__,
            "tensorrt": tensorrt_version(), "python": platform.python_version()}


def base_manifest(model: EqRModel, config: ExportConfig, task: TaskInfo) -> dict[str, Any]:
    mc = model.config
    source = model.source
    lo, opt, hi = config.batch
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "eqr_version": __version__,
        "source": {"location": source.location if source else None, "kind": source.kind if source else "init",
                   "sha256": source.sha256 if source else None, "weights": source.weights if source else "init"},
        "config": mc.to_dict(),
        "task": task.to_dict(),
        "io": io_contract(mc.seq_len, mc.hidden_size, mc.vocab_size),
        "opset": config.opset,
        "init_std": {"z_H": mc.H_init_std, "z_L": mc.L_init_std},
        "batch": {"min": lo, "opt": opt, "max": hi},
        "precisions": {},
        "engines": {},
        "engine_build": {},
        "export": config.to_dict() | {"precision": list(config.precisions), "batch": list(config.batch)},
        "versions": library_versions(),
    }


# --------------------------------------------------------------------------- checks


def check_contract(model_proto, precision: str, mc) -> None:
    """The fixed I/O contract and standard ops only (TensorRT's parser); ExportError otherwise."""
    from eqr.export.onnx_graph import check_io_contract, nonstandard_ops

    where = PRECISIONS[precision].onnx
    try:
        check_io_contract(model_proto, mc.seq_len, mc.hidden_size, mc.vocab_size, where)
    except ValueError as e:
        raise ExportError(str(e)) from None
    foreign = nonstandard_ops(model_proto)
    if foreign:
        raise ExportError(f"{where}: uses non-standard ops TensorRT cannot parse: {', '.join(foreign)}")


def lint_graph(model_proto, precision: str, mc) -> None:
    """`polygraphy check lint` must be clean; ExportError otherwise."""
    from eqr.export.onnx_graph import lint

    report = lint(model_proto.SerializeToString(), mc.seq_len, mc.hidden_size, mc.vocab_size)
    if not report["passed"]:
        raise ExportError(f"{PRECISIONS[precision].onnx}: polygraphy check lint failed: "
                          f"{'; '.join(report['messages'] or report['failing'])}")


def check_precision(precision: str, model_proto, ref: parity.Reference, progress: Progress) -> dict[str, Any]:
    """Step error and trajectory agreement of one graph against torch; FP32 must match to 1e-4.

    FP32 is checked teacher-forced at every depth (it must match torch step by step, so its
    own trajectory is torch's); FP16/INT8 at a log-spaced subset of depths, plus a trajectory
    they drive themselves (their answers and residual floor differ from FP32's).
    """
    from eqr.export.onnx_graph import session

    checker = session(model_proto)
    step = parity.ort_step(checker)
    steps = ref.trajectory.steps
    fp32 = precision == "fp32"
    with progress.bar(f"{precision} teacher-forced steps", 1) as advance:
        errors = parity.step_errors(step, ref, parity.check_depths(steps, every_depth=fp32))
        advance(1)
    if fp32:
        trajectory = parity.reference_trajectory(ref, errors)
    else:
        with progress.bar(f"{precision} trajectory", steps) as advance:
            trajectory = parity.trajectory_check(step, ref, advance)
    values = [errors["max_abs"], trajectory["final_state_max_abs"], trajectory["residual_floor"]]
    if not np.isfinite(values).all():
        raise ExportError(f"{PRECISIONS[precision].onnx}: produced NaN or Inf in ONNX Runtime; the {precision} graph is unusable")
    if fp32 and errors["max_scaled"] > parity.FP32_STEP_ATOL:
        raise ExportError(f"{PRECISIONS['fp32'].onnx}: ONNX Runtime differs from model.step by {errors['max_scaled']:.3g} "
                          f"(> {parity.FP32_STEP_ATOL:g}, in units of max(1, output RMS)) in one step; "
                          "the export is wrong, please report it")
    tol = recommended_tol(precision, trajectory["residual_floor"])
    progress.done(parity_line(precision, errors, trajectory, steps))
    progress.done(f"{precision}: runtime convergence tol {tol['tol']:.3g} (residual floor "
                  f"{tol['residual_floor']:.3g}; recorded in {MANIFEST_FILE})")
    if not tol["floor_reached"] and not fp32:
        progress.done(f"{precision}: no residual floor in {steps} steps (lowest {tol['residual_floor']:.3g}): the model "
                      "does not converge (untrained?), so trajectories diverge and agreement is not meaningful")
    return {"step_error": errors, "trajectory": trajectory, "tol": tol,
            "runner": {"backend": "onnxruntime", "providers": checker.get_providers()}}


def parity_line(precision: str, errors: dict[str, Any], trajectory: dict[str, Any], steps: int) -> str:
    """The check's result in words: what was measured, against which limit (FP32 only has one)."""
    depths = len(errors["depths"])
    if precision == "fp32":
        verdict = (f"step error vs torch {errors['max_scaled']:.3g} of the output scale, max(1, RMS) "
                   f"(limit {parity.FP32_STEP_ATOL:g}: passed) over {depths} depths; max abs {errors['max_abs']:.3g}")
    else:
        verdict = (f"step error vs torch max abs {errors['max_abs']:.3g} over {depths} depths "
                   f"({errors['max_abs_one_step']:.3g} one step from random states; no limit, reported only)")
    return (f"{precision}: {verdict}; state error {errors['state_rel']:.2g} of the state's max abs; answers after "
            f"{steps} steps agree with torch fp32 on {trajectory['answers_agree']:.0%} of trajectories "
            f"({trajectory['tokens_agree']:.1%} of tokens)")


# --------------------------------------------------------------------------- the export


INT8_SCHEMES = {"int8": "QDQ, symmetric int8 weights (per channel) and activations; FP16 outside (TensorRT)",
                "int8-cpu": "QDQ, symmetric int8 weights (per channel), asymmetric uint8 activations; FP32 outside "
                            "(ONNX Runtime CPU integer kernels)"}


def build_graphs(model: EqRModel, config: ExportConfig, task: TaskInfo, calibrate: Calibrate | None,
                 progress: Progress) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """-> ({precision: ModelProto}, {precision: manifest entry}) with every check run."""
    from eqr.export.int8 import quantized_ops

    mc = model.config
    progress.stage(f"reference: torch fp32, {config.check_batch} trajectories x {config.check_steps} steps "
                   f"({torch.get_num_threads()} CPU threads)")
    g = torch.Generator().manual_seed(config.seed)
    tokens = task_inputs(task, model, config.check_batch, config.seed)
    state = initial_states(model, config.check_batch, g)
    with progress.bar("torch trajectory", config.check_steps) as advance:
        ref = parity.reference_run(model, tokens, state.z_H, state.z_L, config.check_steps, advance)

    graphs: dict[str, Any] = {}
    entries: dict[str, dict[str, Any]] = {}
    calibrated = None
    for precision in config.precisions:
        row = PRECISIONS[precision]
        progress.stage(f"{precision}: build {row.onnx}")
        start = time.perf_counter()
        options, extra = BuildOptions(opset=config.opset), {}
        if row.calibrated:
            if calibrated is None:  # int8 and int8-cpu quantize from the same recorded states
                calibrated = calibrate(graphs[row.built_from], task, progress)
            feeds, calib_info = calibrated
            options = BuildOptions(calib_feeds=feeds)
            extra = {"calibration": calib_info, "scheme": INT8_SCHEMES[precision]}
        elif precision == "fp16":
            extra = {"kept_fp32": "reductions and norm chains, softmax, argmax, output heads"}
        graph = build_graph(precision, model if row.built_from is None else graphs[row.built_from], options)
        if row.calibrated:
            extra["quantized_ops"] = quantized_ops(graph)
        built = time.perf_counter() - start
        progress.done(f"{precision}: built in {built:.1f} s, {len(graph.graph.node)} nodes")
        results: dict[str, Any] = {}
        for check in row.checks:
            results |= CHECKS[check](precision, graph, Checking(mc, ref, progress)) or {}
        graphs[precision] = graph
        entries[precision] = {"onnx": row.onnx, "tol": results["tol"]["tol"], "tol_rule": results["tol"],
                              "parity": {k: results[k] for k in ("step_error", "trajectory", "runner")},
                              "build_seconds": round(built, 2)} | extra
    return graphs, entries


@dataclass(frozen=True)
class Checking:
    """What every check of a built graph reads."""

    config: Any  # the model's ModelConfig
    reference: parity.Reference  # the torch trajectories the graphs are compared with
    progress: Progress


def _io_contract(precision: str, graph: Any, c: Checking) -> None:
    check_contract(graph, precision, c.config)
    c.progress.done(f"{precision}: I/O contract and ops ok")


def _parity(precision: str, graph: Any, c: Checking) -> dict[str, Any]:
    c.progress.stage(f"{precision}: parity with torch (ONNX Runtime, CPU)")
    return check_precision(precision, graph, c.reference, c.progress)


def _lint(precision: str, graph: Any, c: Checking) -> None:
    c.progress.stage(f"{precision}: polygraphy check lint")
    lint_graph(graph, precision, c.config)
    c.progress.done(f"{precision}: lint clean")


# check name (PRECISIONS[p].checks) -> (precision, graph, what it reads) -> manifest entry fields or None
CHECKS: dict[str, Callable[[str, Any, Checking], dict[str, Any] | None]] = {
    "io_contract": _io_contract, "parity": _parity, "lint": _lint}


def export_model(model: EqRModel, out_dir: str | os.PathLike[str] | None, config: ExportConfig,
                 progress: Progress | None = None, calibrate: Calibrate | None = None) -> dict[str, Any]:
    """Export `model`'s step to `out_dir` (default `<stem>-eqr/`) -> the manifest written there.

    `calibrate` supplies the INT8 calibration feeds (needed when int8 is among the precisions):
    `eqr.calibration.record.int8_calibration(model, config)` records them as eqr export does."""
    from eqr.export.tensorrt import engine_support

    progress = progress or Progress(quiet=True)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model)
    check_out_dir(out, config.force)
    if any(PRECISIONS[p].calibrated for p in config.precisions) and calibrate is None:
        raise EqRError("int8 export needs calibration feeds: pass calibrate="
                       "eqr.calibration.record.int8_calibration(model, config), as eqr export does")
    gpu, trt_version, why_not = engine_support()
    if config.engine == "always" and why_not:
        raise ExportError(f"engine: cannot build TensorRT engines: {why_not}; use --engine auto or never "
                          "for the ONNX files only")
    model = fp32_model(model)
    task = infer_task(model)
    manifest = base_manifest(model, config, task)
    with staging_dir(out) as stage, cpu_threads(config.threads):
        graphs, manifest["precisions"] = build_graphs(model, config, task, calibrate, progress)
        noisy = build_noisy_graphs(model, config, task, progress) if config.noise else {}
        for precision, (_, entry) in noisy.items():
            manifest["precisions"][precision][NOISY_KEY] = entry
        progress.stage("write ONNX files and manifest")
        for precision, graph in graphs.items():
            write_graph(stage / PRECISIONS[precision].onnx, graph, manifest, precision)
        for precision, (graph, _) in noisy.items():
            write_graph(stage / PRECISIONS[precision].noisy_onnx, graph, manifest, precision)
        manifest["engines"], manifest["engine_build"] = build_engines(stage, config, gpu, trt_version, why_not,
                                                                      model, progress)
        write_manifest(stage, manifest)
        publish(stage, out)
    files = [PRECISIONS[p].onnx for p in graphs] + [PRECISIONS[p].noisy_onnx for p in noisy]
    progress.done(f"wrote {out}/ ({', '.join(files)}, {MANIFEST_FILE})")
    return manifest


@contextlib.contextmanager
def cpu_threads(requested: int) -> Iterator[int]:
    """Run the checks on `requested` threads, or (0) on the cores the load average leaves idle.

    Spinning torch threads on busy cores collapse: measured here on 2 shared cores, a
    paper-size step took 13.7 s on 2 threads and 1.7 s on 1. ONNX Runtime sessions follow
    `torch.get_num_threads()`.
    """
    previous = torch.get_num_threads()
    if requested:
        threads = requested
    else:
        idle = (os.cpu_count() or 1) - os.getloadavg()[0] if hasattr(os, "getloadavg") else previous
        threads = max(1, min(previous, int(idle + 0.5)))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def fp32_model(model: EqRModel) -> EqRModel:
    """The same weights computing in float32 (a bf16-trained config exports as an FP32 graph)."""
    if model.config.forward_dtype == "float32":
        return model.eval()
    twin = EqRModel(dataclasses.replace(model.config, forward_dtype="float32"))
    twin.load_state_dict(model.state_dict())
    twin.source, twin.metadata = model.source, model.metadata
    return twin.eval()


def build_engines(stage: Path, config: ExportConfig, gpu, trt_version, why_not: str, model: EqRModel,
                  progress: Progress) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> ({precision: engine entry}, {"status": "built"|"skipped", "reason"}); the ONNX side is
    complete either way. The engines are `eqr engine`'s: `eqr.export.tensorrt.build_engines`."""
    from eqr.export.tensorrt import EngineBuild, EngineBuildError, EngineProfile, build_engines as build

    if config.engine == "never":
        return {}, {"status": "skipped", "reason": "--engine never"}
    if why_not:
        progress.done(f"engine: skipped: {why_not}")
        return {}, {"status": "skipped", "reason": why_not}
    mc = model.config
    profile = EngineProfile(config.batch, mc.seq_len, mc.hidden_size, mc.updates_per_step)
    request = EngineBuild(tuple(p for p in config.precisions if PRECISIONS[p].engine), profile,
                          config.workspace_mib, gpu, trt_version, config.dla_core)
    try:
        return build(stage, request, progress), request.built()
    except EngineBuildError as e:
        raise ExportError(str(e)) from None
