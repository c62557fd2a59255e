"""The edge runtime needs no torch: in a Python where `import torch` fails, an export loads and
solves through `Solver`, `Scheduler` and `eqr solve` (onnxruntime backend), with the answers
this process gets for the same seed; `eqr calibrate` builds and fits INT8 there (the graph this
process builds, byte for byte) and `eqr report` runs without its torch column; commands that do
need torch say which extra to install. scripts/edge_check.sh does the same in a venv that has no
torch installed at all."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import contractive_model

from eqr.calibration.record import int8_calibration
from eqr.export import ExportConfig, export_model
from eqr.runtime import Solver
from eqr.tasks import get_task

# Makes torch (and everything below it) unimportable, as on an edge image without it.
NO_TORCH = textwrap.dedent("""
    import importlib.abc, os, sys

    BLOCKED = {"torch", *filter(None, os.environ.get("EQR_TEST_BLOCK", "").split(","))}

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoTorch())
""")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    model = contractive_model()
    model.metadata = {"task": {"name": "sudoku", "size": 4}}
    out = tmp_path_factory.mktemp("edge") / "tiny-eqr"
    config = ExportConfig(precision=("int8",), engine="never", check_batch=2, check_steps=6)
    export_model(model, out, config, calibrate=int8_calibration(model, config))
    return out


def run_without_torch(code: str, *args: str, also_blocked: str = "") -> subprocess.CompletedProcess:
    """Run `code` in a Python where torch (and the packages in `also_blocked`, a comma list) cannot be imported."""
    env = dict(os.environ, OMP_NUM_THREADS="1", EQR_TEST_BLOCK=also_blocked)
    return subprocess.run([sys.executable, "-c", NO_TORCH + textwrap.dedent(code), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_solver_scheduler_and_eqr_solve_run_without_torch(export_dir: Path, tmp_path: Path) -> None:
    task = get_task("sudoku", 4)
    lines = task.format(task.generate(4, seed=9).inputs)
    (tmp_path / "puzzles.txt").write_text("\n".join(lines) + "\n")
    code = """
        import json, sys
        import numpy as np
        from click.testing import CliRunner
        from eqr.commands import cli
        from eqr.runtime import Scheduler, Solver

        export_dir, puzzles = sys.argv[1], sys.argv[2]
        out = {}
        with Solver.load(export_dir, backend="auto", threads=1) as solver:
            tokens = solver.task.parse(open(puzzles).read().split())
            out["backend"] = solver.backend.name
            out["solver"] = solver.solve(tokens, breadth=2, seed=5).preds.tolist()
        with Solver.load(export_dir + "/model.step.int8.onnx", threads=1) as solver:
            out["int8"] = [solver.precision, solver.solve(tokens, seed=5).preds.tolist()]
        solver = Solver.load(export_dir, backend="onnxruntime", threads=1)
        with Scheduler(solver, batch_size=8, breadth=2, seed=5) as scheduler:
            futures = [scheduler.submit(t) for t in tokens]
        out["scheduler"] = [f.result().preds[0].tolist() for f in futures]
        solver.close()
        result = CliRunner().invoke(cli, ["solve", export_dir, "-i", puzzles, "--breadth", "2", "--seed", "5",
                                          "--json"])
        out["cli"] = [result.exit_code, [json.loads(line)["answer"] for line in result.stdout.splitlines()]]
        out["torch_loaded"] = "torch" in sys.modules
        print(json.dumps(out))
    """
    done = run_without_torch(code, str(export_dir), str(tmp_path / "puzzles.txt"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch_loaded"] is False and out["backend"] == "onnxruntime"
    tokens = task.parse(lines)
    with Solver.load(export_dir, backend="onnxruntime", threads=1) as solver:  # here, torch is importable
        want = solver.solve(tokens, breadth=2, seed=5).preds
        # a scheduler request is puzzle 0 of its own run (seeded by (seed, 0, k))
        alone = np.concatenate([solver.solve(t[None], breadth=2, seed=5).preds for t in tokens])
    with Solver.load(export_dir / "model.step.int8.onnx", threads=1) as solver:
        want_int8 = solver.solve(tokens, seed=5).preds
    assert np.array_equal(out["solver"], want) and np.array_equal(out["scheduler"], alone)
    assert out["int8"][0] == "int8" and np.array_equal(out["int8"][1], want_int8)
    assert out["cli"] == [0, task.format(want)]


def test_commands_that_need_torch_name_the_extra(export_dir: Path) -> None:
    code = """
        import sys
        from click.testing import CliRunner
        from eqr.commands import cli

        for args in (["--help"], ["export", "sudoku-small"], ["train", "--help"],
                     ["solve", sys.argv[1], "--backend", "torch"], ["solve", "sudoku-small"]):
            result = CliRunner().invoke(cli, args, input="")
            print(result.exit_code, (result.stderr or result.stdout).strip().splitlines()[-1])
    """
    done = run_without_torch(code, str(export_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    help_, export, train, backend, checkpoint = done.stdout.strip().splitlines()
    assert help_.startswith("0 ")
    assert export.startswith("2 error: eqr export needs torch") and "pip install 'eqr[export]'" in export
    assert train.startswith("2 error: eqr train needs torch") and "pip install 'eqr[train]'" in train
    assert backend.startswith("2 error: ") and "pip install 'eqr[export]'" in backend
    assert checkpoint.startswith("2 error: sudoku-small") and "pip install 'eqr[export]'" in checkpoint


def test_eqr_models_lists_the_bundled_models_without_torch() -> None:
    """The bundled models' layout and cards are contract facts (eqr.contract.bundled): no torch."""
    done = run_without_torch("""
        from click.testing import CliRunner
        from eqr.commands import cli

        result = CliRunner().invoke(cli, ["models", "--json"])
        print(result.exit_code, result.output)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    code, _, listing = done.stdout.partition(" ")
    assert code == "0" and {"sudoku-small", "maze-small"} <= {m["name"] for m in json.loads(listing)}


# small and fast: 4 puzzles x 2 starts recorded, rules fitted on 16 puzzles over 12 steps
CALIBRATE_ARGS = ["--precision", "int8", "--force", "--generate", "4", "--starts", "2", "--depths", "0,1,2,4,8",
                  "--rule-puzzles", "16", "--rule-steps", "12", "--json"]


def test_calibrate_fits_int8_and_report_runs_without_torch(export_dir: Path, tmp_path: Path) -> None:
    """A target without torch calibrates the export it was given: the INT8 graph is the one this
    process (with torch) builds from the same flags, its stopping rule is fitted into the
    manifest, `eqr solve --precision int8` solves, and `eqr report` skips its torch column with
    one note."""
    from click.testing import CliRunner

    from eqr.commands import cli

    here, target = tmp_path / "here", tmp_path / "target"
    shutil.copytree(export_dir, here)
    shutil.copytree(export_dir, target)
    task = get_task("sudoku", 4)
    (tmp_path / "puzzles.txt").write_text("\n".join(task.format(task.generate(6, seed=4).inputs)) + "\n")
    code = """
        import json, sys
        from click.testing import CliRunner
        from eqr.commands import cli

        target, puzzles, out, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        runner = CliRunner()
        calibrated = runner.invoke(cli, ["calibrate", target, *args])
        solved = runner.invoke(cli, ["solve", target, "-i", puzzles, "--precision", "int8", "--json"])
        report = runner.invoke(cli, ["report", target, "--precision", "fp32,int8", "--generate", "8", "--depths", "2,8",
                                     "--breadth", "1", "--max-steps", "8", "--out", out])
        print(json.dumps({"calibrate": [calibrated.exit_code, calibrated.output[-2000:]],
                          "solve": [solved.exit_code, solved.stdout, solved.stderr[-2000:]],
                          "report": [report.exit_code, report.output[-3000:]],
                          "torch_loaded": any(m.partition(".")[0] == "torch" for m in sys.modules)}))
    """
    done = run_without_torch(code, str(target), str(tmp_path / "puzzles.txt"), str(tmp_path / "report"),
                             json.dumps(CALIBRATE_ARGS))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch_loaded"] is False
    assert out["calibrate"][0] == 0, out["calibrate"][1]
    manifest = json.loads((target / "manifest.json").read_text())
    int8 = manifest["precisions"]["int8"]
    assert "parity" not in int8 and int8["stopping"]["rule"]["max_steps"] >= 1  # calibrate's graph, its fitted rule
    assert manifest["precisions"]["fp32"]["stopping"]["heldout"]["puzzles"] == 8
    # the same graph as calibrating here, with torch importable
    result = CliRunner().invoke(cli, ["calibrate", str(here), *CALIBRATE_ARGS])
    assert result.exit_code == 0, result.output
    assert (here / "model.step.int8.onnx").read_bytes() == (target / "model.step.int8.onnx").read_bytes()
    assert json.loads((here / "manifest.json").read_text())["precisions"]["int8"]["stopping"] == int8["stopping"]
    code, stdout, stderr = out["solve"]
    assert code == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    # int8 on ONNX Runtime's CPU provider runs the integer-kernel graph calibrate built with it
    assert [r["backend"]["precision"] for r in records] == ["int8-cpu"] * 6 and all(len(r["answer"]) == 16 for r in records)
    assert max(r["steps"] for r in records) <= int8["stopping"]["rule"]["max_steps"]  # the fitted rule, by default
    code, printed = out["report"]
    assert code == 0, printed
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["runs"]) == {"onnxruntime-fp32", "onnxruntime-int8"} and report["reference"] == "onnxruntime-fp32"
    assert list(report["skipped"]) == ["torch"]  # one note for the backend, not one per precision
    assert "not run: torch: the torch backend needs torch, which is not installed: pip install 'eqr[export]'" in printed


def test_calibrate_without_the_graph_tools_names_the_calibrate_extra(export_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(export_dir, tmp_path / "export")
    done = run_without_torch("""
        import sys
        from click.testing import CliRunner
        from eqr.commands import cli

        for args in (["calibrate", sys.argv[1], "--precision", "int8", "--force"], ["report", sys.argv[1]]):
            result = CliRunner().invoke(cli, args)
            print(result.exit_code, result.stderr.strip().splitlines()[-1])
    """, str(tmp_path / "export"), also_blocked="onnx_graphsurgeon,matplotlib")
    assert done.returncode == 0, done.stderr[-3000:]
    calibrate, report = done.stdout.strip().splitlines()
    assert calibrate == ("2 error: eqr calibrate needs onnx_graphsurgeon, which is not installed: "
                         "pip install 'eqr[calibrate]'")
    assert report == "2 error: eqr report needs matplotlib, which is not installed: pip install 'eqr[calibrate]'"
    assert not (tmp_path / "export" / "calib.npz").exists()  # refused before any recording


def test_a_missing_package_names_the_extra_that_brings_it_for_that_command() -> None:
    """The graph tools are eqr[calibrate] (pyproject.toml: no torch; eqr[export] includes it), and a
    command whose own extra includes the package's names its own."""
    from eqr.commands.options import COMMAND_EXTRAS
    from eqr.contract.errors import EXTRAS, missing_extra

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    calibrate = {req.split(">")[0].split("[")[0].replace("-", "_").lower() for req in extras["calibrate"]}
    assert {m for m, extra in EXTRAS.items() if extra == "calibrate"} == calibrate
    assert "eqr[calibrate]" in extras["export"] and not any(r.startswith("torch") for r in extras["calibrate"])

    def named(package: str, command: str) -> str:
        return missing_extra(ModuleNotFoundError(package, name=package), f"eqr {command}",
                             COMMAND_EXTRAS.get(command)).extra

    assert named("onnx_graphsurgeon", "calibrate") == named("matplotlib", "report") == "calibrate"
    assert named("onnx_graphsurgeon", "export") == "export" and named("onnxruntime", "export") == "cpu"
    assert named("torch", "train") == "train" and named("torch", "report") == "export"
    assert named("jinja2", "bench") == "all"
