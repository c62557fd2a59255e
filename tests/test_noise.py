"""Path noise at inference (`--noise SIGMA`): sigma * N(0, 1) at every damped update.

What is reproducible: the noise of step n of trajectory (puzzle i, breadth k) under seed s is a
function of (s, i, k, n) and sigma alone, so a noisy answer does not depend on the batch size,
compaction, static slots or the other requests in a Scheduler; torch and ONNX Runtime add the
same host-drawn noise, so they agree within float tolerance. Noise 0 runs the noise-free graph.
"""
from __future__ import annotations

from concurrent.futures import wait
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config
from runtime_helpers import StaticTorchBackend, contractive_model, random_puzzles, solver_for

from eqr.commands import cli
from eqr.contract.artifact import INPUT_NAMES, NOISE_INPUT, NOISY_KEY, PRECISIONS, graph_feeds, io_contract
from eqr.contract.errors import EqRError
from eqr.export import ExportConfig
from eqr.export.exporter import export_model
from eqr.export.onnx_graph import lint, session
from eqr.model.network import EqRModel
from eqr.runtime import Scheduler, SolveConfig, Solver
from eqr.runtime.backends.base import Backend
from eqr.runtime.backends.ort_backend import OrtBackend
from eqr.runtime.path_noise import draw_noise

SIGMA = 0.01
SUDOKU4 = {"task": {"name": "sudoku", "size": 4}}
FAST = dict(engine="never", check_batch=2, check_steps=4)


@pytest.fixture(scope="module")
def model() -> EqRModel:
    m = contractive_model()
    m.metadata = dict(SUDOKU4)
    return m


