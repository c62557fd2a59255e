"""The torch backend's GPU fast path, tested on the CPU: device selection, bf16 with fp32 norms,
slots mode, and CUDA-graph capture through an injected fake (runtime/backends/torch_backend.py)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from runtime_helpers import contractive_model, random_puzzles, solver_for

from eqr.commands import cli
from eqr.contract.errors import EqRError
from eqr.model import network
from eqr.runtime import SolveConfig, Solver, solve
from eqr.runtime.backends import torch_backend
from eqr.runtime.backends.registry import create_backend, device_option, parse_device
from eqr.runtime.backends.torch_backend import TorchBackend, checkpoint_artifact, resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA is told")


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("spec, parsed", [(None, "auto"), ("AUTO", "auto"), ("cpu", "cpu"), ("cuda", "cuda"),
                                          ("cuda:1", "cuda:1"), (2, "cuda:2"), ("3", "cuda:3"), (" Cuda:0 ", "cuda:0")])
def test_device_specs_parse_without_torch(spec, parsed):
    assert parse_device(spec) == parsed


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "mps", True, 1.5, ""])
def test_a_bad_device_spec_is_one_line(spec):
    with pytest.raises(EqRError, match="device must be auto, cpu, cuda, cuda:N or an index N") as e:
        parse_device(spec)
    assert "\n" not in str(e.value)


def test_devices_as_each_backend_takes_them():
    assert device_option("torch", "cuda:1") == "cuda:1"
    assert device_option("torch", "auto") == "auto"
    assert device_option("tensorrt", "cuda:2") == 2 and device_option("tensorrt", "cuda") == 0
    with pytest.raises(EqRError, match="does not apply to the tensorrt backend, which takes --device cuda"):
        device_option("tensorrt", "cpu")
    with pytest.raises(EqRError, match="does not apply to the onnxruntime backend, which picks its own device"):
        device_option("onnxruntime", "cuda:0")


@no_cuda
def test_cuda_asked_for_without_cuda_is_one_clear_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")  # no GPU here: auto is the CPU
    for spec in ("cuda", "cuda:1", 0):
        with pytest.raises(EqRError, match=r"asked for but CUDA is not available: .*use --device cpu") as e:
            resolve_device(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(EqRError, match="CUDA is not available"):
        Solver.load("sudoku-small", backend="torch", device="cuda:1")


def test_device_indices_are_checked_against_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device(0) == torch.device("cuda", 0)
    with pytest.raises(EqRError, match=r"device cuda:1 asked for but torch sees 1 CUDA device\(s\) \(cuda:0..cuda:0\)"):
        resolve_device("cuda:1")


def test_auto_with_a_device_tries_only_backends_that_run_there():
    backend = create_backend("auto", checkpoint_artifact("sudoku-small"), "fp32", device="cpu")
    assert backend.name == "torch" and backend.device == torch.device("cpu")


@no_cuda
def test_eqr_solve_and_bench_device_flags():
    runner = CliRunner()
    ok = runner.invoke(cli, ["solve", "sudoku-small", "--backend", "torch", "--device", "cpu", "--json", "-q"],
                       input="1234341221434321\n")
    assert ok.exit_code == 0, ok.output
    assert '"device": "cpu"' in ok.output
    absent = runner.invoke(cli, ["solve", "sudoku-small", "--backend", "torch", "--device", "cuda:1", "-q"],
                           input="1234341221434321\n")
    assert absent.exit_code == 2
    assert absent.output.count("\n") == 1 and "CUDA is not available" in absent.output
    bench = runner.invoke(cli, ["bench", "--backend", "torch", "--device", "cuda", "--only", "host_overhead", "-q"])
    assert bench.exit_code == 2 and "CUDA is not available" in bench.output
    wrong = runner.invoke(cli, ["bench", "--device", "cuda", "-q"])  # the onnxruntime side picks its own
    assert wrong.exit_code == 2 and "--device cuda goes with --backend torch" in wrong.output


# --------------------------------------------------------------------------- half precision, norms in fp32


def test_bf16_runs_matmuls_in_bf16_and_the_norms_and_state_in_fp32(monkeypatch):
    norm_dtypes, linear_dtypes = [], []
    real_norm = network.rms_norm

    def recording_norm(x, eps):
        out = real_norm(x, eps)
        norm_dtypes.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(network, "rms_norm", recording_norm)
    backend = TorchBackend(loader="sudoku-6x6", dtype="bf16")
    with backend:
        hooks = [m.register_forward_hook(lambda m, i, o: linear_dtypes.append(o.dtype))
                 for m in backend.graph.model.modules() if isinstance(m, network.Linear)]
        L, D = backend.graph.model.config.seq_len, backend.graph.model.config.hidden_size
        feeds = {"tokens": torch.ones(2, L, dtype=torch.int32), "z_H": torch.randn(2, L, D), "z_L": torch.randn(2, L, D)}
        outputs = backend.step(feeds)
        assert backend.describe()["dtype"] == "bf16"
        for hook in hooks:
            hook.remove()
    assert norm_dtypes and all(d == (torch.float32, torch.float32) for d in norm_dtypes)  # in and out: fp32
    assert linear_dtypes and set(linear_dtypes) == {torch.bfloat16}  # every matmul in bf16
    assert outputs["z_H_out"].dtype == outputs["z_L_out"].dtype == torch.float32
    assert outputs["logits"].dtype == torch.float32 and outputs["preds"].dtype == torch.int32


def test_bf16_answers_agree_with_fp32_on_a_bundled_model():
    # measured on this CPU (256 sudoku-6x6 puzzles, fixed depth 8, seed 11): 96.9% of answers and
    # 99.8% of cells identical, accuracy 95.7% fp32 vs 96.5% bf16; asserted with a 4-point margin
    answers = {}
    for dtype in ("fp32", "bf16"):
        with Solver.load("sudoku-6x6", backend="torch", batch_size=128, dtype=dtype) as solver:
            data = solver.task.generate(256, seed=11)
            answers[dtype] = solver.solve(data.inputs, fixed_depth=8).preds
    same = (answers["fp32"] == answers["bf16"]).all(axis=1).mean()
    cells = (answers["fp32"] == answers["bf16"]).mean()
    correct = {k: ((v == data.labels) | (data.labels == 0)).all(axis=1).mean() for k, v in answers.items()}
    assert same >= 0.93 and cells >= 0.99, (same, cells)
    assert correct["bf16"] >= correct["fp32"] - 0.04, correct


def test_precision_fp16_is_fp16_and_int8_is_refused():
    backend = TorchBackend(loader="sudoku-small", precision="fp16")
    assert backend.half is torch.float16
    with pytest.raises(EqRError, match="runs fp32 and fp16"):
        TorchBackend(loader="sudoku-small", precision="int8")
    with pytest.raises(EqRError, match="dtype must be one of fp32, bf16, fp16"):
        TorchBackend(loader="sudoku-small", dtype="fp8")


# --------------------------------------------------------------------------- slots mode and CUDA graphs


class FakeCapture:
    """torch.cuda graphs' contract on the CPU: capture runs fn once into outputs; replay reruns it into them."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.captures, self.replays, self.batches = fail, 0, 0, []

    def capture(self, fn):
        self.captures += 1
        if self.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        outputs = fn()
        self.batches.append(outputs[0].shape[0])

        def replay():
            self.replays += 1
            for out, new in zip(outputs, fn()):
                out.copy_(new)

        return replay, outputs


