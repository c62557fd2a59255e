"""`eqr engine`: engines for an existing export, built with TensorRT and Polygraphy only.

TensorRT is `fake_cuda`'s build-path stand-in and Polygraphy's TensorRT loaders are replaced by
`fake_cuda.fake_loaders` (the real Polygraphy is imported, so its logger is the real one); the
plan they "build" is the ONNX graph, which fake_cuda's TensorRT runtime runs. What is checked is
eqr's side: which graphs are built with which profile, the files, sidecars and manifest entries
(the same function as `eqr export --engine`), --force, the missing-TensorRT line, no torch or ONNX
Runtime imported, and stdout holding nothing but the JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_cuda import fake_engine_builds
from runtime_helpers import contractive_model
from test_torch_free import NO_TORCH

from eqr.commands import cli
from eqr.contract.artifact import read_manifest
from eqr.contract.io import sha256_file
from eqr.contract.progress import Progress
from eqr.export import ExportConfig, export_model
from eqr.export import tensorrt as trt_export
from eqr.export.engines import EngineConfig, add_engines
from eqr.export.tensorrt import GpuInfo, check_engine

ORIN = GpuInfo("Orin", "8.7", sm_count=8, integrated=True)
ENTRY_KEYS = {"engine", "precision", "sidecar", "tensorrt", "gpu", "dla_core", "build_seconds"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "tiny-eqr"
    export_model(contractive_model(), out, ExportConfig(precision=("fp16",), engine="never", batch=(1, 4, 8),
                                                        check_batch=2, check_steps=4))
    return out


@pytest.fixture
def export_dir(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "tiny-eqr"))


@pytest.fixture
def fake_build(monkeypatch, tmp_path) -> list[dict]:
    """TensorRT 10.3 on an Orin Nano, Polygraphy's loaders faked -> the builds they ran."""
    return fake_engine_builds(monkeypatch, tmp_path / "cache", ORIN)


def engine(args: list[str]):
    return CliRunner().invoke(cli, ["engine", *args])


def test_engines_are_built_sidecarred_and_recorded_as_export_records_them(export_dir, fake_build, capfd):
    result = engine([str(export_dir), "--json", "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)  # stdout is the JSON alone, warnings or not
    assert manifest == read_manifest(export_dir)
    assert set(manifest["engines"]) == {"fp32", "fp16"}  # every graph of the export by default
    assert manifest["engine_build"] == {"status": "built", "reason": "", "tensorrt": "10.3.0", "gpu": ORIN.tag}
    for precision, entry in manifest["engines"].items():
        assert set(entry) == ENTRY_KEYS and entry["precision"] == precision and entry["dla_core"] is None
        assert entry["engine"] == f"model.step.{precision}.orin-8sm-sm87.trt10.3.0.engine"
        graph = export_dir / manifest["precisions"][precision]["onnx"]
        assert (export_dir / entry["engine"]).read_bytes() == graph.read_bytes()  # the fake's plan
        meta = check_engine(export_dir / entry["engine"], trt_version="10.3.0", gpu=ORIN)
        assert meta["onnx_sha256"] == sha256_file(graph) and meta["batch"] == {"min": 1, "opt": 4, "max": 8}
        assert (export_dir / entry["sidecar"]).is_file()
    assert fake_build[0]["config"]["profiles"][0]["z_H"] == ((1, 16, 16), (4, 16, 16), (8, 16, 16))
    assert fake_build[0]["save_timing_cache"].endswith(f"timing.{ORIN.tag}.trt10.3.0.cache")
    assert "warning" not in capfd.readouterr().out.lower()


def test_flags_choose_the_graphs_the_profile_the_workspace_and_the_timing_cache(export_dir, fake_build, tmp_path):
    cache = tmp_path / "my.cache"
    result = engine([str(export_dir), "--precision", "fp16", "--batch", "2:4:16", "--workspace-mib", "512",
                     "--timing-cache", str(cache), "-q"])
    assert result.exit_code == 0, result.output
    assert set(read_manifest(export_dir)["engines"]) == {"fp16"} and len(fake_build) == 1
    (build,) = fake_build
    assert build["config"]["memory_pool_limits"] == {"workspace": 512 << 20}
    assert build["config"]["profiles"][0]["tokens"] == ((2, 16), (4, 16), (16, 16))
    assert build["save_timing_cache"] == str(cache)


def test_a_recorded_engine_is_replaced_only_with_force(export_dir, fake_build, monkeypatch):
    assert engine([str(export_dir), "--precision", "fp32", "-q"]).exit_code == 0
    old = read_manifest(export_dir)["engines"]["fp32"]["engine"]
    refused = engine([str(export_dir), "--precision", "fp32"])
    assert refused.exit_code == 2 and len(fake_build) == 1  # refused before any build
    assert "already records engines for fp32 (model.step.fp32.orin-8sm-sm87.trt10.3.0.engine, GPU orin-8sm-sm87, " \
           "TensorRT 10.3.0); pass --force" in refused.output
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "10.3.1")  # JetPack upgraded: rebuild
    assert engine([str(export_dir), "--precision", "fp32", "--force", "-q"]).exit_code == 0
    entry = read_manifest(export_dir)["engines"]["fp32"]
    assert entry["tensorrt"] == "10.3.1" and (export_dir / entry["engine"]).is_file()
    assert not (export_dir / old).exists() and not (export_dir / f"{old}.json").exists()


def test_eqr_export_engine_goes_through_the_same_function(export_dir, fake_build, monkeypatch, tmp_path):
    from eqr.export import exporter

    built = []
    real = trt_export.build_engines
    monkeypatch.setattr(trt_export, "build_engines", lambda *a, **k: built.append(a[1]) or real(*a, **k))
    stage = Path(shutil.copytree(export_dir, tmp_path / "stage"))
    config = ExportConfig(precision=("fp16",), batch=(1, 4, 8), engine="always")
    engines, status = exporter.build_engines(stage, config, ORIN, "10.3.0", "", contractive_model(), Progress(quiet=True))
    assert len(built) == 1
    manifest = add_engines(export_dir, EngineConfig())
    assert status == manifest["engine_build"]
    assert {p: {k: v for k, v in e.items() if k != "build_seconds"} for p, e in engines.items()} == \
        {p: {k: v for k, v in e.items() if k != "build_seconds"} for p, e in manifest["engines"].items()}
    name = engines["fp16"]["engine"]
    assert (stage / name).read_bytes() == (export_dir / name).read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8"], r"no int8 step graph \(model.step.int8.onnx\); it holds fp16, fp32"),
    (["--dla-core", "0"], r"DLA needs static shapes; give one batch size \(--batch 4\)"),
    (["--batch", "8:4:2"], "must satisfy 1 <= MIN <= OPT <= MAX"),
])
def test_bad_requests_are_one_line_before_any_build(export_dir, fake_build, args, message):
    import re

    result = engine([str(export_dir), *args])
    assert result.exit_code == 2 and re.search(message, result.output) and not fake_build
    assert len(result.output.strip().splitlines()) == 1


