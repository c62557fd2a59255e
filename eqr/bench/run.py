"""Running a bench: the model, its export, the runtime's stopping rule, then the measurements."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from eqr.bench.config import DEFAULT_MODELS, FALLBACK_MODEL, SIDE_BY_SIDE, BenchConfig
from eqr.bench.result import Measurement
from eqr.bench.setting import Setting, mixed_puzzles, model_task
from eqr.bench.table import MEASURE
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress


def export_for_bench(model: Any, out_dir: Path, precisions: tuple[str, ...], paper: bool,
                     noise: bool = False) -> list[str]:
    """Export fp32 (+ fp16, int8 where they pass the export checks; `noise`: the noisy graphs too)
    into out_dir; -> notes on skips."""
    from eqr.calibration.record import int8_calibration
    from eqr.export import ExportConfig, export_model
    from eqr.export.exporter import ExportError

    checks = {"check_batch": 1, "check_steps": 2} if paper else {"check_batch": 2, "check_steps": 8}
    checks["noise"] = noise
    wanted = tuple(p for p in precisions if p != "fp32")
    try:
        config = ExportConfig(precision=("fp32", *wanted), engine="never", force=True, **checks)
        export_model(model, out_dir, config, calibrate=int8_calibration(model, config))
        return []
    except ExportError as e:
        if not wanted:
            raise
        notes = [f"export of {', '.join(wanted)} failed its checks ({e}); fp32 only"]
    export_model(model, out_dir, ExportConfig(precision=("fp32",), engine="never", force=True, **checks))
    return notes


def check_export_matches(export_dir: Path, model: Any, name: str) -> None:
    """--export-dir must hold this model's architecture (weights are the user's word)."""
    from eqr.runtime.resolve import load_artifact

    artifact = load_artifact(export_dir)
    if artifact.kind != "export" or artifact.config != model.config:
        raise EqRError(f"--export-dir {export_dir}: not an export of {name}'s architecture; "
                       f"export it with `eqr export {name} --out DIR` or drop --export-dir")


def default_model() -> str:
    """The first bundled model of DEFAULT_MODELS (difficulty varies), else any bundled one, else the preset."""
    from eqr.contract.bundled import bundled_names

    names = bundled_names()
    preferred = [name for name in DEFAULT_MODELS if name in names]
    return (preferred or names or [FALLBACK_MODEL])[0]


def bench_rule(setting: Setting, info: dict[str, Any]) -> dict[str, Any]:
    """The runtime's stopping rule: the export's calibrated FP32 rule, else one fitted here on
    `rule_puzzles` labelled puzzles drawn like the bench set (as `eqr calibrate` does, at the bench's
    breadth), then the rule flags on top."""
    from eqr.calibration.config import CalibConfig
    from eqr.calibration.stopping import fit_and_evaluate, record_trajectories
    from eqr.runtime import Solver
    from eqr.runtime.resolve import load_artifact

    c = setting.config
    overrides = c.rule_overrides()
    if c.paper:  # random weights: nothing to calibrate; the protocol's depth is the cap
        info["rule"] = {"source": "--paper: random weights, nothing to fit"}
        return {"max_steps": c.depth} | overrides
    calibrated = load_artifact(setting.export_dir).stopping.get("fp32") if setting.export_dir else None
    if calibrated:
        info["rule"] = {"source": "the export's manifest (eqr calibrate)", "rule": calibrated}
        return calibrated | overrides
    steps = CalibConfig.rule_steps
    setting.report.stage(f"stopping rule: fit on {c.rule_puzzles} labelled puzzles x K {c.breadth}, {steps} recorded "
                         "fp32 steps each (the export has no calibrated rule)")
    puzzles = mixed_puzzles(setting.task, c.rule_puzzles, c.seed + 200)
    if setting.export_dir is None:  # --backend torch, nothing exported: the model itself on --device
        fitting = Solver.from_model(setting.model, device=c.device)
    else:
        fitting = Solver.load(setting.export_dir, backend="onnxruntime", threads=c.threads)
    rows = len(puzzles.inputs) * c.breadth * steps  # the bar counts recorded row-steps, as calibrate's
    with fitting as solver, setting.report.bar("recording the rule fit's trajectories", rows) as advance:
        traj = record_trajectories(solver, puzzles.inputs, steps, c.seed, advance, breadth=c.breadth)
    fitted = fit_and_evaluate(traj, puzzles.labels, CalibConfig.rule_margin)
    info["rule"] = {"source": f"fitted here ({c.rule_puzzles} puzzles x K {c.breadth}, margin "
                              f"{CalibConfig.rule_margin})",
                    "rule": fitted["rule"], "heldout": fitted["heldout"]}
    return fitted["rule"] | overrides


def run_bench(config: BenchConfig, reporter: Progress | None = None) -> tuple[list[Measurement], dict[str, Any]]:
    """Run the selected measurements -> (measurements, run description)."""
    from eqr.export.exporter import fp32_model
    from eqr.model.load import load_model

    unknown = sorted(set(config.measurements) - set(MEASURE))
    if unknown:
        raise EqRError(f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASURE)}")
    reporter = reporter or Progress()
    torch.set_num_threads(config.threads)
    # Both sides compute in float32: a bf16-configured checkpoint would make torch CPU ~6x slower
    # (docs/performance.md) and flatter the runtime, whose exported step is float32.
    model = fp32_model(load_model(config.model))
    task = model_task(model)
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": config.model,
            "task": repr(task), "parameters": model.num_parameters(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__, "config": dataclasses.asdict(config), "notes": []}
    if config.backend == "torch":
        from eqr.runtime.backends.torch_backend import resolve_device

        device = resolve_device(config.device)  # one line when CUDA is asked for but absent
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
            model = model.to(device)  # the reference and the runtime side share it
    with contextlib.ExitStack() as stack:
        export_dir: Path | None
        if config.export_dir:
            export_dir = Path(config.export_dir)
            check_export_matches(export_dir, model, config.model)
        elif config.backend == "torch" and set(config.measurements) <= set(SIDE_BY_SIDE):
            export_dir = None  # the torch runtime runs the model itself: nothing to export
            reporter.stage(f"--backend torch on {info['device']}: {config.model} runs as it is (no ONNX export)")
        else:
            export_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eqr-bench-"))) / "export"
            reporter.stage(f"export {config.model} to ONNX ({', '.join(config.precisions)}) in {export_dir}")
            started = time.perf_counter()
            info["notes"] += export_for_bench(model, export_dir, config.precisions, config.paper, config.noise > 0)
            info["export_s"] = round(time.perf_counter() - started, 1)
        setting = Setting(config, model, task, export_dir, reporter)
        setting.rule = bench_rule(setting, info)
        measurements = []
        for name in config.measurements:
            reporter.stage(f"== {name}")
            measurements.append(MEASURE[name](setting))
    info["wall_s"] = round(time.perf_counter() - reporter.started, 1)
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return measurements, info
