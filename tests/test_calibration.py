"""eqr.calibration building blocks: configs, the recording backend, calib.npz, the contraction
estimate, the judging functions and the model-card writer. No export needed; tiny and fast."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from conftest import contracting_model, tiny_config

from eqr.calibration.card import BEGIN, END, record_in_card
from eqr.calibration.collect import Results, curve_key, curve_keys
from eqr.calibration.compare import agreement, compare, exact_accuracy
from eqr.calibration.config import CalibConfig, ReportConfig, parse_ints
from eqr.calibration.contraction import spectral_radius
from eqr.calibration.quantize import scale_change
from eqr.calibration.record import RecordingBackend, load_calib, read_calib_file, record_calibration, save_calib
from eqr.contract.errors import EqRError
from eqr.model.network import EqRModel
from eqr.runtime import Solver
from eqr.runtime.backends.base import Backend
from eqr.runtime.solver import initial_states


def test_configs_validate_and_round_trip() -> None:
    cfg = CalibConfig(depths=(0, 2, 5), method="percentile")
    assert CalibConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    report = ReportConfig(depths=(1, 4), breadth=(1, 2), max_drop=2.0)
    assert ReportConfig.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    assert report.drop_limit("int8") == 2.0 and ReportConfig().drop_limit("fp16") == 0.5
    with pytest.raises(EqRError, match="--method"):
        CalibConfig(method="kl")
    with pytest.raises(EqRError, match="--precision "):
        ReportConfig(precisions=("fp8",))
    with pytest.raises(EqRError, match="unknown ReportConfig keys: typo"):
        ReportConfig.from_dict({"typo": 1})
    with pytest.raises(EqRError, match="comma-separated"):
        parse_ints("1,x", "--depths")


def test_recording_captures_every_depth_of_the_runtime_loop() -> None:
    model = contracting_model()
    tokens = np.random.default_rng(0).integers(1, 6, size=(3, 16))
    solver = Solver.from_model(model)
    calib = record_calibration(solver, tokens, starts=2, depths=[0, 1, 3], seed=7)
    assert len(calib) == 3 * 3 * 2 and sorted(set(calib.depth.tolist())) == [0, 1, 3]
    assert solver.backend.name == "torch"  # the recorder was unwrapped again
    # depth 0 is exactly the runtime's seeded random start of trajectory (puzzle, start).
    z_H, z_L = initial_states(16, 16, (1.0, 1.0), 7, np.array([2]), np.array([1]))
    row = np.flatnonzero((calib.depth == 0) & (calib.puzzle == 2) & (calib.start == 1))[0]
    np.testing.assert_array_equal(calib.z_H[row], z_H[0])
    np.testing.assert_array_equal(calib.tokens[row], tokens[2])
    # depth 3 is three model steps from that start.
    from eqr.model.network import LatentState

    state = LatentState(torch.from_numpy(z_H), torch.from_numpy(z_L))
    with torch.no_grad():
        for _ in range(3):
            state = model.step(state, torch.from_numpy(tokens[2:3])).state
    row3 = np.flatnonzero((calib.depth == 3) & (calib.puzzle == 2) & (calib.start == 1))[0]
    np.testing.assert_allclose(calib.z_H[row3], state.z_H[0].numpy(), atol=1e-5)
    # later depths are new states, not copies of the start
    assert np.abs(calib.z_H[calib.depth == 3] - calib.z_H[calib.depth == 0]).max() > 0.1


@pytest.mark.parametrize("breadth", [1, 3])
def test_depth_curve_equals_separate_fixed_depth_runs(breadth: int) -> None:
    from eqr.calibration.collect import depth_curve

    model = EqRModel(tiny_config(), seed=1).eval()  # untrained: answers and scores move with depth
    tokens = np.random.default_rng(1).integers(1, 6, size=(4, 16))
    with Solver.from_model(model) as solver:
        curve = depth_curve(solver, tokens, breadth, (1, 2, 5), seed=3)
        for aggregate in (("first",) if breadth == 1 else ("converged", "vote")):
            for depth in (1, 2, 5):
                separate = solver.solve(tokens, fixed_depth=depth, breadth=breadth, aggregate=aggregate, seed=3)
                np.testing.assert_array_equal(curve[curve_key(aggregate, breadth, depth)], separate.preds)


def test_calib_npz_round_trip_and_errors(tmp_path) -> None:
    solver = Solver.from_model(contracting_model())
    tokens = np.ones((2, 16), np.int64)
    calib = record_calibration(solver, tokens, starts=1, depths=[0, 2], seed=0, provenance={"model": "x"})
    path = save_calib(tmp_path / "calib.npz", calib)
    with np.load(path, allow_pickle=False) as raw:  # export --calib-data reads these keys
        assert {"tokens", "z_H", "z_L"} <= set(raw.files)
    loaded = load_calib(path, 16, 16)
    np.testing.assert_array_equal(loaded.z_L, calib.z_L)
    assert loaded.provenance["model"] == "x" and loaded.provenance["depths"] == [0, 2]
    with pytest.raises(EqRError, match="--force"):
        save_calib(path, calib)
    with pytest.raises(EqRError, match="do not match"):
        load_calib(path, 16, 32)
    (tmp_path / "bad.npz").write_text("nope")
    with pytest.raises(EqRError, match="bad.npz: is not an .npz archive"):
        load_calib(tmp_path / "bad.npz")
    # A puzzles-only file is read as tokens (export records trajectories from it), never as a CalibSet.
    np.savez(tmp_path / "puzzles.npz", inputs=tokens)
    np.testing.assert_array_equal(read_calib_file(tmp_path / "puzzles.npz", 16, 16, vocab_size=6), tokens)
    with pytest.raises(EqRError, match="no recorded states"):
        load_calib(tmp_path / "puzzles.npz", 16, 16)


class LinearBackend(Backend):
    """f(z) = A z per token row (z_H and z_L each), with A of known spectral radius."""

    name = "linear"

    def __init__(self, matrix: np.ndarray) -> None:
        super().__init__()
        self.matrix = matrix

    def activate_impl(self) -> None:
        pass

    def step_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        z_H, z_L = feeds["z_H"] @ self.matrix.T, feeds["z_L"] @ self.matrix.T
        B = len(z_H)
        zeros = np.zeros(B, np.float32)
        return {"z_H_out": z_H.astype(np.float32), "z_L_out": z_L.astype(np.float32), "logits": z_H,
                "preds": np.zeros(z_H.shape[:2], np.int32), "residual": zeros, "logit_delta": zeros, "q_halt": zeros}

    def upload(self, array: np.ndarray) -> np.ndarray:
        return np.array(array)

    def download(self, array: np.ndarray) -> np.ndarray:
        return np.array(array)

    def take(self, array: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return array[rows]

    def concat(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.3])
def test_spectral_radius_matches_a_known_linear_map(rho: float) -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    eigenvalues = np.linspace(0.1, rho, 8)
    matrix = q @ np.diag(eigenvalues) @ q.T  # symmetric, spectral radius rho
    z = rng.standard_normal((2, 4, 8)).astype(np.float32)
    with LinearBackend(matrix) as backend:
        probe = spectral_radius(backend, np.zeros((2, 4), np.int32), z, z * 0.5, iters=40, eps=1e-2)
    np.testing.assert_allclose(probe["radius"], rho, rtol=0.02)
    assert probe["history"].shape == (40, 2)


def test_spectral_radius_through_the_recorder_is_transparent() -> None:
    matrix = np.diag(np.full(4, 0.7))
    z = np.ones((1, 3, 4), np.float32)
    with RecordingBackend(LinearBackend(matrix), depths=[0]) as backend:
        probe = spectral_radius(backend, np.zeros((1, 3), np.int32), z, z, iters=3, eps=1e-3)
    np.testing.assert_allclose(probe["radius"], 0.7, rtol=1e-3)
    assert len(backend.records) == 1  # only the first step (depth 0) was recorded


def test_scale_change_detects_unchanged_scales() -> None:
    same = scale_change({"a": 0.1, "b": 0.2}, {"a": 0.1, "b": 0.2})
    assert same["changed_fraction"] == 0.0
    moved = scale_change({"a": 0.1, "b": 0.2}, {"a": 0.05, "b": 0.2})
    assert moved["changed_fraction"] == 0.5 and moved["min_ratio"] == pytest.approx(0.5)


def test_accuracy_and_agreement() -> None:
    labels = np.array([[1, 2], [3, 4], [5, 6], [1, 1]])
    preds = np.array([[1, 2], [3, 0], [5, 6], [1, 1]])
    assert exact_accuracy(preds, labels) == 75.0
    assert exact_accuracy(preds, None) is None
    assert agreement(preds, labels) == 0.75


def _synthetic_results(cfg: ReportConfig, int8_wrong: int) -> Results:
    """Reference answers = labels; the int8 run gets `int8_wrong` of 10 puzzles wrong."""
    P, L = 10, 4
    labels = np.arange(P * L).reshape(P, L) % 5
    results = Results({"artifact": "synthetic", "config": cfg.to_dict(), "task": None, "tol": {}, "calibration": None},
                      labels.copy(), labels)
    for name, precision, wrong in (("torch-fp32", "fp32", 0), ("onnxruntime-int8", "int8", int8_wrong)):
        preds = labels.copy()
        preds[:wrong, 0] += 1
        trace = np.tile(np.geomspace(1.0, 1e-4 if precision == "fp32" else 2e-2, 16), (P, 1)).astype(np.float32)
        run = {"precision": precision, "backend": name.split("-")[0], "tol": 1e-3 if precision == "fp32" else 5e-2,
               "curve": {curve_key(a, k, d): preds for a, k, d in curve_keys(cfg)},
               "fixed": {"preds": preds, "score": np.linspace(0, 1, P), "residual_trace": trace},
               "gated": {"nstep": np.full(P, 8), "converged": np.ones(P, bool), "residual": trace[:, -1],
                         "preds": preds, "residual_trace": trace[:, :8]},
               "one_step": {0: np.ones((3, 2, L, 2), np.float32)},
               "settled": np.ones((2, 2, L, 2), np.float32) * (1 + 0.01 * (precision == "int8")),
               "radius": np.array([0.8, 0.82]), "radius_history": np.array([[0.7, 0.75], [0.8, 0.82]])}
        results.runs[name] = run
    return results


def test_compare_fails_on_an_accuracy_drop_and_passes_otherwise() -> None:
    cfg = ReportConfig(depths=(1, 4), breadth=(1, 2), max_drop=2.0, min_agreement=0.5)
    good = compare(_synthetic_results(cfg, int8_wrong=0), cfg)
    assert good["passed"] and good["reference"] == "torch-fp32"
    bad = compare(_synthetic_results(cfg, int8_wrong=3), cfg)
    assert not bad["passed"]
    assert any("onnxruntime-int8: accuracy (single, depth 4) 70.0% is 30.0 points below" in f for f in bad["failures"])
    int8 = bad["runs"]["onnxruntime-int8"]
    assert "suggested_policy" in int8["diagnosis"]
    # an INT8 residual floor of 2e-2 never reaches the FP32 tol of 1e-3: said so explicitly
    assert int8["convergence"]["reaches_fp32_tol"] == 0.0
    assert any("burn to max steps" in w for w in int8["convergence"]["warnings"])
    assert int8["convergence"]["recommended_tol"] >= int8["convergence"]["residual_floor_median"]
    # most converged half (lowest scores) holds the 3 wrong puzzles here
    assert int8["coupling"]["most_converged_accuracy"] == pytest.approx(40.0)
    assert int8["coupling"]["least_converged_accuracy"] == 100.0


def test_compare_fails_on_low_agreement_without_labels() -> None:
    cfg = ReportConfig(depths=(2,), breadth=(1,), min_agreement=0.95)
    results = _synthetic_results(cfg, int8_wrong=2)
    results.labels = None
    report = compare(results, cfg)
    assert not report["passed"]
    assert any("agree with FP32 on 80.0% of puzzles" in f for f in report["failures"])


def test_record_in_card_updates_json_and_markdown_idempotently(tmp_path) -> None:
    cfg = ReportConfig(depths=(1, 4), breadth=(1,), max_drop=2.0)
    report = compare(_synthetic_results(cfg, int8_wrong=1), cfg)
    (tmp_path / "card.json").write_text(json.dumps({"name": "tiny"}))
    (tmp_path / "card.md").write_text("# tiny\n\nTrained on CPU.\n")
    record_in_card(report, tmp_path)
    record_in_card(report, tmp_path)
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["name"] == "tiny"
    assert card["precision_report"]["runs"]["onnxruntime-int8"]["drop_points"]["single"] == pytest.approx(10.0)
    text = (tmp_path / "card.md").read_text()
    assert text.startswith("# tiny") and text.count(BEGIN) == 1 and text.count(END) == 1
    assert "| onnxruntime-int8 | 90.0% | 10.0 |" in text


def test_results_of_256_puzzles_fit_in_one_megabyte(tmp_path) -> None:
    """maze-size runs (L 81, D 64, 64 steps, four runs, eight calibration depths): the states are
    saved as errors against the reference, answers as uint8 and traces as fp16."""
    from eqr.calibration.collect import save_results

    cfg = ReportConfig()
    rng = np.random.default_rng(0)
    P, L, D, N = 256, 81, 64, 64
    labels = rng.integers(0, 6, (P, L))
    results = Results({"artifact": "synthetic"}, labels.astype(np.uint8), labels.astype(np.uint8))
    for name in ("torch-fp32", "onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8"):
        preds = np.where(rng.random((P, L)) < 0.01, 0, labels).astype(np.int32)
        results.runs[name] = {
            "precision": name.split("-")[1], "backend": name.split("-")[0], "tol": 1e-3,
            "curve": {curve_key(a, k, d): preds for a, k, d in curve_keys(cfg)},
            "fixed": {"preds": preds, "score": rng.random(P, dtype=np.float32),
                      "residual_trace": rng.random((P, N), dtype=np.float32)},
            "gated": {"nstep": rng.integers(1, 16, P), "converged": np.ones(P, bool), "preds": preds,
                      "residual": rng.random(P, dtype=np.float32), "residual_trace": rng.random((P, 16), dtype=np.float32)},
            "one_step": {d: rng.standard_normal((64, 2, L, D), dtype=np.float32) for d in (0, 1, 2, 4, 8, 16, 32, 64)},
            "settled": rng.standard_normal((8, 2, L, D), dtype=np.float32),
            "radius": rng.random(8), "radius_history": rng.random((12, 8)), "speed": {"gated_seconds": 1.0},
            "trajectories": {"K8@D32/preds": np.repeat(preds[:, None], 8, axis=1), "K8@D32/valid": np.ones((P, 8), bool),
                             "K8@D32/score": rng.random((P, 8), dtype=np.float32)}}  # every K=8 trajectory
    save_results(tmp_path / "results.npz", results, "torch-fp32")
    assert (tmp_path / "results.npz").stat().st_size < 1 << 20
    with np.load(tmp_path / "results.npz", allow_pickle=False) as saved:
        assert saved["onnxruntime-int8/one_step_error/4"].shape == (64,)
        assert saved["onnxruntime-int8/curve/first@K1@D32"].dtype == np.uint8
        assert saved["onnxruntime-int8/trajectories/K8@D32/preds"].dtype == np.uint8