def test_without_tensorrt_one_line_names_the_extra(export_dir, monkeypatch):
    monkeypatch.setattr(trt_export, "tensorrt_version", lambda: None)
    result = engine([str(export_dir)])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: eqr engine needs tensorrt, which is not installed: pip install 'eqr[tensorrt]'")
    assert "JetPack's tensorrt" in line


def test_without_polygraphy_one_line_names_the_extra(export_dir, fake_build, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "polygraphy" else
                        find_spec(name, *a))
    result = engine([str(export_dir)])
    assert result.exit_code == 2 and "needs polygraphy" in result.output and "eqr[tensorrt]" in result.output


def test_eqr_engine_imports_neither_torch_nor_onnxruntime(export_dir, tmp_path):
    """In a Python where torch and onnxruntime cannot be imported, as on a Jetson with eqr[tensorrt]."""
    code = NO_TORCH.replace('name == "torch" or name.startswith("torch.")',
                            'name.split(".")[0] in ("torch", "onnxruntime")') + textwrap.dedent("""
        import json, sys
        import polygraphy.backend.trt as loaders
        sys.path.insert(0, sys.argv[2])
        from fake_cuda import builder_tensorrt, fake_loaders
        from eqr.export import tensorrt as trt_export
        from eqr.export.tensorrt import GpuInfo

        sys.modules["tensorrt"] = trt = builder_tensorrt("10.3.0")
        for name, fake in fake_loaders(trt, []).items():
            setattr(loaders, name, fake)
        trt_export.cuda_gpu = lambda device=0: GpuInfo("Orin", "8.7", 8, True)
        sys.argv[1:] = ["engine", sys.argv[1], "--precision", "fp16", "--json"]
        try:
            from eqr.commands import main
            main()
        except SystemExit as e:
            assert not e.code, e.code
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime"))))
    """)
    done = subprocess.run([sys.executable, "-c", code, str(export_dir), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, EQR_CACHE_DIR=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest_text, _, loaded = done.stdout.rpartition("\n[")
    assert json.loads(manifest_text)["engines"]["fp16"]["gpu"] == "orin-8sm-sm87"  # stdout: only the JSON
    assert json.loads("[" + loaded) == []
    assert "TensorRT: a builder warning" not in done.stdout and "an old Polygraphy printing" in done.stderr
