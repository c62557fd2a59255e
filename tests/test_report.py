"""`eqr calibrate` and `eqr report` end to end on a tiny exported model, including the regression
gate: a deliberately damaged INT8 graph (weight scales x10) makes `eqr report --max-drop 2` exit 1."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import contracting_model
from onnx import numpy_helper

from eqr.commands import cli
from eqr.contract.artifact import METADATA_KEY, PRECISION_KEY
from eqr.contract.io import sha256_file
from eqr.model.checkpoint import save_checkpoint

PUZZLES = 8
DEPTH = 32
# Small and fast; torch runs fp32 only, so it is listed under "not run" for fp16/int8.
REPORT_ARGS = ["--depths", f"4,{DEPTH}", "--breadth", "1,2", "--max-steps", str(DEPTH)]


def invoke(*args: str) -> "CliRunner.Result":
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """An fp32 export of the tiny model, calibrated: calib.npz, fp16 and int8 graphs, manifest tols."""
    from eqr.export import ExportConfig, export_model
    from eqr.model.load import load_model

    root = tmp_path_factory.mktemp("calibrated")
    model = contracting_model()
    save_checkpoint(root / "tiny.pt", model.config, model.state_dict(), metadata={"task": {"name": "sudoku", "size": 4}})
    export_model(load_model(root / "tiny.pt"), root / "export", ExportConfig(engine="never", check_steps=16))
    result = invoke("calibrate", root / "export", "--generate", 4, "--starts", 2, "--depths", "0,1,2,4,8,16",
                    "--rule-puzzles", 16, "--rule-steps", 24)
    assert result.exit_code == 0, result.output
    return root / "export"


@pytest.fixture(scope="module")
def labelled(calibrated: Path, tmp_path_factory) -> Path:
    """Puzzles labelled with torch FP32's own answers at the report depth: FP32 scores 100%, so an
    accuracy drop is exactly a lost FP32 answer. The tiny model is untrained, so a few of its answers
    hold a near-tie (top-2 logits 0.01 apart where 0.45 is typical) that any INT8 rounding flips:
    only puzzles whose every cell is decided by a clear margin are kept."""
    from eqr.model.load import load_model
    from eqr.runtime import Solver
    from eqr.tasks import get_task

    candidates = get_task("sudoku", 4).generate(6 * PUZZLES, seed=11).inputs
    model = load_model(calibrated.parent / "tiny.pt")
    with torch.no_grad():  # the contracting model has one attractor per puzzle: any start reaches it
        state, tokens = model.initial_state(len(candidates), torch.Generator().manual_seed(0)), torch.as_tensor(candidates)
        for _ in range(DEPTH):
            out = model.step(state, tokens)
            state = out.state
        top2 = out.logits.topk(2, dim=-1).values  # (P, L, 2)
    decided = (top2[..., 0] - top2[..., 1]).amin(dim=-1) > 0.05  # (P,)
    inputs = candidates[decided.numpy()][:PUZZLES]
    assert len(inputs) == PUZZLES
    with Solver.load(calibrated, backend="torch") as solver:
        labels = solver.solve(inputs, fixed_depth=DEPTH, seed=0).preds
    path = tmp_path_factory.mktemp("data") / "puzzles.npz"
    np.savez(path, inputs=inputs, labels=labels.astype(np.uint8))
    return path


def test_calibrate_writes_calib_graphs_and_manifest(calibrated: Path) -> None:
    manifest = json.loads((calibrated / "manifest.json").read_text())
    fp16, int8 = manifest["precisions"]["fp16"], manifest["precisions"]["int8"]
    assert (calibrated / fp16["onnx"]).is_file() and (calibrated / int8["onnx"]).is_file()
    assert int8["policy"]["op_types"] == ["MatMul", "Gemm"] and set(int8["quantized_ops"]) <= {"MatMul", "Gemm"}
    assert int8["tol"] >= 1e-2 and fp16["tol"] >= 1e-3  # the export's per-precision rule
    assert manifest["calibration"]["states"] == 4 * 2 * 6
    with np.load(calibrated / "calib.npz", allow_pickle=False) as calib:
        assert sorted(set(calib["depth"].tolist())) == [0, 1, 2, 4, 8, 16]
        provenance = json.loads(str(calib["provenance"]))
    assert provenance["model"]["fp32_onnx_sha256"] and provenance["data"]["generated"]["seed"] == 0
    # only MatMul/Gemm read dequantized activations: norms, adds and outputs stay FP32
    model = onnx.load(str(calibrated / int8["onnx"]))
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    readers = {n.op_type for n in model.graph.node if dequantized & set(n.input)}
    assert readers <= {"MatMul", "Gemm"}
    # each built graph describes itself, with its own precision and calibrated tol, not the FP32 graph's
    for precision, entry in (("fp16", fp16), ("int8", int8)):
        props = {p.key: p.value for p in onnx.load(str(calibrated / entry["onnx"])).metadata_props}
        embedded = json.loads(props[METADATA_KEY])
        assert props[PRECISION_KEY] == precision and embedded["precisions"][precision]["tol"] == entry["tol"]
        assert sha256_file(calibrated / entry["onnx"]) == entry["sha256"]


def test_calibrate_adds_to_an_export_and_replaces_only_its_own_files(tmp_path: Path) -> None:
    """After `export --precision fp16`, calibrate adds calib.npz and int8 without --force, keeps the
    export's fp16, replaces its own files on a re-run, and needs --force for the export's graph."""
    from eqr.export import ExportConfig, export_model
    from eqr.model.load import load_model

    model = contracting_model()
    save_checkpoint(tmp_path / "tiny.pt", model.config, model.state_dict(),
                    metadata={"task": {"name": "sudoku", "size": 4}})
    out = tmp_path / "export"
    export_model(load_model(tmp_path / "tiny.pt"), out,
                 ExportConfig(precision=("fp16",), engine="never", check_steps=4))
    fp16 = (out / "model.step.fp16.onnx").read_bytes()
    args = ["calibrate", str(out), "--generate", "2", "--starts", "1", "--depths", "0,2"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "fp16: kept the export's graph" in first.stdout and "int8: model.step.int8.onnx" in first.stdout
    assert (out / "model.step.fp16.onnx").read_bytes() == fp16 and (out / "calib.npz").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "parity" not in manifest["precisions"]["int8"] and "parity" in manifest["precisions"]["fp16"]
    again = CliRunner().invoke(cli, [*args, "--precision", "INT8", "-q"])
    assert again.exit_code == 0 and again.stderr == "", again.output
    refused = CliRunner().invoke(cli, [*args, "--precision", "fp16"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert "model.step.fp16.onnx: written by `eqr export`; pass --force" in refused.stderr
    forced = CliRunner().invoke(cli, [*args, "--precision", "fp16", "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    assert "parity" not in json.loads(forced.stdout)["precisions"]["fp16"]
    assert "parity" not in json.loads((out / "manifest.json").read_text())["precisions"]["fp16"]
    # export --force clears what calibrate and report derived from the previous export
    (out / "report").mkdir()
    (out / "report" / "report.json").write_text("{}")
    export_model(load_model(tmp_path / "tiny.pt"), out, ExportConfig(engine="never", check_steps=4, force=True))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.step.onnx"]


def test_calibrate_fits_a_stopping_rule_per_precision_and_the_runtime_uses_it(calibrated: Path) -> None:
    from eqr.runtime import Solver

    manifest = json.loads((calibrated / "manifest.json").read_text())
    for precision in ("fp32", "fp16", "int8"):
        stopping = manifest["precisions"][precision]["stopping"]
        held = stopping["heldout"]
        assert stopping["fit"]["puzzles"] == held["puzzles"] == 8  # disjoint halves of 16
        assert 1 <= stopping["rule"]["max_steps"] <= 24 and 1 <= held["mean_steps"] <= 24
        assert 0 <= held["accuracy"] <= 100
        # on the fitting half the rule keeps the margin to the best fixed depth
        assert stopping["fit"]["accuracy"] >= stopping["fit"]["best_fixed_accuracy"] - stopping["margin"]
    rule = manifest["precisions"]["int8"]["stopping"]["rule"]
    with Solver.load(calibrated, backend="onnxruntime", precision="int8") as solver:
        cfg = solver.config()
        assert {k: getattr(cfg, k) for k in rule} == rule  # the calibrated rule is the default
        assert solver.config(window=7, max_steps=99).window == 7  # explicit values override
        assert solver.config(window=7, max_steps=99).max_steps == 99


@pytest.mark.parametrize("cascade", ["fp16+fp32", "int8+fp32"])
def test_precision_cascade_reaches_the_fp32_answers(calibrated: Path, cascade: str) -> None:
    """Low-precision steps to the floor, then FP32 steps from that state, in the one loop."""
    from eqr.runtime import Solver
    from eqr.tasks import get_task

    inputs = get_task("sudoku", 4).generate(12, seed=5).inputs
    rule = {"max_steps": 64, "tol": 1e-4, "window": None, "patience": 2}
    with Solver.load(calibrated, backend="onnxruntime") as fp32, \
            Solver.load(calibrated, backend="onnxruntime", precision=cascade.upper()) as both:
        # the CPU provider runs int8 on its integer-kernel graph
        assert both.backend.describe()["precision"] == cascade.replace("int8", "int8-cpu")
        reference = fp32.solve(inputs, seed=0, **rule)
        result = both.solve(inputs, seed=0, **rule)
    np.testing.assert_array_equal(result.preds, reference.preds)
    assert (result.residual < 1e-4).all()  # the landing is FP32's: below a tol only FP32 reaches
    low = result.stats.low_steps
    assert low is not None and (low >= 1).all() and (low < result.stats.nstep).all()


def test_calibrate_rejects_bad_input(calibrated: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["calibrate", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json" in result.output
    result = CliRunner().invoke(cli, ["calibrate", str(calibrated), "--depths", "0,a"])
    assert result.exit_code == 2 and "--depths" in result.output


def test_percentile_moves_the_scales_of_minmax(calibrated: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(calibrated, copy)
    result = invoke("calibrate", copy, "--generate", 2, "--starts", 1, "--depths", "0,4", "--method", "percentile",
                    "--percentile", "99.9", "--precision", "int8", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["recorded_on"]["providers"] == ["CPUExecutionProvider"]
    change = printed["precisions"]["int8"]["scale_change_vs_minmax"]
    assert change["tensors"] > 0 and change["changed_fraction"] > 0.5 and change["median_ratio"] < 1.0


def test_report_passes_on_healthy_precisions(calibrated: Path, labelled: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = invoke("report", calibrated, "--data", labelled, "--out", out, *REPORT_ARGS)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["reference"] == "torch-fp32"
    assert set(report["runs"]) == {"torch-fp32", "onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8"}
    assert "torch-int8" in report["skipped"]
    int8 = report["runs"]["onnxruntime-int8"]
    assert int8["accuracy"]["at_max_depth"]["single"]["accuracy"] == 100.0
    assert set(int8["accuracy"]["curves"]) == {"single", "converged K=2", "vote K=2"}
    assert 0 < int8["state_error"]["one_step_by_depth"]["0"]["median"] < 0.05
    assert report["runs"]["onnxruntime-fp32"]["state_error"]["settled_median"] < 1e-5
    assert 0 < int8["contraction"]["median"] < 1.0
    assert int8["diagnosis"]["worst_activations"]
    official = int8["official_metrics"]["K=2"]  # the official breadth metrics, per precision
    assert official["depth"] == DEPTH and official["metrics"]["different_init/n"] == 2
    assert official["metrics"]["convergence_top_k/k"] == 2 and "majority_vote/exact_accuracy" in official["metrics"]
    decision = report["decision"]
    rows = {r["run"]: r for r in decision["rows"]}
    assert set(rows) == set(report["runs"]) | {"onnxruntime-fp16+fp32", "onnxruntime-int8+fp32"}
    for row in rows.values():
        assert row["puzzles_per_s"] > 0 and row["mean_steps"] >= 1 and row["provider"]
    assert set(rows["onnxruntime-int8"]["latency_ms"]) == {"1", "16", "64"}
    assert rows["onnxruntime-int8"]["file_bytes"] > 0 and rows["onnxruntime-int8+fp32"]["low_steps"] >= 1
    assert rows["onnxruntime-fp32"]["provider"] == "CPUExecutionProvider"
    assert decision["fastest"] in rows and rows[decision["fastest"]]["within"]
    assert decision["headline"].startswith(f"fastest precision within --max-drop: {decision['fastest']}")
    assert decision["headline"] in result.output
    assert (out / "results.npz").stat().st_size < 1 << 20
    html = (out / "report.html").read_text()
    assert "fastest precision within --max-drop" in html and all(c in html for c in decision["columns"])
    assert f"Official metrics: K=2, depth {DEPTH}, top-2, {PUZZLES} puzzles" in html
    assert f"official metrics onnxruntime-int8 K=2 depth {DEPTH}: majority " in result.stdout
    for png in ("accuracy_vs_speed.png", "accuracy_vs_depth.png", "residual_curves.png", "steps_histogram.png", "state_error_vs_depth.png"):
        assert f"src='{png}'" in html
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "onnxruntime-int8" in (out / "report.md").read_text()
    ran_on = next(line for line in result.stdout.splitlines() if line.startswith("ran on: "))
    assert "torch-fp32 torch on cpu" in ran_on and "onnxruntime-int8 onnxruntime (CPUExecutionProvider)" in ran_on
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(cli, ["report", str(calibrated), "--out", str(foreign)])
    assert refused.exit_code == 2 and "pass --force" in refused.stderr


def test_report_defaults_to_the_precisions_present_and_names_providers_in_json(calibrated: Path, labelled: Path,
                                                                               tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(calibrated, copy, ignore=shutil.ignore_patterns("model.step.fp16.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["precisions"]["fp16"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    args = ["report", str(copy), "--data", str(labelled), "--backend", "onnxruntime", "--json", *REPORT_ARGS]
    for _ in range(2):  # a re-run replaces its own report without --force
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert set(printed["runs"]) == {"onnxruntime-fp32", "onnxruntime-int8"}
    assert printed["runs"]["onnxruntime-int8"]["providers"] == ["CPUExecutionProvider"]
    assert printed["official_metrics"]["onnxruntime-int8"]["K=2"]["metrics"]["different_init/n"] == 2


def damage_int8(path: Path, factor: float = 10.0) -> int:
    """Multiply the scale of every weight DequantizeLinear by `factor` (weights x factor); returns the count."""
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    damaged = 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            scale = initializers[node.input[1]]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * factor, scale.name))
            damaged += 1
    onnx.save(model, str(path))
    return damaged


def test_damaged_int8_graph_fails_the_report(calibrated: Path, labelled: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(calibrated, copy)
    assert damage_int8(copy / "model.step.int8.cpu.onnx") > 0  # the graph the CPU provider runs for int8
    result = invoke("report", copy, "--data", labelled, "--precision", "fp32,int8", "--backend", "onnxruntime",
                    "--max-drop", 2, *REPORT_ARGS)
    assert result.exit_code == 1, result.output
    assert "regression: onnxruntime-int8: accuracy (single, depth 32)" in result.output
    report = json.loads((copy / "report" / "report.json").read_text())
    assert report["reference"] == "onnxruntime-fp32" and not report["passed"]
    assert report["runs"]["onnxruntime-fp32"]["verdict"]["passed"]
    int8 = report["runs"]["onnxruntime-int8"]
    assert int8["verdict"]["worst_drop"] > 2
    assert int8["diagnosis"]["suggested_policy"]["exclude_nodes"]


def test_report_takes_cascades_in_its_precision_list(calibrated: Path, labelled: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = invoke("report", calibrated, "--data", labelled, "--out", out, "--precision", "fp32,fp16+fp32",
                    "--backend", "onnxruntime", "--depths", "4", "--breadth", "1", "--max-steps", 16)
    assert result.exit_code == 0, result.output
    rows = [r["run"] for r in json.loads((out / "report.json").read_text())["decision"]["rows"]]
    assert rows == ["onnxruntime-fp32", "onnxruntime-fp16+fp32"]


def test_report_needs_the_precision_graphs(calibrated: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(calibrated, copy)
    (copy / "model.step.int8.onnx").unlink()
    result = CliRunner().invoke(cli, ["report", str(copy), "--precision", "fp32,int8"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"eqr calibrate {copy} --precision int8" in result.output


def test_eqr_solve_takes_a_cascade_and_rule_flags(calibrated: Path, tmp_path: Path) -> None:
    from eqr.tasks import get_task

    task = get_task("sudoku", 4)
    puzzles = tmp_path / "puzzles.txt"
    puzzles.write_text("\n".join(task.format_tokens(p) for p in task.generate(4, seed=2).inputs) + "\n")
    cascade = invoke("solve", calibrated, "-i", puzzles, "--precision", "INT8+FP32", "--json", "--backend",
                     "onnxruntime", "--max-steps", 40, "--tol", "1e-4", "--window", 0)
    fp32 = invoke("solve", calibrated, "-i", puzzles, "--json", "--backend", "onnxruntime", "--max-steps", 40,
                  "--tol", "1e-4", "--window", 0)
    assert cascade.exit_code == 0 and fp32.exit_code == 0, cascade.output
    answers = lambda out: [json.loads(line)["answer"] for line in out.splitlines() if line.startswith("{")]  # noqa: E731
    assert answers(cascade.output) == answers(fp32.output) and len(answers(fp32.output)) == 4


def test_a_copied_graph_keeps_its_calibrated_stopping_rule(calibrated: Path, tmp_path: Path) -> None:
    """Each graph calibrate built embeds the manifest with the stopping rules, so a lone copy stops
    like the directory; the export's own FP32 graph keeps its bytes (engines and calib.npz name its
    hash), and its rule is read from manifest.json."""
    from eqr.contract.io import sha256_file
    from eqr.runtime import Solver

    manifest = json.loads((calibrated / "manifest.json").read_text())
    for precision, name in (("int8", "model.step.int8.onnx"),):
        copy = tmp_path / name
        shutil.copy(calibrated / name, copy)
        with Solver.load(copy, backend="onnxruntime") as alone:
            cfg = alone.config()
        rule = manifest["precisions"][precision]["stopping"]["rule"]
        assert alone.precision == precision and {k: getattr(cfg, k) for k in rule} == rule
        assert manifest["precisions"][precision]["sha256"] == sha256_file(calibrated / name)
    with Solver.load(calibrated, backend="onnxruntime", precision="fp32") as solver:
        cfg = solver.config()
    rule = manifest["precisions"]["fp32"]["stopping"]["rule"]
    assert {k: getattr(cfg, k) for k in rule} == rule
