"""The CPU INT8 graph (precision int8-cpu): integer kernels on ONNX Runtime's CPU provider, picked
for int8 there; and the calibrate progress that estimates the stopping-rule fit (issue 24)."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import onnx
import pytest

from eqr.calibration.calibrate import rule_fit_note, run_calibrate
from eqr.calibration.config import CalibConfig
from eqr.calibration.record import int8_calibration
from eqr.contract.artifact import PRECISIONS, cpu_precision, read_manifest
from eqr.contract.progress import Progress
from eqr.export import ExportConfig
from eqr.export.exporter import export_model
from eqr.export.int8 import activation_matmuls, weight_matmuls_on_integer_kernels
from eqr.model.load import load_model
from eqr.runtime import Solver
from eqr.runtime.resolve import load_artifact

FAST = dict(check_batch=2, check_steps=4)


@pytest.fixture(scope="module")
def maze_export(tmp_path_factory) -> Path:
    """The bundled maze-small model exported with both INT8 graphs from the same recorded states."""
    out = tmp_path_factory.mktemp("int8cpu") / "maze"
    model = load_model("maze-small")
    config = ExportConfig(precision=("int8", "int8-cpu"), engine="never", **FAST)
    export_model(model, out, config, calibrate=int8_calibration(model, config))
    return out


def _weight_products(path: Path) -> int:
    """MatMul/Gemm nodes of the FP32 graph with a constant B (what INT8 quantizes)."""
    graph = onnx.load(str(path))
    products = [n for n in graph.graph.node if n.op_type in ("MatMul", "Gemm")]
    return len(products) - len(activation_matmuls(path))


def test_every_weight_product_of_the_cpu_graph_runs_on_integer_kernels(maze_export: Path) -> None:
    fp32 = maze_export / PRECISIONS["fp32"].onnx
    weights, attention = _weight_products(fp32), len(activation_matmuls(fp32))
    cpu = weight_matmuls_on_integer_kernels(maze_export / PRECISIONS["int8-cpu"].onnx)
    assert weights > 0
    assert cpu["integer"] == weights  # MatMulIntegerToFloat / QGemm in the optimized graph
    assert cpu["float"] == attention  # only activation x activation products stay float
    assert cpu["cast"] <= weight_matmuls_on_integer_kernels(fp32)["cast"]  # FP32 outside the Q/DQ pairs
    tensorrt = weight_matmuls_on_integer_kernels(maze_export / PRECISIONS["int8"].onnx)
    assert tensorrt["integer"] < weights and tensorrt["cast"] > cpu["cast"]  # why the CPU needs its own graph
    entry = read_manifest(maze_export)["precisions"]["int8-cpu"]
    assert entry["onnx"] == "model.step.int8.cpu.onnx" and "uint8 activations" in entry["scheme"]


def test_the_cpu_provider_runs_int8_on_the_cpu_graph(maze_export: Path, tmp_path: Path) -> None:
    artifact = load_artifact(maze_export)
    assert cpu_precision(artifact, "int8") == "int8-cpu" and cpu_precision(artifact, "fp32") == "fp32"
    solver = Solver.load(maze_export, backend="onnxruntime", precision="int8")
    assert solver.backend.precision == "int8-cpu" and solver.precision == "int8-cpu"
    assert solver.backend.onnx_path.name == "model.step.int8.cpu.onnx"
    assert solver.default_tol == artifact.default_tol("int8-cpu")
    # without the CPU graph, int8 keeps TensorRT's graph
    (tmp_path / "int8.onnx").write_bytes((maze_export / "model.step.int8.onnx").read_bytes())
    alone = load_artifact(tmp_path / "int8.onnx")
    assert cpu_precision(alone, "int8") == "int8"


def test_calibrate_builds_both_int8_graphs_and_notes_a_long_rule_fit(tmp_path: Path, caplog) -> None:
    """A tiny model; the clock is injected so the estimate of the rule fit reads long."""
    from tests.conftest import contracting_model
    from eqr.model.checkpoint import save_checkpoint

    model = contracting_model()
    save_checkpoint(tmp_path / "tiny.pt", model.config, model.state_dict(),
                    metadata={"task": {"name": "sudoku", "size": 4}})
    export_model(load_model(tmp_path / "tiny.pt"), tmp_path / "export", ExportConfig(engine="never", **FAST))
    ticks = iter(range(0, 10**9, 60))  # every clock read: a minute later
    stream = io.StringIO()
    progress = Progress(stream=stream, clock=lambda: float(next(ticks)), every_s=1e9)
    cfg = CalibConfig(puzzles=2, starts=1, depths=(0, 1, 2), rule_puzzles=256, rule_steps=4,
                      precisions=("int8", "int8-cpu"))
    entries, _ = run_calibrate(str(tmp_path / "export"), None, cfg, progress)
    assert {"int8", "int8-cpu"} <= set(entries)
    assert entries["int8-cpu"]["integer_ops"]["integer"] > 0
    manifest = read_manifest(tmp_path / "export")
    assert manifest["precisions"]["int8-cpu"]["calibration_states"] == manifest["precisions"]["int8"]["calibration_states"]
    notes = [line for line in stream.getvalue().splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--rule-puzzles 64" in notes[0] and "(now 256)" in notes[0]
    with caplog.at_level(logging.INFO, logger="eqr.progress"):  # -q: the same note, logged
        quiet = Progress(quiet=True, clock=lambda: float(next(ticks)), every_s=30)
        with quiet.bar("fitting", 100, long_note=lambda eta: rule_fit_note(eta, 128)) as advance:
            for _ in range(3):
                advance(1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "--rule-puzzles 32" in warned[0]
    assert any("ETA" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_short_estimate_gives_no_note() -> None:
    ticks = iter(range(0, 10**6))  # a second per read: 3 units of 100 take ~100 s, under 2 minutes
    stream = io.StringIO()
    with Progress(stream=stream, clock=lambda: float(next(ticks))).bar(
            "fitting", 100, long_note=lambda eta: rule_fit_note(eta, 128)) as advance:
        for _ in range(100):
            advance(1)
    assert "note:" not in stream.getvalue() and "fitting: 100/100" in stream.getvalue()
    assert "--rule-puzzles" not in rule_fit_note(300.0, 32)  # nothing smaller to offer