CFG = SolveConfig(max_steps=40, tol=1e-3)


def _solve(backend, puzzles, batch_size=None):
    z = np.random.default_rng(3).standard_normal((2, len(puzzles), 16, 16)).astype(np.float32)
    with backend:
        return solve(backend, puzzles, (z[0], z[1]), CFG, batch_size=batch_size)


def test_slots_mode_freezes_and_refills_with_the_answers_of_compaction():
    model, puzzles = contractive_model(), random_puzzles(10, seed=23)
    a, stats_a = _solve(TorchBackend(model), puzzles, batch_size=4)
    b, stats_b = _solve(TorchBackend(model, static_shapes=True, batch_size=4), puzzles)
    np.testing.assert_array_equal(a["preds"], b["preds"])
    np.testing.assert_array_equal(stats_a.nstep, stats_b.nstep)
    assert (stats_b.batch_size == 4).all()
    with pytest.raises(EqRError, match="needs a batch size"):
        TorchBackend(model, static_shapes=True)


def test_cuda_graphs_capture_once_per_static_batch_and_replay_afterwards():
    model, puzzles = contractive_model(), random_puzzles(10, seed=23)
    eager, stats_eager = _solve(TorchBackend(model, static_shapes=True, batch_size=4), puzzles)
    fake = FakeCapture()
    backend = TorchBackend(model, cuda_graphs=True, batch_size=4, graph_capture=fake)
    graphed, stats = _solve(backend, puzzles)
    np.testing.assert_array_equal(eager["preds"], graphed["preds"])
    np.testing.assert_array_equal(stats_eager.nstep, stats.nstep)
    assert fake.captures == 1 and fake.batches == [4]
    assert fake.replays == len(stats.batch_size) > 1  # every step a replay, none eager
    assert backend.static_shapes and backend.graph_failure is None


