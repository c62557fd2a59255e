"""TensorRT side of `eqr export`: engine naming (Jetson tags), sidecar refusal, skip messages,
the Polygraphy loader chain, DLA options. Building an engine needs TensorRT and a CUDA GPU
(marked `gpu`, skipped otherwise); the rest runs on CPU, Polygraphy's loaders replaced by
recorders where TensorRT itself would be needed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eqr.contract.artifact import engine_file
from eqr.contract.errors import EqRError
from eqr.contract.trt_engine import gpu_tag
from eqr.export import tensorrt as trt_export
from eqr.export.tensorrt import EngineProfile, GpuInfo, check_engine, sidecar, sidecar_path

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
ORIN = GpuInfo("Orin", "8.7")
ORIN_NANO = GpuInfo("Orin", "8.7", sm_count=8, integrated=True)
AGX_ORIN = GpuInfo("Orin", "8.7", sm_count=16, integrated=True)


def test_engine_names_say_precision_gpu_and_tensorrt_version() -> None:
    assert gpu_tag(H100.name, H100.compute_capability) == "h100-80gb-hbm3-sm90"
    assert gpu_tag("NVIDIA GeForce RTX 4090", "8.9") == "rtx-4090-sm89"
    assert ORIN.tag == "orin-sm87"
    assert engine_file("fp16", H100.tag, "10.16.0") == "model.step.fp16.h100-80gb-hbm3-sm90.trt10.16.0.engine"
    assert engine_file("int8", AGX_ORIN.tag, "10.3.0", dla_core=1) == "model.step.int8.orin-16sm-sm87.dla1.trt10.3.0.engine"


def test_jetson_modules_of_one_name_are_told_apart_by_sm_count(tmp_path: Path) -> None:
    assert ORIN_NANO.tag == "orin-8sm-sm87" and AGX_ORIN.tag == "orin-16sm-sm87"
    assert GpuInfo("NVIDIA H100 80GB HBM3", "9.0", sm_count=132).tag == H100.tag  # discrete GPUs: the name says it
    with pytest.raises(EqRError, match="built for GPU orin-16sm-sm87, CUDA device 0 is orin-8sm-sm87"):
        check_engine(_engine(tmp_path, AGX_ORIN), trt_version="10.16.0", gpu=ORIN_NANO)
    meta = json.loads(sidecar_path(_engine(tmp_path, AGX_ORIN)).read_text())
    assert meta["gpu"] == {"name": "Orin", "compute_capability": "8.7", "sm_count": 16, "integrated": True,
                           "tag": "orin-16sm-sm87"}


def test_profile_shapes_cover_every_input() -> None:
    shapes = EngineProfile((1, 8, 32), seq_len=81, hidden=512).shapes()
    assert shapes["tokens"] == ((1, 81), (8, 81), (32, 81))
    assert shapes["z_H"] == shapes["z_L"] == ((1, 81, 512), (8, 81, 512), (32, 81, 512))
    assert shapes["done"] == ((1,), (8,), (32,))


def _engine(tmp_path: Path, gpu: GpuInfo = H100, version: str = "10.16.0") -> Path:
    onnx_file = tmp_path / "model.step.fp16.onnx"
    onnx_file.write_bytes(b"graph")
    engine = tmp_path / engine_file("fp16", gpu.tag, version)
    engine.write_bytes(b"plan")  # the plan as TensorRT wrote it: no header
    from eqr.contract.io import sha256_file
    meta = sidecar("fp16", gpu, version, onnx_file.name, sha256_file(onnx_file), EngineProfile((1, 4, 8), 81, 64), 256)
    sidecar_path(engine).write_text(json.dumps(meta))
    return engine


def test_check_engine_accepts_the_machine_it_was_built_on(tmp_path: Path) -> None:
    meta = check_engine(_engine(tmp_path), trt_version="10.16.0", gpu=H100)
    assert meta["precision"] == "fp16" and meta["batch"] == {"min": 1, "opt": 4, "max": 8}


@pytest.mark.parametrize("case, message", [
    ("version", "built with TensorRT 10.16.0, this machine has 11.1.0"),
    ("gpu", "built for GPU h100-80gb-hbm3-sm90, CUDA device 0 is orin-sm87"),
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
    assert "rebuild it on this machine: eqr engine" in str(info.value) and "\n" not in str(info.value)


def test_engine_support_says_why_not(monkeypatch) -> None:
    monkeypatch.setattr(trt_export, "tensorrt_version", lambda: None)
    gpu, version, why = trt_export.engine_support()
    assert version is None and why.startswith("tensorrt is not installed") and "eqr[tensorrt]" in why
    monkeypatch.setattr(trt_export, "tensorrt_version", lambda: "10.16.0")
    monkeypatch.setattr(trt_export, "cuda_gpu", lambda device=0: None)
    assert trt_export.engine_support() == (None, "10.16.0", "no CUDA device 0 found (tensorrt 10.16.0 is installed)")
    for old in ("9.3.0", "8.6.1", "10.0.1"):  # strongly typed engines and the runtime's APIs need 10.1+
        monkeypatch.setattr(trt_export, "tensorrt_version", lambda old=old: old)
        assert f"tensorrt {old} is too old" in trt_export.engine_support()[2]


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
    from eqr.model.network import EqRModel

    model = EqRModel(tiny_config(), seed=0).eval()
    config = ExportConfig(precision=("fp16", "int8"), engine="always", batch=(1, 4, 8), check_batch=2, check_steps=4)
    manifest = export_model(model, tmp_path / "out", config, calibrate=int8_calibration(model, config))
    assert set(manifest["engines"]) == {"fp32", "fp16", "int8"}
    for entry in manifest["engines"].values():
        engine = load_engine(tmp_path / "out" / entry["engine"])
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        assert {"tokens", "z_H", "z_L", "preds", "residual"} <= names


def test_build_plans_are_strongly_typed_and_dla_is_fp16_int8_with_gpu_fallback() -> None:
    from eqr.export.tensorrt import build_plan

    for major in (10, 11):
        for precision in ("fp32", "fp16", "int8"):
            plan = build_plan(precision, major)
            assert plan.strongly_typed and plan.config == {"tf32": False} and plan.dla_core is None
    assert build_plan("fp32", 10, dla_core=0).dla_core is None  # the FP32 engine stays on the GPU
    ten = build_plan("int8", 10, dla_core=1)  # TensorRT 10 DLA: weakly typed, precision flags
    assert not ten.strongly_typed and ten.dla_core == 1
    assert ten.config == {"tf32": False, "fp16": True, "int8": True, "use_dla": True, "allow_gpu_fallback": True}
    eleven = build_plan("fp16", 11, dla_core=0)  # 11 removed the flags: the typed graph decides
    assert eleven.strongly_typed and eleven.config == {"tf32": False, "use_dla": True, "allow_gpu_fallback": True}


@pytest.mark.parametrize("kwargs, message", [
    ({"batch": (1, 8, 32)}, r"static shapes; give one batch size \(--batch 8\)"),
    ({"precision": ("fp32",)}, "fp16 and int8 engines only"),
    ({"dla_core": -1}, "DLA core index >= 0"),
    ({"engine": "never"}, "cannot go with --engine never"),
])
def test_dla_requests_are_checked_before_any_work(kwargs, message) -> None:
    from eqr.export import ExportConfig

    base = {"precision": ("int8",), "batch": (16, 16, 16), "dla_core": 0}
    with pytest.raises(EqRError, match=message):
        ExportConfig(**(base | kwargs))
    assert ExportConfig(**base).dla_core == 0


def test_export_cli_refuses_a_dynamic_dla_batch_in_one_line() -> None:
    from click.testing import CliRunner

    from eqr.commands import cli

    result = CliRunner().invoke(cli, ["export", "paper-sudoku", "--precision", "fp16", "--dla-core", "0",
                                      "--batch", "1:8:16", "--out", "unused"])
    assert result.exit_code == 2 and "--dla-core: DLA needs static shapes" in result.output


class _Recorder:
    """Stands in for one Polygraphy loader: records its arguments, returns a marker."""

    calls: dict[str, tuple] = {}

    def __init__(self, name: str, result=None):
        self.name, self.result = name, result

    def __call__(self, *args, **kwargs):
        _Recorder.calls[self.name] = (args, kwargs)
        if self.name == "EngineBytesFromNetwork":
            return lambda: b"plan"
        return (self.name, args, kwargs)


def _fake_polygraphy(monkeypatch):
    import sys
    from types import ModuleType, SimpleNamespace

    fake_trt = SimpleNamespace(__version__="10.3.0", MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    loaders = ModuleType("polygraphy.backend.trt")
    for name in ("CreateConfig", "EngineBytesFromNetwork", "NetworkFromOnnxBytes", "PostprocessConfig"):
        setattr(loaders, name, _Recorder(name))

    class Profile(dict):
        def add(self, name, lo, opt, hi):
            self[name] = (lo, opt, hi)
            return self

    loaders.Profile = Profile
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", loaders)
    monkeypatch.setattr(trt_export, "trt_logger", lambda: None)
    _Recorder.calls = {}


def test_engines_are_built_through_polygraphys_loaders(monkeypatch, tmp_path: Path) -> None:
    from eqr.export.tensorrt import EngineFromOnnx

    _fake_polygraphy(monkeypatch)
    cache = tmp_path / "timing.cache"
    plan = EngineFromOnnx(b"onnx", "fp16", EngineProfile((1, 4, 8), 81, 64), 256, cache)()
    assert plan == b"plan"
    calls = _Recorder.calls
    assert calls["NetworkFromOnnxBytes"] == ((b"onnx",), {"strongly_typed": True})
    config = calls["CreateConfig"][1]
    assert config["tf32"] is False and config["memory_pool_limits"] == {"workspace": 256 << 20}
    assert config["load_timing_cache"] is None  # no cache file yet: nothing to load, one to write
    (profile,) = config["profiles"]
    assert profile["z_H"] == ((1, 81, 64), (4, 81, 64), (8, 81, 64)) and profile["done"] == ((1,), (4,), (8,))
    assert calls["EngineBytesFromNetwork"][1]["save_timing_cache"] == str(cache)
    network, config_loader = calls["EngineBytesFromNetwork"][0][0], calls["EngineBytesFromNetwork"][1]["config"]
    assert network[0] == "NetworkFromOnnxBytes" and config_loader[0] == "PostprocessConfig"
    cache.write_bytes(b"cached")
    EngineFromOnnx(b"onnx", "int8", EngineProfile((8, 8, 8), 81, 64), 256, cache, dla_core=1)()
    assert _Recorder.calls["CreateConfig"][1]["load_timing_cache"] == str(cache)
    assert _Recorder.calls["CreateConfig"][1]["use_dla"] is True
    assert _Recorder.calls["NetworkFromOnnxBytes"][1] == {"strongly_typed": False}  # TensorRT 10 DLA


class _Config:
    def __init__(self, cache, accept=True):
        self.cache, self.accept, self.DLA_core = cache, accept, 0

    def get_timing_cache(self):
        return self.cache

    def create_timing_cache(self, data):
        return ("cache", data)

    def set_timing_cache(self, cache, ignore_mismatch):
        if self.accept:
            self.cache = cache
        return self.accept


def test_finish_config_replaces_a_refused_timing_cache_and_sets_the_dla_core() -> None:
    from types import SimpleNamespace

    from eqr.export.tensorrt import finish_config

    config = _Config(cache=None)  # the file's cache was refused by CreateConfig's set_timing_cache
    finish_config(None, SimpleNamespace(num_DLA_cores=2), config, dla_core=1)
    assert config.cache == ("cache", b"") and config.DLA_core == 1
    with pytest.raises(trt_export.EngineBuildError, match="refused an empty timing cache"):
        finish_config(None, SimpleNamespace(num_DLA_cores=0), _Config(cache=None, accept=False), None)
    with pytest.raises(EqRError, match=r"--dla-core 2: this device has 2 DLA core\(s\) \(0..1\)"):
        finish_config(None, SimpleNamespace(num_DLA_cores=2), _Config(cache="ok"), 2)
