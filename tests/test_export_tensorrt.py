"""TensorRT side of `eqr export`: engine naming, sidecar refusal, skip messages. Building an
engine needs TensorRT and a CUDA GPU (marked `gpu`, skipped otherwise); the rest runs on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eqr.errors import EqRError
from eqr.export import tensorrt as trt_export
from eqr.artifact import engine_file
from eqr.export.tensorrt import EngineProfile, GpuInfo, check_engine, gpu_tag, sidecar, sidecar_path

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
ORIN = GpuInfo("Orin", "8.7")


def test_engine_names_say_precision_gpu_and_tensorrt_version() -> None:
    assert gpu_tag(H100.name, H100.compute_capability) == "h100-80gb-hbm3-sm90"
    assert gpu_tag("NVIDIA GeForce RTX 4090", "8.9") == "rtx-4090-sm89"
    assert ORIN.tag == "orin-sm87"
    assert engine_file("fp16", H100.tag, "10.16.0") == "model.step.fp16.h100-80gb-hbm3-sm90.trt10.16.0.engine"


def test_profile_shapes_cover_every_input() -> None:
    shapes = EngineProfile((1, 8, 32), seq_len=81, hidden=512).shapes()
    assert shapes["tokens"] == ((1, 81), (8, 81), (32, 81))
    assert shapes["z_H"] == shapes["z_L"] == ((1, 81, 512), (8, 81, 512), (32, 81, 512))


def _engine(tmp_path: Path, gpu: GpuInfo = H100, version: str = "10.16.0") -> Path:
    onnx_file = tmp_path / "model.step.fp16.onnx"
    onnx_file.write_bytes(b"graph")
    engine = tmp_path / engine_file("fp16", gpu.tag, version)
    engine.write_bytes(b"plan")  # the plan as TensorRT wrote it: no header
    from eqr.io import sha256_file
    meta = sidecar("fp16", gpu, version, onnx_file.name, sha256_file(onnx_file), EngineProfile((1, 4, 8), 81, 64), 256)
    sidecar_path(engine).write_text(json.dumps(meta))
    return engine


def test_check_engine_accepts_the_machine_it_was_built_on(tmp_path: Path) -> None:
    meta = check_engine(_engine(tmp_path), trt_version="10.16.0", gpu=H100)
    assert meta["precision"] == "fp16" and meta["batch"] == {"min": 1, "opt": 4, "max": 8}


@pytest.mark.parametrize("case, message", [
    ("version", "built with TensorRT 10.16.0, this machine has 11.1.0"),
    ("gpu", "built for GPU h100-80gb-hbm3-sm90, this machine has orin-sm87"),
    ("onnx_changed", "changed since the engine was built"),
    ("no_sidecar", "missing or unreadable sidecar"),
])
def test_check_engine_refuses_a_mismatch_with_a_rebuild_hint(tmp_path: Path, case: str, message: str) -> None:
    engine = _engine(tmp_path)
    version, gpu = "10.16.0", H100
    if case == "version":
        version = "11.1.0"
    elif case == "gpu":
        gpu = ORIN
    elif case == "onnx_changed":
        (tmp_path / "model.step.fp16.onnx").write_bytes(b"another graph")
    else:
        sidecar_path(engine).unlink()
    with pytest.raises(EqRError, match=message) as info:
        check_engine(engine, trt_version=version, gpu=gpu)
    assert "rebuild it: eqr export" in str(info.value) and "\n" not in str(info.value)


def test_engine_support_says_why_not(monkeypatch) -> None:
    monkeypatch.setattr(trt_export, "tensorrt_version", lambda: None)
    gpu, version, why = trt_export.engine_support()
    assert version is None and why.startswith("tensorrt is not installed") and "eqr[tensorrt]" in why
    monkeypatch.setattr(trt_export, "tensorrt_version", lambda: "10.16.0")
    monkeypatch.setattr(trt_export, "cuda_gpu", lambda: None)
    assert trt_export.engine_support() == (None, "10.16.0", "no CUDA device found (tensorrt 10.16.0 is installed)")


def test_timing_cache_is_per_gpu_and_version(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EQR_CACHE_DIR", str(tmp_path))
    assert trt_export.timing_cache_path(H100.tag, "10.16.0") == tmp_path / "tensorrt" / "timing.h100-80gb-hbm3-sm90.trt10.16.0.cache"


def _gpu_and_tensorrt() -> str:
    gpu, version, why = trt_export.engine_support()
    return why


@pytest.mark.gpu
@pytest.mark.skipif(bool(_gpu_and_tensorrt()), reason=_gpu_and_tensorrt() or "n/a")
def test_engines_build_for_every_precision_and_load(tmp_path: Path) -> None:
    from conftest import tiny_config
    from eqr.calibration.record import int8_calibration
    from eqr.export import ExportConfig, export_model, load_engine
    from eqr.model import EqRModel

    model = EqRModel(tiny_config(), seed=0).eval()
    config = ExportConfig(precision=("fp16", "int8"), engine="always", batch=(1, 4, 8), check_batch=2, check_steps=4)
    manifest = export_model(model, tmp_path / "out", config, calibrate=int8_calibration(model, config))
    assert set(manifest["engines"]) == {"fp32", "fp16", "int8"}
    for entry in manifest["engines"].values():
        engine = load_engine(tmp_path / "out" / entry["engine"])
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        assert {"tokens", "z_H", "z_L", "preds", "residual"} <= names


def test_network_flags_follow_the_tensorrt_api_generation() -> None:
    from types import SimpleNamespace

    def fake(**members: int) -> SimpleNamespace:
        return SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(**members))

    assert trt_export.network_flags(fake(EXPLICIT_BATCH=0, STRONGLY_TYPED=2)) == 1 << 2  # TRT 10: strongly typed
    assert trt_export.network_flags(fake(EXPLICIT_BATCH=0)) == 1  # TRT 8: explicit batch, builder flags
    assert trt_export.network_flags(fake()) == 0  # a TensorRT without either flag: strongly typed by default
