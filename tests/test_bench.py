"""`eqr bench`: the RESULT lines are produced and parse, the reference loop means what the runtime
means, and bad flags are one-line errors. No timing is asserted anywhere (speed lives in `eqr bench`)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config

from eqr.bench import (DEFAULT_MEASUREMENTS, MEASURE, MEASUREMENTS, Measurement, MeasurementError, ReferenceRun,
                       exact_correct, parse_result_line, reference_solve)
from eqr.commands import cli
from eqr.model.network import EqRModel
from eqr.model.step_graph import StepGraph


def test_bench_smoke_prints_a_parsable_result_line_per_measurement(monkeypatch) -> None:
    import eqr.bench.efficiency as efficiency

    # The tiny model's step can beat a GEMM peak measured a moment apart on a shared machine (which
    # fails the run, see test_a_step_faster_than_the_gemm_peak_fails_the_run); here the peak is a
    # known 1 TFLOP/s, far above what 2 CPU cores reach, so the efficiency is a checkable ratio.
    monkeypatch.setattr(efficiency, "gemm_peaks", lambda threads: {"torch": 0.5e12, "onnxruntime": 1e12})
    args = ["bench", "--model", "tiny", "--puzzles", "3", "--breadth", "2", "--depth", "3", "--batch", "4",
            "--stream", "5", "--precision", "FP32,int8", "--rule-puzzles", "6", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("RESULT ")]
    parsed = dict(parse_result_line(line) for line in lines)
    # the one table drives --only and the order; serving (it starts a server) runs only when named
    assert list(parsed) == list(DEFAULT_MEASUREMENTS) == [m for m in MEASURE if m != "serving"]
    assert set(MEASUREMENTS) == set(MEASURE) and "serving" in MEASUREMENTS
    assert "stopping rule: {" in result.output and "fitted here (6 puzzles x K 2" in result.output  # at its breadth
    for name, fields in parsed.items():
        value = float(fields[name])
        assert math.isfinite(value) and value >= 0, (name, fields)
        assert f"## {name} = " in result.output  # each has its table too
    assert "{flops" not in result.output and "M/sample)" in result.output  # notes are formatted
    assert 0 <= float(parsed["host_overhead"]["host_overhead"]) <= 1
    assert float(parsed["memory"]["peak_rss_mib_b256"]) > 0
    efficiency = parsed["step_efficiency"]
    assert {"torch_fp32_b64", "onnxruntime_fp32_b64", "onnxruntime_int8_b64"} <= set(efficiency)
    assert {"torch_gemm_gflops", "onnxruntime_gemm_gflops"} <= set(efficiency)
    assert float(efficiency["gemm_peak_gflops"]) == 1000.0
    per_backend = [float(efficiency[k]) for k in ("torch_fp32_b64", "onnxruntime_fp32_b64", "onnxruntime_int8_b64")]
    assert 0 < float(efficiency["step_efficiency"]) == max(per_backend) < 1.0
    assert "goal_min" not in efficiency  # the goal is defined on the paper-size model only
    assert float(parsed["continuous_vs_static"]["bound"]) >= 1.0 and "(bound " in result.output
    cascade = parsed["cascade_vs_fp32"]
    assert cascade["cascade"] == "int8+fp32" and float(cascade["cascade_low_steps"]) >= 1
    int8 = parsed["int8_speedup"]
    assert {"b1_t1", "b64_t1"} <= set(int8) and float(int8["int8_speedup"]) > 0
    assert "goal_min" not in int8 and "b1_met" not in int8  # the goals are defined on the paper-size model only
    accuracy = parsed["reference_vs_runtime"]
    assert 0 <= float(accuracy["reference_accuracy"]) <= 1 and 0 <= float(accuracy["runtime_accuracy"]) <= 1


def test_a_step_faster_than_the_gemm_peak_fails_the_run(monkeypatch) -> None:
    """A peak below what the step achieves means the peak or the FLOP count is wrong: exit 1, said why."""
    import eqr.bench.efficiency as efficiency

    monkeypatch.setattr(efficiency, "gemm_peaks", lambda threads: {"torch": 1e3, "onnxruntime": 1e3})
    args = ["bench", "--model", "tiny", "--only", "step_efficiency", "--precision", "fp32", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "above the best GEMM peak 0.0 GFLOP/s" in result.output


def test_bench_json_holds_the_same_measurements() -> None:
    import json

    args = ["bench", "--model", "tiny", "--puzzles", "2", "--breadth", "1", "--depth", "2", "--batch", "2",
            "--only", "reference_vs_runtime", "--only", "adaptive_steps", "--precision", "fp32", "--json",
            "--window", "2", "--max-steps", "5", "--rule-puzzles", "4"]
    result = CliRunner(mix_stderr=False).invoke(cli, args) if _has_mix_stderr() else CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [m["name"] for m in payload["measurements"]] == ["reference_vs_runtime", "adaptive_steps"]
    assert payload["run"]["config"]["depth"] == 2
    assert payload["run"]["rule"]["rule"]["max_steps"] >= 1  # fitted, then the flags on top


def _has_mix_stderr() -> bool:
    import inspect

    return "mix_stderr" in inspect.signature(CliRunner.__init__).parameters


@pytest.mark.parametrize("args, fragment", [
    (["--breadth", "0"], "--breadth must be >= 1"),
    (["--model", "tiny", "--paper"], "--paper runs paper-sudoku"),
    (["--model", "no-such-model"], "not a file, bundled model or preset"),
    (["--batch", "2", "--breadth", "4", "--model", "tiny"], "must hold one puzzle's --breadth"),
    (["--model", "tiny", "--export-dir", "."], "no manifest.json"),
])
def test_bad_flags_are_one_line_errors(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_reference_scores_match_the_runtime_step_graph() -> None:
    """Without noise the reference's per-step preds and logit_delta are the step graph's, so its
    convergence top-1 and the runtime's rank trajectories by the same number."""
    model = EqRModel(tiny_config(), seed=3).eval()
    tokens = np.random.default_rng(0).integers(1, 6, (3, 16)).astype(np.int32)
    K, D, seed = 2, 4, 11
    run = reference_solve(model, tokens, depth=D, breadth=K, batch_size=6, seed=seed, noise=0.0)
    assert run.preds.shape == (D, 6, 16) and run.logit_delta.shape == (D, 6)

    state = model.initial_state(6, torch.Generator().manual_seed(seed))  # the reference's one batch
    rows = torch.as_tensor(tokens).repeat_interleave(K, dim=0).int()
    graph = StepGraph(model)
    with torch.no_grad():
        z_H, z_L = state
        for t in range(D):
            z_H, z_L, _, preds, _, logit_delta, _ = graph(rows, z_H, z_L)
            np.testing.assert_array_equal(run.preds[t], preds.numpy())
            np.testing.assert_allclose(run.logit_delta[t], logit_delta.numpy(), rtol=1e-4, atol=1e-6)


