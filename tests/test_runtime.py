"""The runtime loop, Solver, aggregation and backends on tiny models (CPU, seconds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_helpers import StaticTorchBackend, contractive_model, export_onnx, random_puzzles

from eqr.contract.errors import EqRError
from eqr.runtime import SolveConfig, Solver, solve
from eqr.runtime.aggregate import aggregator_names, converged_top1, first_valid, majority, vote_share
from eqr.runtime.backends import backend_names, create_backend
from eqr.runtime.backends.ort_backend import OrtBackend
from eqr.runtime.backends.torch_backend import TorchBackend
from eqr.runtime.resolve import load_artifact


@pytest.fixture(scope="module")
def model():
    return contractive_model()


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.step.onnx")


@pytest.fixture
def torch_solver(model):
    with Solver.from_model(model) as solver:
        yield solver


@pytest.fixture
def ort_solver(onnx_path):
    with Solver(OrtBackend(onnx_path, threads=1), 16, 16, default_tol=1e-3) as solver:
        yield solver


def z0(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return g.standard_normal((n, 16, 16)).astype(np.float32), g.standard_normal((n, 16, 16)).astype(np.float32)


# --------------------------------------------------------------------------- backends


def test_torch_and_onnxruntime_give_the_same_answers(torch_solver, ort_solver):
    puzzles = random_puzzles(6)
    a = torch_solver.solve(puzzles, max_steps=40, breadth=3, seed=7)
    b = ort_solver.solve(puzzles, max_steps=40, breadth=3, seed=7)
    np.testing.assert_array_equal(a.preds, b.preds)
    np.testing.assert_array_equal(a.stats.nstep, b.stats.nstep)
    np.testing.assert_array_equal(a.converged, b.converged)
    np.testing.assert_allclose(a.residual, b.residual, rtol=1e-3, atol=1e-6)
    assert a.converged.all()  # the contractive model settles well inside 40 steps


def test_ort_state_ping_pongs_between_two_device_buffers(onnx_path):
    with OrtBackend(onnx_path, threads=1) as backend:
        z_H, z_L = z0(3)
        feeds = {"tokens": backend.upload(random_puzzles(3)), "z_H": backend.upload(z_H), "z_L": backend.upload(z_L)}
        addresses = []
        for _ in range(4):
            out = backend.step(feeds)
            addresses.append(out["z_H_out"].data_ptr())
            feeds = {"tokens": feeds["tokens"], "z_H": out["z_H_out"], "z_L": out["z_L_out"]}
        assert addresses[0] == addresses[2] and addresses[1] == addresses[3] and addresses[0] != addresses[1]
        assert out["residual"].device_name() == "cpu" and out["residual"].shape() == [3]


def test_a_cpu_step_in_row_blocks_is_the_whole_step_bit_for_bit(onnx_path):
    """Blocks of 3 rows (the last one short) write the same outputs into the same buffers, and a
    gated solve with compaction gives the same answers and steps."""
    from eqr.runtime.backends.ort_backend import cpu_row_block

    z_H, z_L = z0(7)
    puzzles = random_puzzles(7)
    outputs = {}
    for block in (0, 3):
        with OrtBackend(onnx_path, threads=1, row_block=block) as backend:
            feeds = {"tokens": backend.upload(puzzles), "z_H": backend.upload(z_H), "z_L": backend.upload(z_L)}
            for _ in range(2):  # the second step reads the first one's state buffers
                out = backend.step(feeds)
                feeds = {"tokens": feeds["tokens"], "z_H": out["z_H_out"], "z_L": out["z_L_out"]}
            outputs[block] = {k: backend.download(v).copy() for k, v in out.items()}
            assert backend._block == block
    for name, whole in outputs[0].items():
        np.testing.assert_array_equal(outputs[3][name], whole, err_msg=name)
    results = []
    for block in (0, 3):
        with Solver(OrtBackend(onnx_path, threads=1, row_block=block), 16, 16, default_tol=1e-3) as solver:
            results.append(solver.solve(random_puzzles(6), max_steps=40, breadth=3, seed=7))
    np.testing.assert_array_equal(results[0].preds, results[1].preds)
    np.testing.assert_array_equal(results[0].stats.nstep, results[1].stats.nstep)
    assert cpu_row_block(81, 512) > 1 and cpu_row_block(81, 512) < 64 <= cpu_row_block(81, 64)  # paper size only


def test_ort_tensorrt_provider_gets_a_batch_profile_and_other_providers_pass_through(onnx_path):
    backend = OrtBackend(onnx_path, profile=((1, 8, 32), 16, 4))
    name, options = backend._with_options("TensorrtExecutionProvider")
    assert name == "TensorrtExecutionProvider" and options["trt_engine_cache_enable"]
    assert options["trt_profile_min_shapes"] == "tokens:1x16,z_H:1x16x4,z_L:1x16x4"
    assert options["trt_profile_max_shapes"] == "tokens:32x16,z_H:32x16x4,z_L:32x16x4"
    assert backend._with_options("CUDAExecutionProvider") == "CUDAExecutionProvider"


def test_backend_rejects_use_before_activate_and_wrong_feeds(model):
    backend = TorchBackend(model)
    with pytest.raises(RuntimeError, match="not active"):
        backend.step({})
    with backend, pytest.raises(ValueError, match="tokens, z_H, z_L"):
        backend.step({"tokens": None})


def test_array_helpers_gather_and_concat_on_the_device(onnx_path, model):
    rows = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    for backend in (OrtBackend(onnx_path, threads=1), TorchBackend(model)):
        with backend:
            a = backend.upload(rows)
            np.testing.assert_array_equal(backend.download(backend.take(a, np.array([3, 1]))), rows[[3, 1]])
            np.testing.assert_array_equal(backend.download(backend.concat([a, backend.take(a, np.array([0]))])),
                                          np.concatenate([rows, rows[:1]]))


def foreign(onnx_path):
    """The test graph has no eqr metadata: a foreign .onnx, described by what flags would give."""
    return load_artifact(onnx_path, init_std=(1.0, 1.0), tol=1e-3)


def test_registry_lists_backends_and_auto_picks_an_available_one(onnx_path, tmp_path):
    assert backend_names() == ["tensorrt", "onnxruntime", "torch"]
    backend = create_backend("auto", foreign(onnx_path), "fp32")
    assert backend.name == "onnxruntime"  # no TensorRT here; an ONNX file has no torch weights
    with pytest.raises(EqRError, match="unknown backend 'tpu'"):
        create_backend("tpu", foreign(onnx_path), "fp32")
    with pytest.raises(EqRError, match="runs on a CUDA device|needs the model.s weights"):  # fp16 on the CPU
        create_backend("torch", foreign(onnx_path), "fp16")


def test_tensorrt_backend_reports_why_it_is_unavailable(onnx_path):
    from eqr.runtime.backends.trt_backend import TensorRTBackend

    reason = TensorRTBackend.unavailable_reason(foreign(onnx_path), "fp32")
    assert reason is not None and ("engine" in reason.lower() or "tensorrt" in reason.lower())


# --------------------------------------------------------------------------- the loop


def test_gated_solve_matches_fixed_depth_with_fewer_steps(torch_solver):
    puzzles = random_puzzles(8, seed=3)
    fixed = torch_solver.solve(puzzles, fixed_depth=48, breadth=2, seed=1)
    gated = torch_solver.solve(puzzles, max_steps=48, breadth=2, seed=1)
    assert (fixed.stats.nstep == 48).all() and set(fixed.stats.reasons()) == {"fixed_depth"}
    np.testing.assert_array_equal(gated.preds, fixed.preds)
    assert gated.steps.sum() < 0.6 * fixed.steps.sum()
    assert set(gated.stats.reasons()) <= {"tol", "stable"}


def test_compaction_shrinks_the_batch_and_counts_every_row_step(torch_solver):
    result = torch_solver.solve(random_puzzles(12, seed=5), max_steps=64, tol=1e-5, window=None, stats="trace")
    sizes = result.stats.batch_size
    assert sizes[0] == 12 and (np.diff(sizes) <= 0).all() and sizes[-1] < 12
    assert sizes.sum() == result.stats.total_steps == result.steps.sum()
    assert len(set(result.stats.nstep.tolist())) > 1  # puzzles settle after different step counts
    trace = result.residual_trace[:, 0]  # (P, K, N) -> (P, N)
    assert trace.shape == (12, result.stats.nstep.max())
    for p, n in enumerate(result.stats.nstep):
        assert np.isfinite(trace[p, :n]).all() and np.isnan(trace[p, n:]).all()
        assert (trace[p, n - 2:n] < 1e-5).all()  # patience 2: the last two residuals were below tol


def test_without_compaction_settled_rows_stay_in_the_batch_with_the_same_answers(torch_solver):
    puzzles = random_puzzles(6, seed=5)
    compacted = torch_solver.solve(puzzles, max_steps=40)
    kept = torch_solver.solve(puzzles, max_steps=40, compaction=False)
    np.testing.assert_array_equal(kept.preds, compacted.preds)
    np.testing.assert_array_equal(kept.stats.nstep, compacted.stats.nstep)
    assert (kept.stats.batch_size == 6).all() and compacted.stats.batch_size[-1] < 6


def test_answers_do_not_depend_on_batch_size_or_batch_composition(model):
    puzzles = random_puzzles(10, seed=9)
    with Solver.from_model(model) as whole, Solver.from_model(model, batch_size=3) as refilled:
        a = whole.solve(puzzles, breadth=2, seed=4)
        b = refilled.solve(puzzles, breadth=2, seed=4)
        c = whole.solve(puzzles[3:4], breadth=2, seed=4)
    np.testing.assert_array_equal(a.preds, b.preds)
    np.testing.assert_array_equal(a.stats.nstep, b.stats.nstep)
    assert b.stats.batch_size.max() == 3
    # puzzle 3 alone draws other initial states (puzzle index 0), so compare seeds explicitly
    with Solver.from_model(model) as solver:
        d = solver.solve(puzzles[3:4], breadth=2, seed=4)
    np.testing.assert_array_equal(c.preds, d.preds)


def test_non_finite_rows_are_marked_diverged_without_stopping_the_batch(model):
    z_H, z_L = z0(4)
    z_H[1, 0, 0] = np.nan
    z_L[2, 3, 1] = np.inf
    with TorchBackend(model) as backend:
        out, stats = solve(backend, random_puzzles(4), (z_H, z_L), SolveConfig(max_steps=30, tol=1e-3))
    assert stats.diverged.tolist() == [False, True, True, False]
    assert stats.nstep[1] == stats.nstep[2] == 1
    assert stats.converged[[0, 3]].all()


def test_diverged_trajectories_are_dropped_from_the_vote(model, monkeypatch):
    import eqr.runtime.solver as solver_module

    clean = solver_module.initial_states

    def poisoned(*args):  # trajectory (puzzle 0, breadth 0) starts from NaN
        z_H, z_L = clean(*args)
        puzzles, breadths = args[-2], args[-1]
        z_H[(puzzles == 0) & (breadths == 0)] = np.nan
        return z_H, z_L

    monkeypatch.setattr(solver_module, "initial_states", poisoned)
    with Solver.from_model(model) as solver:
        result = solver.solve(random_puzzles(2), breadth=3, aggregate="first", seed=0)
    assert result.chosen[0] == 1 and result.stats.diverged.tolist() == [True, False, False, False, False, False]
    assert not result.diverged.any() and result.agreement[0] == 1.0  # 2 of 2 valid trajectories agree


def test_agreement_stops_a_puzzle_early(torch_solver):
    puzzles = random_puzzles(4, seed=11)
    plain = torch_solver.solve(puzzles, breadth=4, seed=2, tol=1e-6, window=None)
    agreed = torch_solver.solve(puzzles, breadth=4, seed=2, tol=1e-3, window=None, agree=2)
    assert "not_launched" in agreed.stats.reasons()  # the first wave (2) agreed: the other 2 never ran
    assert agreed.steps.sum() < plain.steps.sum()
    np.testing.assert_array_equal(agreed.preds, plain.preds)


def test_q_halt_gating(model):
    halting = contractive_model()
    with torch.no_grad():
        halting.q_head.bias.fill_(5.0)  # q_halt = +5 for every state: "halt now"
    with Solver.from_model(halting) as solver:
        result = solver.solve(random_puzzles(3), q_halt=True, patience=2, tol=1e-9, window=None)
    assert (result.stats.nstep == 2).all() and set(result.stats.reasons()) == {"q_halt"}


def test_solve_config_rejects_bad_values():
    with pytest.raises(EqRError, match="max_steps"):
        SolveConfig(max_steps=0)
    with pytest.raises(EqRError, match="tol must be > 0"):
        SolveConfig(tol=-1.0)
    with pytest.raises(EqRError, match="unknown SolveConfig keys: patiense"):
        SolveConfig.from_dict({"patiense": 3})


def test_solver_rejects_puzzles_of_the_wrong_shape(torch_solver):
    with pytest.raises(EqRError, match=r"tokens must be \[P, 16\]"):
        torch_solver.solve(np.ones((2, 9), np.int32))


# --------------------------------------------------------------------------- aggregation


def test_aggregation_rules():
    preds = np.array([[[1, 1], [2, 2], [2, 2], [1, 1]],  # vote tie 2-2: the earliest answer ([1, 1]) wins
                      [[3, 3], [4, 4], [4, 4], [5, 5]]])  # (P=2, K=4, L=2)
    score = np.array([[0.5, 0.1, 0.3, 0.2], [0.4, 0.9, 0.8, 0.05]], np.float32)
    valid = np.array([[True, True, True, True], [True, True, True, False]])
    assert majority(preds, score, valid).tolist() == [0, 1]
    assert converged_top1(preds, score, valid).tolist() == [1, 0]  # row 1: the lowest score diverged
    assert first_valid(preds, score, ~np.eye(2, 4, dtype=bool)).tolist() == [1, 0]
    np.testing.assert_allclose(vote_share(preds, valid, np.array([0, 1])), [0.5, 2 / 3])
    assert set(aggregator_names()) == {"vote", "converged", "first"}


def test_breadth_beats_one_trajectory_on_a_model_with_several_attractors():
    """The bundled maze model settles on different answers from different starts on some puzzles,
    so the aggregators have something to choose between (the tiny test models have one fixed point)."""
    from eqr.model.load import load_model
    from eqr.tasks import get_task

    model = load_model("maze-small")
    task = get_task(model.metadata["task"]["name"], model.metadata["task"]["size"])
    puzzles = task.generate(48, 123, None)
    tokens = puzzles.inputs.astype(np.int32)
    with Solver.from_model(model) as solver:
        single = solver.solve(tokens, breadth=1, seed=0, max_steps=32)
        wide = solver.solve(tokens, breadth=8, seed=0, max_steps=32, aggregate="converged")
    exact = lambda r: (r.preds == puzzles.labels).all(axis=1).mean()  # noqa: E731
    assert (wide.agreement < 1).any()  # else this test could not tell breadth from one trajectory
    assert exact(wide) > exact(single)


# --------------------------------------------------------------------------- artifacts


def test_export_directory_loads_with_its_manifest_tolerance(model, tmp_path):
    from eqr.export import ExportConfig, export_model

    export_model(model, tmp_path / "tiny-eqr", ExportConfig(engine="never", check_steps=8))
    puzzles = random_puzzles(5, seed=17)
    with Solver.load(tmp_path / "tiny-eqr", backend="auto", threads=1) as exported, Solver.from_model(model) as eager:
        assert exported.backend.name == "onnxruntime"
        assert exported.default_tol == load_artifact(tmp_path / "tiny-eqr").tol["fp32"]
        a = exported.solve(puzzles, breadth=2, seed=3)
        b = eager.solve(puzzles, breadth=2, seed=3, tol=exported.default_tol)
    np.testing.assert_array_equal(a.preds, b.preds)
    np.testing.assert_array_equal(a.steps, b.steps)


def test_bad_artifacts_give_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EqRError, match="no manifest.json"):
        load_artifact(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with pytest.raises(EqRError, match="manifest"):
        load_artifact(tmp_path / "broken")
    (tmp_path / "x.onnx").write_bytes(b"not a model")
    with pytest.raises(EqRError, match="not a readable ONNX model"):
        load_artifact(tmp_path / "x.onnx")
    with pytest.raises(EqRError, match="no such file"):
        load_artifact(tmp_path / "missing.pt")


def test_checkpoint_artifact_runs_on_torch_by_default(model, tmp_path):
    from eqr.model.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "tiny.pt", model.config, model.state_dict())
    with Solver.load(tmp_path / "tiny.pt") as solver, Solver.from_model(model) as eager:
        assert solver.backend.name == "torch"
        np.testing.assert_array_equal(solver.solve(random_puzzles(3)).preds, eager.solve(random_puzzles(3)).preds)


# --------------------------------------------------------------------------- static shapes (CUDA-graph mode)


def test_static_shape_backends_freeze_and_refill_slots_with_the_same_answers(model):
    puzzles = random_puzzles(10, seed=23)
    z_H, z_L = z0(10)
    cfg = SolveConfig(max_steps=40, tol=1e-3)
    with TorchBackend(model) as dynamic, StaticTorchBackend(model) as static:
        a, stats_a = solve(dynamic, puzzles, (z_H, z_L), cfg, batch_size=4)
        b, stats_b = solve(static, puzzles, (z_H, z_L), cfg)  # the backend fixes the batch at 4
    np.testing.assert_array_equal(a["preds"], b["preds"])
    np.testing.assert_array_equal(stats_a.nstep, stats_b.nstep)
    assert (stats_b.batch_size == 4).all()


# --------------------------------------------------------------------------- accuracy (bundled models when present)


def accuracy_cases() -> list[str]:
    from eqr.contract.bundled import bundled_names

    return bundled_names() or ["tiny"]


# the official evaluation's fixed depth, the paper models' training cap
# (docs/algorithm.md#the-official-evaluation-protocol-and-the-runtime)
PAPER_EVAL_DEPTH = 16


@pytest.mark.parametrize("name", accuracy_cases())
def test_gating_keeps_fixed_depth_accuracy_and_breadth_does_not_hurt(name, model):
    """The paper's protocol runs every puzzle D steps; gating must match its accuracy for fewer
    steps, and breadth with `converged` selection must not lose to a single trajectory. On a
    bundled model accuracy is against the task's labels; on the tiny stand-in, against the
    answer a deep fixed-depth run settles on."""
    if name == "tiny":
        solver = Solver.from_model(model)
        puzzles = random_puzzles(16, seed=29)
        with Solver.from_model(model) as deep:
            labels = deep.solve(puzzles, fixed_depth=96, seed=100).preds
        depth = 32
    else:
        solver = Solver.load(name, backend="torch")
        task = solver.task
        generated = task.generate(32, seed=12345)
        puzzles, labels = generated.inputs.astype(np.int32), generated.labels
        depth = max(PAPER_EVAL_DEPTH, solver.artifact.config.halt_max_steps)
    with solver:
        fixed = solver.solve(puzzles, fixed_depth=depth, seed=0)
        gated = solver.solve(puzzles, max_steps=depth, seed=0)
        single = solver.solve(puzzles, max_steps=depth, breadth=1, seed=1)
        wide = solver.solve(puzzles, max_steps=depth, breadth=4, aggregate="converged", seed=1)
    accuracy = lambda r: float((r.preds == labels).all(axis=1).mean())  # noqa: E731
    assert accuracy(gated) >= accuracy(fixed)
    assert gated.steps.sum() < fixed.steps.sum()
    assert accuracy(wide) >= accuracy(single)


def test_solver_knows_its_task_from_the_artifact(model, tmp_path):
    from eqr.model.checkpoint import save_checkpoint
    from eqr.tasks import get_task

    save_checkpoint(tmp_path / "tiny.pt", model.config, model.state_dict(), metadata={"task": {"name": "sudoku", "size": 4}})
    task = get_task("sudoku", 4)
    lines = task.format(task.generate(3, seed=5).inputs)
    with Solver.load(tmp_path / "tiny.pt") as solver:
        assert (solver.task.name, solver.task.size) == ("sudoku", 4)
        tokens = solver.task.parse(lines)
        assert tokens.shape == (3, 16) and tokens.dtype == np.int32
        answers = solver.task.format(solver.solve(tokens).preds)
    assert len(answers) == 3 and all(len(a) == 16 for a in answers)
    assert task.parse(task.format(tokens)).tolist() == tokens.tolist()  # format and parse round-trip
    with pytest.raises(EqRError, match="line 1: "):
        task.parse([lines[0], "12.3"])
    assert Solver.from_model(model).task.name == "sudoku"  # 16 tokens, vocab 6: only 4x4 Sudoku fits


def test_a_step_graph_copied_out_of_its_export_behaves_like_the_directory(tmp_path):
    """Each graph carries its manifest and precision: a copy (even renamed) has the export's init
    std, tol and task, gives its answers for a seed, and model.step.int8.onnx runs int8."""
    import shutil

    from eqr.calibration.record import int8_calibration
    from eqr.export import ExportConfig, export_model

    config = ExportConfig(precision=("int8",), engine="never", check_batch=2, check_steps=6)
    model = contractive_model()
    model.metadata = {"task": {"name": "sudoku", "size": 4}}
    export_model(model, tmp_path / "tiny-eqr", config, calibrate=int8_calibration(model, config))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "tiny-eqr" / "model.step.int8.onnx", alone / "model.step.int8.onnx")
    shutil.copy(tmp_path / "tiny-eqr" / "model.step.int8.onnx", alone / "renamed.onnx")
    shutil.copy(tmp_path / "tiny-eqr" / "model.step.onnx", alone / "model.step.onnx")
    shutil.copy(tmp_path / "tiny-eqr" / "model.step.int8.cpu.onnx", alone / "model.step.int8.cpu.onnx")
    directory = load_artifact(tmp_path / "tiny-eqr")
    for name, precision in (("model.step.onnx", "fp32"), ("model.step.int8.onnx", "int8"), ("renamed.onnx", "int8")):
        copy = load_artifact(alone / name)
        assert (copy.kind, copy.precision, set(copy.onnx)) == ("onnx", precision, {precision})
        assert (copy.init_std, copy.tol[precision], copy.task) == (directory.init_std, directory.tol[precision],
                                                                    directory.task)
    puzzles = random_puzzles(4, seed=21)
    # on the CPU provider the directory's int8 runs its CPU graph: a copy of that graph behaves the same
    for name, precision, runs in (("model.step.onnx", "fp32", "fp32"), ("model.step.int8.cpu.onnx", "int8", "int8-cpu")):
        with Solver.load(alone / name, threads=1) as copy, \
                Solver.load(tmp_path / "tiny-eqr", precision=precision, threads=1) as whole:
            assert (copy.precision, copy.default_tol) == (runs, whole.default_tol) and whole.precision == runs
            a, b = copy.solve(puzzles, breadth=2, seed=4), whole.solve(puzzles, breadth=2, seed=4)
        np.testing.assert_array_equal(a.preds, b.preds)
        np.testing.assert_array_equal(a.steps, b.steps)