@pytest.fixture(scope="module")
def noisy_export(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noise") / "noisy-eqr"
    export_model(model, out, ExportConfig(precision=("fp16",), noise=True, **FAST))
    return out


def _noise(model: EqRModel, B: int, sigma: float = SIGMA, seed: int = 0) -> torch.Tensor:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    return sigma * torch.randn(B, c.updates_per_step, c.seq_len, c.hidden_size, generator=g)  # [B, U, L, D]


# --------------------------------------------------------------------------- the model


def test_explicit_noise_is_the_generator_path_with_the_draws_written_out(model) -> None:
    """step(noise=sigma, generator) draws eps update by update; the same draws passed as the
    [B, U, L, D] tensor give the same step bit for bit (one code path), and zeros give noise 0's."""
    B, c = 3, model.config
    state = model.initial_state(B, torch.Generator().manual_seed(1))
    tokens = torch.from_numpy(random_puzzles(B))
    drawn = model.step(state, tokens, noise=SIGMA, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    eps = torch.stack([torch.randn((B, c.seq_len, c.hidden_size), generator=g) for _ in range(c.updates_per_step)], 1)
    given = model.step(state, tokens, noise=SIGMA * eps)
    assert torch.equal(drawn.state.z_H, given.state.z_H) and torch.equal(drawn.state.z_L, given.state.z_L)
    zero = model.step(state, tokens, noise=torch.zeros_like(eps))
    free = model.step(state, tokens)
    assert torch.equal(zero.state.z_H, free.state.z_H) and torch.equal(zero.logits, free.logits)
    assert not torch.equal(given.state.z_H, free.state.z_H)
    with pytest.raises(ValueError, match=r"noise must be \[B, U, L, D\]"):
        model.step(state, tokens, noise=eps[:, 1:])


def test_noisy_graph_update_statistics_match_the_torch_models() -> None:
    """One z_L and one z_H update per step (H_cycles = L_cycles = 1): the final z_L is the noisy
    update itself, so noisy minus noise-free z_L_out is exactly that update's noise. Through the
    noisy ONNX graph with host draws and through EqRModel.step(noise=sigma) alike, it has mean 0
    and std sigma."""
    model = EqRModel(tiny_config(H_cycles=1, L_cycles=1), seed=0).eval()
    B, L, D = 64, model.config.seq_len, model.config.hidden_size
    state = model.initial_state(B, torch.Generator().manual_seed(2))
    tokens = torch.from_numpy(random_puzzles(B))
    with torch.no_grad():
        free = model.step(state, tokens).state.z_L
        torch_diff = (model.step(state, tokens, noise=SIGMA, generator=torch.Generator().manual_seed(3)).state.z_L
                      - free).numpy()
    from eqr.export.from_model import OnnxFromModel

    runner = session(OnnxFromModel(model, 17, noisy=True)())
    keys = np.stack([np.zeros(B, np.int64), np.arange(B), np.zeros(B, np.int64)], 1)
    noise = draw_noise(keys, np.ones(B, np.int64), np.full(B, SIGMA), (2, L, D))  # (B, U, L, D)
    feeds = graph_feeds(tokens.numpy(), state.z_H.numpy(), state.z_L.numpy(), noise=noise)
    graph_diff = runner.run(["z_L_out"], feeds)[0] - runner.run(["z_L_out"], feeds | {NOISE_INPUT: 0 * noise})[0]
    np.testing.assert_allclose(graph_diff, noise[:, 0], atol=1e-6)  # update 0 is the z_L update
    for diff in (torch_diff, graph_diff):  # B*L*D = 16384 samples: std within 3%, mean within 4 SE
        assert abs(diff.std() / SIGMA - 1) < 0.03
        assert abs(diff.mean()) < 4 * SIGMA / np.sqrt(diff.size)


def test_host_draws_are_a_pure_function_of_seed_puzzle_trajectory_and_step() -> None:
    keys = np.array([[5, 0, 0], [5, 0, 1], [5, 1, 0], [6, 0, 0]], np.int64)
    shape = (6, 4, 8)  # (U, L, D)
    a = draw_noise(keys, np.array([1, 1, 1, 1]), np.full(4, SIGMA), shape)
    assert len({a[r].tobytes() for r in range(4)}) == 4  # each key its own stream
    alone = draw_noise(keys[2:3], np.array([1]), np.array([SIGMA]), shape)
    np.testing.assert_array_equal(alone[0], a[2])  # no dependence on the other rows
    later = draw_noise(keys[:1], np.array([2]), np.array([SIGMA]), shape)
    assert not np.array_equal(later[0], a[0])  # step 2 draws afresh
    scaled = draw_noise(keys[:1], np.array([1]), np.array([2 * SIGMA]), shape)
    np.testing.assert_allclose(scaled[0], 2 * a[0], rtol=1e-6)  # sigma scales one draw
    assert not draw_noise(keys, np.ones(4), np.zeros(4), shape).any()  # sigma 0: zeros
    many = draw_noise(np.zeros((1, 3), np.int64), np.array([1]), np.array([SIGMA]), (6, 64, 64))[0]
    for u in range(6):  # every update's slice: N(0, sigma^2)
        assert abs(many[u].std() / SIGMA - 1) < 0.05 and abs(many[u].mean()) < 4 * SIGMA / 64


# --------------------------------------------------------------------------- the runtime


class _FeedSpy(Backend):
    """Wraps a backend and records which steps were fed noise."""

    name = "spy"

    def __init__(self, inner: Backend) -> None:
        super().__init__()
        self.inner, self.noisy_steps = inner, []
        self.noise_shape = inner.noise_shape

    def activate_impl(self) -> None:
        self.inner.activate()

    def deactivate_impl(self) -> None:
        self.inner.deactivate()

    def step_impl(self, feeds):
        self.noisy_steps.append(NOISE_INPUT in feeds)
        return self.inner.step(feeds)

    def upload(self, array):
        return self.inner.upload(array)

    def download(self, array):
        return self.inner.download(array)

    def take(self, array, rows):
        return self.inner.take(array, rows)

    def concat(self, arrays):
        return self.inner.concat(arrays)


def test_noise_zero_runs_the_noise_free_step_and_noise_changes_the_trajectory(model) -> None:
    tokens = random_puzzles(3)
    free = solver_for(model, spy_free := _FeedSpy(Solver.from_model(model).backend))
    with free:
        a = free.solve(tokens, breadth=2, seed=1, max_steps=6)
    assert spy_free.noisy_steps and not any(spy_free.noisy_steps)
    noisy = solver_for(model, spy_noisy := _FeedSpy(Solver.from_model(model).backend))
    with noisy:
        b = noisy.solve(tokens, breadth=2, seed=1, max_steps=6, noise=SIGMA)
    assert spy_noisy.noisy_steps and all(spy_noisy.noisy_steps)
    assert not np.array_equal(a.residual, b.residual)


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.preds, b.preds)
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_array_equal(a.residual, b.residual)


def test_noisy_answers_do_not_depend_on_batch_size_compaction_slots_or_neighbours(model) -> None:
    """Puzzles 0 and 1 of a run: the same answers, steps and residuals whether they share the
    batch with puzzle 2 or not, in a batch of 1 or of all, compacted or in static slots."""
    tokens = random_puzzles(3)
    options = dict(breadth=2, seed=4, max_steps=12, noise=0.05)
    with Solver.from_model(model) as solver:
        everything = solver.solve(tokens, **options)
        pair = solver.solve(tokens[:2], **options)
    with Solver.from_model(model, batch_size=1) as solver:
        one_by_one = solver.solve(tokens[:2], **options)
    with solver_for(model, StaticTorchBackend(model, batch=3)) as solver:
        slots = solver.solve(tokens[:2], **options)
    first_two = everything.stats.residual[:4]
    for result in (pair, one_by_one, slots):
        np.testing.assert_array_equal(result.stats.residual, first_two)
        np.testing.assert_array_equal(result.preds, everything.preds[:2])
        np.testing.assert_array_equal(result.stats.nstep, everything.stats.nstep[:4])


def test_torch_and_onnxruntime_add_the_same_noise(model, noisy_export) -> None:
    tokens = random_puzzles(4)
    options = dict(breadth=2, seed=3, fixed_depth=6, noise=SIGMA, stats="trace")
    with Solver.from_model(model) as solver:
        reference = solver.solve(tokens, **options)
        free = solver.solve(tokens, **(options | {"noise": 0.0}))
    with Solver.load(noisy_export, backend="onnxruntime") as solver:
        ort = solver.solve(tokens, **options)
    np.testing.assert_allclose(ort.stats.residual_trace, reference.stats.residual_trace, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(ort.preds, reference.preds)
    gap = np.abs(free.stats.residual_trace - reference.stats.residual_trace).max()
    assert gap > 1e3 * np.abs(ort.stats.residual_trace - reference.stats.residual_trace).max()  # noise, not round-off


def test_noise_zero_on_an_export_keeps_the_noise_free_graph_and_its_answers(model, noisy_export, tmp_path) -> None:
    """export --noisy only adds files: model.step.onnx's graph is the one an export without it writes,
    and ONNX Runtime answers noise 0 with it bit for bit."""
    plain = tmp_path / "plain-eqr"
    export_model(model, plain, ExportConfig(**FAST))
    name = PRECISIONS["fp32"].onnx
    assert onnx.load(str(plain / name)).graph == onnx.load(str(noisy_export / name)).graph
    tokens = random_puzzles(3)
    results = []
    for root in (plain, noisy_export):
        with Solver.load(root, backend="onnxruntime") as solver:
            results.append(solver.solve(tokens, breadth=2, seed=1, max_steps=8))
    _same(*results)


def test_noisy_graphs_have_the_noise_input_lint_clean_and_are_in_the_manifest(model, noisy_export) -> None:
    from eqr.contract.artifact import read_manifest

    c = model.config
    manifest = read_manifest(noisy_export)
    for precision in ("fp32", "fp16"):
        entry = manifest["precisions"][precision][NOISY_KEY]
        assert entry["onnx"] == PRECISIONS[precision].noisy_onnx and entry["updates"] == c.updates_per_step
        graph = onnx.load(str(noisy_export / entry["onnx"]))
        names = [i.name for i in graph.graph.input]
        assert names == [*INPUT_NAMES, NOISE_INPUT]
        noise = io_contract(c.seq_len, c.hidden_size, c.vocab_size, c.updates_per_step)["inputs"][-1]
        assert noise == {"name": NOISE_INPUT, "dtype": "float32", "shape": ["B", c.updates_per_step, c.seq_len,
                                                                           c.hidden_size]}
        report = lint(graph.SerializeToString(), c.seq_len, c.hidden_size, c.vocab_size, updates=c.updates_per_step)
        assert report["passed"], report
    assert manifest["precisions"]["fp32"][NOISY_KEY]["parity"]["max_scaled"]["noise"] < 1e-4
    assert [i.name for i in onnx.load(str(noisy_export / PRECISIONS["fp32"].onnx)).graph.input] == list(INPUT_NAMES)


def test_fp16_noisy_graph_runs_and_stays_close(model, noisy_export) -> None:
    tokens = random_puzzles(2)
    options = dict(seed=2, fixed_depth=4, noise=SIGMA)
    with Solver.load(noisy_export, backend="onnxruntime", precision="fp16") as solver:
        half = solver.solve(tokens, **options)
    with Solver.from_model(model) as solver:
        full = solver.solve(tokens, **options)
    np.testing.assert_allclose(half.residual, full.residual, rtol=0.05)


def test_a_missing_noisy_graph_is_one_line_naming_the_export_flag(model, tmp_path) -> None:
    plain = tmp_path / "plain-eqr"
    export_model(model, plain, ExportConfig(**FAST))
    with Solver.load(plain, backend="onnxruntime") as solver:
        with pytest.raises(EqRError, match=r"no model\.step\.noisy\.onnx; re-export with `eqr export MODEL --noisy"):
            solver.solve(random_puzzles(1), noise=SIGMA)
        solver.solve(random_puzzles(1), max_steps=2)  # noise-free still runs
    with pytest.raises(EqRError, match="noise must be >= 0"):
        SolveConfig(noise=-0.1)
    result = CliRunner().invoke(cli, ["solve", str(plain), "--noise", "0.01"], input="2..1.........42.\n")
    assert result.exit_code == 2
    assert "re-export with `eqr export MODEL --noisy" in result.output and "Traceback" not in result.output


def test_cli_solve_noise_matches_the_library(model, noisy_export) -> None:
    import json

    line = "2..1.........42."
    result = CliRunner().invoke(cli, ["solve", str(noisy_export), "--backend", "onnxruntime", "--noise", "0.02",
                                      "--fixed-depth", "5", "--seed", "3", "--json", "-q"], input=line + "\n")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    with Solver.load(noisy_export, backend="onnxruntime") as solver:
        expected = solver.solve(solver.task.parse([line]), seed=3, fixed_depth=5, noise=0.02)
    assert record["residual"] == pytest.approx(float(expected.residual[0]), rel=1e-6)


def test_scheduler_noisy_request_equals_solver_solve_whatever_shares_the_batch(model) -> None:
    tokens = random_puzzles(4)
    cfg = SolveConfig(max_steps=10, tol=1e-3)
    with Solver.from_model(model) as solver:
        expected = solver.run(tokens[:2], cfg.replace(noise=0.05), breadth=2, seed=7)
        expected_free = solver.run(tokens[2:], cfg, breadth=2, seed=8)
    solver = solver_for(model)
    with Scheduler(solver, cfg, batch_size=5, breadth=2) as scheduler:
        futures = [scheduler.submit(tokens[2:], seed=8), scheduler.submit(tokens[:2], seed=7, noise=0.05),
                   scheduler.submit(tokens[1:3], seed=9, noise=0.2)]
        wait(futures)
    _same(futures[1].result(), expected)
    _same(futures[0].result(), expected_free)
    with pytest.raises(EqRError, match="noise must be >= 0"):
        with Scheduler(solver_for(model), cfg) as scheduler:
            scheduler.submit(tokens[:1], noise=-1.0)


# --------------------------------------------------------------------------- TensorRT (fake_cuda on the CPU)


@pytest.fixture
def fake_trt(monkeypatch, noisy_export, tmp_path):
    """(plain engine, noisy engine): fake_cuda's TensorRT stand-in, whose engines run the ONNX graphs."""
    from fake_cuda import FakeCudart, fake_tensorrt

    from eqr.runtime.backends import trt_backend

    cudart = FakeCudart()
    trt = fake_tensorrt(cudart, (1, 4, 8))
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "trt_logger", lambda: None)
    monkeypatch.setattr(trt_backend, "check_engine", lambda path, device=0: {})
    engines = []
    for name in (PRECISIONS["fp32"].onnx, PRECISIONS["fp32"].noisy_onnx):
        engine = tmp_path / name.replace(".onnx", ".fake.engine")
        engine.write_bytes((noisy_export / name).read_bytes())
        engines.append(engine)
    return engines


@pytest.mark.parametrize("cuda_graphs, static", [(True, True), (False, False)])
def test_tensorrt_feeds_the_noise_input_and_equals_onnxruntime(model, noisy_export, fake_trt, cuda_graphs, static):
    from eqr.runtime import solve
    from eqr.runtime.backends.trt_backend import TensorRTBackend

    plain, noisy = fake_trt
    c = model.config
    shape = (c.updates_per_step, c.seq_len, c.hidden_size)
    tokens = random_puzzles(7, seed=5)  # more rows than the 4 slots: refills under noise
    z0 = tuple(0.1 * np.random.default_rng(1).standard_normal((2, 7, 16, 16)).astype(np.float32))
    keys = np.stack([np.full(7, 3), np.arange(7), np.zeros(7, np.int64)], 1)
    cfg = SolveConfig(max_steps=12, tol=1e-4, stats="trace", noise=SIGMA)
    runs = []
    for backend in (OrtBackend(noisy_export / PRECISIONS["fp32"].onnx, threads=1,
                               noisy_path=noisy_export / PRECISIONS["fp32"].noisy_onnx, noise_shape=shape),
                    TensorRTBackend(plain, batch_size=4, cuda_graphs=cuda_graphs, static_shapes=static,
                                    noisy_engine_path=noisy, noise_shape=shape)):
        with backend:
            runs.append(solve(backend, tokens, z0, cfg, batch_size=4, noise_keys=keys))
    (want, want_stats), (got, stats) = runs
    np.testing.assert_array_equal(got["preds"], want["preds"])
    np.testing.assert_array_equal(stats.residual_trace, want_stats.residual_trace)
    free = TensorRTBackend(plain, batch_size=4, cuda_graphs=cuda_graphs, static_shapes=static)
    assert free.noise_shape is None
    with free, pytest.raises(EqRError, match="no noisy step graph"):
        solve(free, tokens, z0, cfg, batch_size=4, noise_keys=keys)


# --------------------------------------------------------------------------- serving


def test_served_model_takes_a_noise_parameter_and_a_per_request_noise_input(noisy_export, tmp_path) -> None:
    from eqr.serving.protocol import Rejected, parse_request
    from eqr.serving.repository import ServeConfig, config_pbtxt, write_repository
    from eqr.tasks import get_task

    task = get_task("sudoku", 4)
    line = np.array(["2..1.........42."], np.object_)
    assert parse_request({"puzzle": line, "noise": np.array([0.02], np.float32)}, task, 6).noise == pytest.approx(0.02)
    assert parse_request({"puzzle": line}, task, 6).noise is None  # the model's default then
    for bad, reason in ((np.array([-1.0], np.float32), "value"), (np.array([np.inf], np.float32), "value"),
                        (np.array([1], np.int32), "dtype")):
        with pytest.raises(Rejected) as caught:
            parse_request({"puzzle": line, "noise": bad}, task, 6)
        assert caught.value.reason == reason
    cfg = ServeConfig(noise=0.01)
    assert ServeConfig.from_parameters(cfg.parameters(), "eqr").noise == 0.01
    text = config_pbtxt(cfg, 16, "sudoku:4")
    assert 'name: "noise" data_type: TYPE_FP32 dims: [ 1 ] optional: true' in text
    assert 'key: "noise" value: { string_value: "0.01" }' in text
    write_repository(noisy_export, tmp_path / "repo", cfg)  # has the noisy graph: fine
    plain = tmp_path / "plain-eqr"
    export_model(contractive_model(), plain, ExportConfig(**FAST))
    with pytest.raises(EqRError, match="re-export with `eqr export MODEL --noisy"):
        write_repository(plain, tmp_path / "repo2", cfg)


# --------------------------------------------------------------------------- eqr report, eqr bench


def _report(export: Path, out: Path, *extra: str) -> dict:
    import json

    args = ["report", str(export), "--generate", "4", "--precision", "fp32", "--backend", "onnxruntime", "--depths",
            "2,4", "--breadth", "1", "--max-steps", "4", "--out", str(out), "-q", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code in (0, 1), result.output
    return json.loads((out / "report.json").read_text())


def test_report_runs_every_solve_with_the_noise_and_records_it(noisy_export, tmp_path) -> None:
    free = _report(noisy_export, tmp_path / "free")
    noisy = _report(noisy_export, tmp_path / "noisy", "--noise", "0.05")
    assert noisy["meta"]["config"]["noise"] == 0.05 and free["meta"]["config"]["noise"] == 0.0
    curves = [r["runs"]["onnxruntime-fp32"]["convergence"]["residual_curve"] for r in (free, noisy)]
    assert curves[0] != curves[1]


def test_bench_noise_reaches_the_runtime_rule_and_the_export() -> None:
    from eqr.bench.config import BenchConfig

    config = BenchConfig(model="m", measurements=(), noise=0.01)
    assert config.rule_overrides()["noise"] == 0.01
    assert "noise" not in BenchConfig(model="m", measurements=()).rule_overrides()
    with pytest.raises(EqRError, match="--noise must be >= 0"):
        BenchConfig(model="m", measurements=(), noise=-1.0)


def test_eqr_engine_builds_the_noisy_graphs_engine_beside_the_plain_one(noisy_export, monkeypatch, tmp_path) -> None:
    import json
    import shutil

    from fake_cuda import fake_engine_builds

    from eqr.export.tensorrt import GpuInfo
    from eqr.runtime.resolve import load_artifact

    gpu = GpuInfo("Orin", "8.7", sm_count=8, integrated=True)
    calls = fake_engine_builds(monkeypatch, tmp_path / "cache", gpu)
    export = Path(shutil.copytree(noisy_export, tmp_path / "noisy-eqr"))
    result = CliRunner().invoke(cli, ["engine", str(export), "--precision", "fp32", "--json", "-q"])
    assert result.exit_code == 0, result.output
    engines = json.loads(result.stdout)["engines"]
    assert set(engines) == {"fp32", "fp32.noisy"} and engines["fp32.noisy"][NOISY_KEY] is True
    noisy = engines["fp32.noisy"]["engine"]
    assert noisy == f"model.step.fp32.noisy.{gpu.tag}.trt10.3.0.engine"
    assert (export / noisy).read_bytes() == (export / PRECISIONS["fp32"].noisy_onnx).read_bytes()  # the fake's plan
    c = contractive_model().config
    U = c.updates_per_step
    assert calls[1]["config"]["profiles"][0][NOISE_INPUT] == tuple((b, U, 16, 16) for b in (1, 64, 256))
    assert NOISE_INPUT not in calls[0]["config"]["profiles"][0]  # the plain engine's profile is unchanged
    artifact = load_artifact(export)
    assert artifact.engines["fp32"].name == engines["fp32"]["engine"] and artifact.noisy_engines["fp32"].name == noisy


def test_onnxruntime_scheduler_mixing_noisy_and_noise_free_requests_changes_neither(noisy_export) -> None:
    """A noise-free request in a batch that runs the noisy graph gets zeros there; on ONNX
    Runtime's CPU provider that equals the noise-free graph bit for bit (docs/algorithm.md#path-noise
    says where this is only within round-off)."""
    tokens = random_puzzles(4, seed=9)
    with Solver.load(noisy_export, backend="onnxruntime", threads=1) as solver:
        cfg = solver.config(max_steps=10)
        free = solver.run(tokens[:2], cfg, breadth=2, seed=1)
        noisy = solver.run(tokens[2:], cfg.replace(noise=0.03), breadth=2, seed=2)
    solver = Solver.load(noisy_export, backend="onnxruntime", threads=1)
    with Scheduler(solver, cfg, batch_size=8, breadth=2) as scheduler:
        futures = [scheduler.submit(tokens[:2], seed=1), scheduler.submit(tokens[2:], seed=2, noise=0.03)]
        wait(futures)
    _same(futures[0].result(), free)
    _same(futures[1].result(), noisy)


@pytest.mark.parametrize("pos", ["rope", "rope2d"])
def test_attention_models_noisy_graphs_lint_clean(pos: str) -> None:
    from eqr.export.fp16 import Fp16FromOnnx
    from eqr.export.from_model import OnnxFromModel

    model = contractive_model(mlp_t=False, pos_encodings=pos)
    c = model.config
    fp32 = OnnxFromModel(model, 17, noisy=True)()
    for graph in (fp32, Fp16FromOnnx(fp32)()):
        report = lint(graph.SerializeToString(), c.seq_len, c.hidden_size, c.vocab_size, updates=c.updates_per_step)
        assert report["passed"], report
