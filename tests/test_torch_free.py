"""The edge runtime needs no torch: in a Python where `import torch` fails, an export loads and
solves through `Solver`, `Scheduler` and `eqr solve` (onnxruntime backend), with the answers
this process gets for the same seed; commands that do need torch say which extra to install."""
from __future__ import annotations

import json
import os
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
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
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


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
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
