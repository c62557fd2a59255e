"""The native TensorRT backend against ONNX Runtime on the same export. Needs TensorRT and a
CUDA GPU (marked `gpu`; skipped with the reason otherwise). CPU-side pieces of the backend
(registry, unavailability reasons) are covered in test_runtime.py."""
from __future__ import annotations

import pytest

from eqr.export import tensorrt as trt_export
from runtime_helpers import contractive_model, random_puzzles


def _why_no_engines() -> str:
    return trt_export.engine_support()[2]


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_why_no_engines()), reason=_why_no_engines() or "n/a")]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from eqr.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("trt") / "tiny-eqr"
    export_model(contractive_model(), out, ExportConfig(engine="always", batch=(1, 8, 16), check_batch=2, check_steps=4))
    return out


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_tensorrt_matches_onnxruntime_answers(export_dir, cuda_graphs):
    from eqr.runtime import Solver

    puzzles = random_puzzles(20, seed=41)  # more rows than the 8-slot graph batch: slots get refilled
    with Solver.load(export_dir, backend="onnxruntime", threads=1) as ort:
        expected = ort.solve(puzzles, breadth=2, seed=5)
    with Solver.load(export_dir, backend="tensorrt", batch_size=8, cuda_graphs=cuda_graphs) as trt:
        assert trt.backend.static_shapes is cuda_graphs
        result = trt.solve(puzzles, breadth=2, seed=5)
    assert (result.preds == expected.preds).all(axis=1).mean() >= 0.95  # TF32 kernels may flip a rare token
    assert abs(int(result.steps.sum()) - int(expected.steps.sum())) <= 0.1 * expected.steps.sum()
    if cuda_graphs:
        assert (result.stats.batch_size == 8).all()  # static shapes: frozen rows, refilled slots
    else:
        assert result.stats.batch_size.max() <= 16  # the engine profile's max batch caps the working batch


def test_auto_prefers_the_native_engine(export_dir):
    from eqr.runtime import Solver

    with Solver.load(export_dir, backend="auto") as solver:
        assert solver.backend.name == "tensorrt"
        assert solver.solve(random_puzzles(3)).preds.shape == (3, 16)