def test_reference_answers_pick_the_most_converged_trajectory() -> None:
    # 1 puzzle, K = 2, L = 2: trajectory 1 moves least over the last steps, so it is chosen.
    preds = np.array([[[1, 1], [2, 2]]] * 3, np.uint8)  # (N=3, P*K=2, L=2)
    logit_delta = np.array([[5.0, 5.0], [5.0, 0.1], [5.0, 0.1]], np.float32)
    run = ReferenceRun(preds, logit_delta, seconds=1.0, breadth=2)
    np.testing.assert_array_equal(run.answers(3, "converged"), [[2, 2]])
    np.testing.assert_array_equal(run.answers(1, "converged"), [[1, 1]])  # tie at depth 1: earliest wins
    np.testing.assert_array_equal(exact_correct(np.array([[2, 2], [1, 2]]), np.array([[2, 2], [0, 3]])),
                                  [True, False])


def test_result_line_goal_and_parsing() -> None:
    missed = Measurement("host_overhead", 0.2, {"wall_s": 1.5, "backend": "onnxruntime fp32"}, ("a",), [])
    name, fields = parse_result_line(missed.result_line())
    assert name == "host_overhead" and fields["met"] == "0" and fields["goal_max"] == "0.05"
    assert fields["backend"] == "onnxruntime_fp32"
    met = Measurement("reference_vs_runtime", 3.5, {}, ("a",), [])
    assert met.met is True and parse_result_line(met.result_line())[1]["met"] == "1"
    assert Measurement("memory", 100.0, {}, ("a",), []).met is None
    assert Measurement("reference_vs_runtime", float("nan"), {}, ("a",), []).met is False  # lost accuracy
    assert Measurement("reference_vs_runtime", 1.0, {}, ("a",), [], goal_applies=False).met is None
    with pytest.raises(ValueError):
        parse_result_line("eqr bench 2026")


def test_a_step_faster_than_every_gemm_peak_fails_loudly(monkeypatch) -> None:
    """A value over 1 "of peak" is a measurement error, never a result."""
    import eqr.bench.efficiency as efficiency

    monkeypatch.setattr(efficiency, "gemm_peaks", lambda threads: {"torch": 1e3, "onnxruntime": 2e3})
    result = CliRunner().invoke(cli, ["bench", "--model", "tiny", "--only", "step_efficiency", "--precision", "fp32",
                                      "--rule-puzzles", "2", "-q"])
    assert result.exit_code == 1
    assert "above the best GEMM peak" in result.output and "Traceback" not in result.output
    assert issubclass(MeasurementError, RuntimeError)


