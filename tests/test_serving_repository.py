"""The serving pieces that need no server: the request rules, the repository writer, the CLIs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from eqr.commands import cli
from eqr.contract.errors import EqRError
from eqr.serving import server as server_module
from eqr.serving.protocol import parse_request
from eqr.tasks import get_task

TASK = get_task("sudoku", 4)
GOOD = "2..1.........42."


def job(**inputs):
    return parse_request({k: None if v is None else np.asarray(v) for k, v in inputs.items()}, TASK, 6)


def test_request_rules():
    parsed = job(puzzle=np.array([GOOD.encode(), b"nope"], np.object_), seed=np.array([7], np.int64),
                 stream=np.array([True]))
    assert parsed.puzzles == 2 and parsed.good.tolist() == [0] and parsed.seed == 7 and parsed.stream
    assert parsed.errors[0] == "" and parsed.errors[1].startswith("puzzle 1: ")
    tokens = job(tokens=np.array([[1] * 16, [7] * 16], np.int32))
    assert tokens.good.tolist() == [0] and "0..5" in tokens.errors[1]
    for inputs, why in (({}, "exactly one of"), ({"puzzle": [GOOD], "tokens": [[1] * 16]}, "exactly one of"),
                        ({"puzzle": [GOOD], "breadth": np.array([0], np.int32)}, "breadth must be >= 1"),
                        ({"puzzle": [GOOD], "seed": np.array([1.5])}, "dtype"),
                        ({"tokens": np.ones((1, 5), np.int32)}, r"\[P, 16\]"),
                        ({"puzzle": [GOOD], "max_steps": np.array([1, 2], np.int32)}, "exactly one value"),
                        ({"puzzle": [GOOD], "extra": [1]}, "unknown input")):
        with pytest.raises(EqRError, match=why):
            job(**inputs)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "sudoku"
    subprocess.run([sys.executable, "-m", "eqr", "export", "sudoku-small", "--out", str(out)], check=True,
                   capture_output=True)
    return out


def test_eqr_triton_writes_a_self_contained_repository_and_never_overwrites_without_force(export_dir, tmp_path):
    runner = CliRunner()
    args = ["triton", str(export_dir), "--out", str(tmp_path / "models"), "--batch", "32", "--breadth", "2",
            "--instances", "2", "--precision", "FP32"]
    assert runner.invoke(cli, args).exit_code == 0
    model = tmp_path / "models" / "eqr"
    config = (model / "config.pbtxt").read_text()
    for line in ('backend: "python"', "max_batch_size: 0", "decoupled: true", "count: 2 kind: KIND_CPU",
                 'name: "tokens" data_type: TYPE_INT32 dims: [ -1, 16 ]', 'key: "batch" value: { string_value: "32" }'):
        assert line in config
    assert (model / "1" / "model.py").is_file() and (model / "1" / "export" / "manifest.json").is_file()
    again = runner.invoke(cli, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(cli, [*args, "--force"]).exit_code == 0
    bad = runner.invoke(cli, ["triton", str(export_dir), "--out", str(tmp_path / "m2"), "--precision", "int8"])
    assert bad.exit_code == 2 and "no int8 step" in bad.output and "Traceback" not in bad.output
    wide = runner.invoke(cli, ["triton", str(export_dir), "--out", str(tmp_path / "m3"), "--breadth", "9", "--batch", "8"])
    assert wide.exit_code == 2 and "--breadth 9" in wide.output


def test_a_missing_tritonserver_is_one_line_naming_the_serve_extra(export_dir, monkeypatch):
    monkeypatch.setattr(server_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(server_module.importlib.util, "find_spec", lambda name: None)
    result = CliRunner().invoke(cli, ["serve", str(export_dir)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {server_module.MISSING}"] and "serve extra" in result.output


def test_the_model_reads_back_the_parameters_the_repository_writes() -> None:
    from eqr.serving.repository import ServeConfig

    written = ServeConfig(name="m", backend="onnxruntime", precision="int8", batch=8, breadth=2, max_steps=12,
                          max_queue=7, stream_every=3, threads=2)
    assert ServeConfig.from_parameters(written.parameters(), "m") == written
    assert ServeConfig.from_parameters(ServeConfig().parameters(), "eqr") == ServeConfig()  # "" keeps None and 0
    assert ServeConfig.from_parameters({"seed": "3"}, "eqr") == ServeConfig()  # not a ServeConfig parameter


def test_the_served_model_runs_progressive_breadth_when_given_agree(export_dir, tmp_path, monkeypatch):
    """`eqr triton --agree 2` -> config.pbtxt -> model.py's Scheduler stops puzzles after one wave."""
    import importlib.util
    import json
    import re
    import types

    class Family:
        COUNTER = GAUGE = "kind"

        def __init__(self, **_):
            pass

        def Metric(self, labels):  # noqa: N802 (Triton's name)
            return types.SimpleNamespace(increment=lambda n: None, set=lambda v: None)

    fake = types.ModuleType("triton_python_backend_utils")
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL, fake.MetricFamily = 1, Family
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    args = ["triton", str(export_dir), "--out", str(tmp_path / "models"), "--batch", "8", "--breadth", "8",
            "--agree", "2", "--backend", "onnxruntime", "--threads", "1"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    version = tmp_path / "models" / "eqr" / "1"
    pbtxt = (version.parent / "config.pbtxt").read_text()
    params = {k: {"string_value": v} for k, v in re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', pbtxt)}
    assert params["agree"] == {"string_value": "2"}
    spec = importlib.util.spec_from_file_location("served_model", version / "model.py")
    served = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(served)
    model = served.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"parameters": params}), "model_name": "eqr"})
    try:
        assert model.scheduler.cfg.agree == 2
        result = model.scheduler.submit(TASK.parse([GOOD])).result(timeout=60)
    finally:
        model.finalize()
    assert result.stats.launched.sum() == 2 and result.agreement[0] == 1.0  # the first wave agreed