def test_graph_outputs_stay_valid_until_two_steps_later():
    fake = FakeCapture()
    with TorchBackend(contractive_model(), cuda_graphs=True, batch_size=2, graph_capture=fake) as backend:
        backend.freeze(np.zeros(2, bool))
        feeds = {"tokens": torch.ones(2, 16, dtype=torch.int32), "z_H": torch.randn(2, 16, 16),
                 "z_L": torch.randn(2, 16, 16)}
        first = backend.step(feeds)
        kept = first["z_H_out"].clone()
        second = backend.step({"tokens": feeds["tokens"], "z_H": first["z_H_out"], "z_L": first["z_L_out"]})
        assert torch.equal(first["z_H_out"], kept)  # step t's state survives step t + 1
        assert second["z_H_out"].data_ptr() != first["z_H_out"].data_ptr()
        backend.step({"tokens": feeds["tokens"], "z_H": second["z_H_out"], "z_L": second["z_L_out"]})
        assert fake.captures == 1 and fake.replays == 3


def test_a_failed_capture_falls_back_to_eager_with_one_warning(caplog):
    model, puzzles = contractive_model(), random_puzzles(10, seed=23)
    eager, _ = _solve(TorchBackend(model, static_shapes=True, batch_size=4), puzzles)
    fake = FakeCapture(fail=True)
    backend = TorchBackend(model, cuda_graphs=True, batch_size=4, graph_capture=fake)
    with caplog.at_level(logging.WARNING, logger=torch_backend.__name__):
        fallen, stats = _solve(backend, puzzles)
    np.testing.assert_array_equal(eager["preds"], fallen["preds"])
    warnings = [r for r in caplog.records if "CUDA-graph capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "operation not permitted" in warnings[0].getMessage()
    assert fake.captures == 1 and fake.replays == 0 and len(stats.batch_size) > 1
    assert backend.cuda_graphs is False and backend.describe()["cuda_graphs"] is False


@no_cuda
def test_cuda_graphs_on_the_cpu_without_a_capture_object_warn_once_and_run_eager(caplog):
    model, puzzles = contractive_model(), random_puzzles(6, seed=2)
    with caplog.at_level(logging.WARNING, logger=torch_backend.__name__):
        out, _ = _solve(TorchBackend(model, cuda_graphs=True, batch_size=4), puzzles)
    eager, _ = _solve(TorchBackend(model, static_shapes=True, batch_size=4), puzzles)
    np.testing.assert_array_equal(out["preds"], eager["preds"])
    assert sum("need a CUDA device" in r.getMessage() for r in caplog.records) == 1


def test_solver_load_passes_slots_and_graph_options_through_the_registry():
    fake = FakeCapture()
    with Solver.load("sudoku-small", backend="torch", batch_size=8, cuda_graphs=True, graph_capture=fake,
                     device="cpu") as solver:
        tokens = solver.task.generate(12, seed=1).inputs
        result = solver.solve(tokens, max_steps=6)
        info = solver.backend.describe()
    assert info["cuda_graphs"] and info["batch_size"] == 8 and info["device"] == "cpu"
    assert fake.captures == 1 and fake.replays >= 6
    with solver_for(contractive_model()) as plain:  # the in-memory path is unchanged
        assert plain.backend.describe() == {"backend": "torch", "device": "cpu", "precision": "fp32"}
    assert result.preds.shape == (12, 16)
