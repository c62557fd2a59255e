"""The CPU INT8 graph (precision int8-cpu): integer kernels on ONNX Runtime's CPU provider, built
whenever int8 is and picked for int8 there."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from eqr.calibration.calibrate import DEFAULT_CALIBRATED, run_calibrate
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
    """The bundled maze-small model exported with `--precision int8`: both INT8 graphs, from the same
    recorded states."""
    out = tmp_path_factory.mktemp("int8cpu") / "maze"
    model = load_model("maze-small")
    config = ExportConfig(precision=("int8",), engine="never", **FAST)
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


def test_naming_int8_builds_its_cpu_variant_too() -> None:
    assert ExportConfig(precision=("int8",)).precisions == ("fp32", "int8", "int8-cpu")
    assert ExportConfig(precision=("fp16",)).precisions == ("fp32", "fp16")
    assert ExportConfig(precision=("int8-cpu",)).precisions == ("fp32", "int8-cpu")  # alone, when named alone
    assert DEFAULT_CALIBRATED == ("fp16", "int8", "int8-cpu")


def test_calibrate_builds_both_int8_graphs_from_the_same_states(tmp_path: Path) -> None:
    """A tiny model, int8 named (calibrate's progress: tests/test_calibrate_progress.py)."""
    from tests.conftest import contracting_model
    from eqr.model.checkpoint import save_checkpoint

    model = contracting_model()
    save_checkpoint(tmp_path / "tiny.pt", model.config, model.state_dict(),
                    metadata={"task": {"name": "sudoku", "size": 4}})
    export_model(load_model(tmp_path / "tiny.pt"), tmp_path / "export", ExportConfig(engine="never", **FAST))
    cfg = CalibConfig(puzzles=2, starts=1, depths=(0, 1, 2), rule_puzzles=16, rule_steps=4,
                      precisions=("int8",))
    entries, _ = run_calibrate(str(tmp_path / "export"), None, cfg, Progress(quiet=True))
    assert {"int8", "int8-cpu"} <= set(entries)
    assert entries["int8-cpu"]["integer_ops"]["integer"] > 0
    manifest = read_manifest(tmp_path / "export")
    assert manifest["precisions"]["int8-cpu"]["calibration_states"] == manifest["precisions"]["int8"]["calibration_states"]