def test_gemm_peaks_measure_every_engine_the_bench_uses() -> None:
    from eqr.bench.efficiency import gemm_peaks

    peaks = gemm_peaks(1, size=64, repeats=2)
    assert {"torch", "onnxruntime", "numpy"} <= set(peaks) and all(v > 0 for v in peaks.values())


def test_precision_flags_default_to_every_precision(monkeypatch) -> None:
    """bench takes the shared --precision (repeatable, comma lists, any case; fp32 always first)."""
    import eqr.commands.bench as bench_cli

    seen = []

    def fake_run(config, reporter):
        seen.append(config.precisions)
        return [], {}

    monkeypatch.setattr(bench_cli, "run_bench", fake_run)
    monkeypatch.setattr(bench_cli, "render", lambda measurements, info: "")
    for args in ([], ["--precision", "INT8", "--precision", "fp16,fp32"]):
        assert CliRunner().invoke(cli, ["bench", "--model", "tiny", "-q", *args]).exit_code == 0
    assert seen == [("fp32", "fp16", "int8"), ("fp32", "int8", "fp16")]  # default: every precision
    bad = CliRunner().invoke(cli, ["bench", "--model", "tiny", "--precision", "fp8"])
    assert bad.exit_code == 2 and "'fp8': choose from fp32, fp16, int8" in bad.output and "Traceback" not in bad.output




def test_int8_speedup_quantizes_a_cpu_graph_when_the_export_has_none(monkeypatch) -> None:
    """--precision fp32 exports no INT8 graph (as --paper): the measurement quantizes its own and times both."""
    import eqr.bench.int8 as int8

    timed = []

    def fake_seconds(path, precision, threads, batch, setting):
        timed.append((Path(path).name, precision, threads, batch))
        return {"fp32": 2.0, "int8-cpu": 1.0}[precision] * batch

    monkeypatch.setattr(int8, "step_seconds", fake_seconds)
    result = CliRunner().invoke(cli, ["bench", "--model", "tiny", "--only", "int8_speedup", "--precision", "fp32",
                                      "--rule-puzzles", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert ("model.step.int8.cpu.onnx", "int8-cpu", 1, 64) in timed and ("model.step.onnx", "fp32", 1, 1) in timed
    fields = dict([parse_result_line(line) for line in result.output.splitlines() if line.startswith("RESULT ")])
    assert float(fields["int8_speedup"]["int8_speedup"]) == 2.0 and float(fields["int8_speedup"]["b1_t1"]) == 2.0


def test_integer_dot_product_reads_x86_and_arm_cpuinfo() -> None:
    from eqr.bench.int8 import integer_dot_product

    assert integer_dot_product("flags\t\t: fpu sse avx2 avx512f avx512_vnni\n") == ["avx512_vnni"]
    assert integer_dot_product("Features\t: fp asimd asimddp i8mm\n") == ["asimddp", "i8mm"]
    assert integer_dot_product("flags\t\t: fpu sse avx2\n") == []


def test_a_further_goal_of_a_measurement_must_hold_too() -> None:
    from eqr.bench.result import Measurement

    base = dict(name="int8_speedup", value=2.5, fields={}, header=(), rows=[])
    assert Measurement(**base).met is True
    assert Measurement(**base, also_met={"b1": True}).met is True
    assert Measurement(**base, also_met={"b1": False}).met is False
    assert Measurement(**base, also_met={"b1": False}, goal_applies=False).met is None
    moved = Measurement(**base, threshold=3.0)  # a setting that moves the threshold (frontier_vs_official's breadth)
    assert moved.goal == (">=", 3.0) and moved.met is False and "goal_min=3 met=0" in moved.result_line()


def test_the_bench_set_is_half_the_tasks_own_draw_and_half_its_tiers() -> None:
    """One definition for every measurement: n // 2 puzzles as `generate` draws them (minimal Sudoku
    puzzles), the rest split over the tiers; --paper (tiers=False) draws them all like that."""
    from eqr.bench.setting import mixed_puzzles
    from eqr.tasks import get_task

    task = get_task("sudoku", 4)
    mixed = mixed_puzzles(task, 7, seed=5)
    own = task.generate(3, seed=5 + len(task.tiers))
    np.testing.assert_array_equal(mixed.inputs[4:], own.inputs)
    np.testing.assert_array_equal(mixed.labels[4:], own.labels)
    assert mixed.tiers[:4].tolist() == ["easy", "easy", "medium", "hard"]
    np.testing.assert_array_equal(mixed_puzzles(task, 3, seed=5, tiers=False).inputs, task.generate(3, seed=5).inputs)


def test_the_default_model_is_sudoku_6x6() -> None:
    from eqr.bench.run import default_model

    assert default_model() == "sudoku-6x6"
