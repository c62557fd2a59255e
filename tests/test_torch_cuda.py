"""The torch backend, the loop, compaction and the Scheduler on a real CUDA GPU (skipped without one).

scripts/gpu_proof.sh runs these on a GPU machine without TensorRT; the CPU twins of the
graph-capture logic are in tests/test_torch_backend.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_helpers import contractive_model, random_puzzles

from eqr.runtime import SolveConfig, Solver, solve
from eqr.runtime.backends.torch_backend import TorchBackend
from eqr.runtime.scheduler import Scheduler

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch)")]

CFG = SolveConfig(max_steps=40, tol=1e-3)


def _z(n: int) -> tuple[np.ndarray, np.ndarray]:
    z = np.random.default_rng(3).standard_normal((2, n, 16, 16)).astype(np.float32)
    return z[0], z[1]


def _solve(backend, puzzles, **kw):
    with backend:
        return solve(backend, puzzles, _z(len(puzzles)), CFG, **kw)


def test_the_step_on_cuda_matches_the_cpu():
    model, puzzles = contractive_model(), random_puzzles(12, seed=4)
    cpu, cpu_stats = _solve(TorchBackend(model), puzzles, batch_size=8)
    gpu, gpu_stats = _solve(TorchBackend(contractive_model(), device="cuda"), puzzles, batch_size=8)
    assert (cpu["preds"] == gpu["preds"]).all(axis=1).mean() >= 0.9
    assert np.abs(cpu_stats.nstep - gpu_stats.nstep).mean() <= 1.0


def test_compaction_and_slots_on_cuda_give_the_same_answers():
    puzzles = random_puzzles(20, seed=23)
    compacted, a = _solve(TorchBackend(contractive_model(), device="cuda"), puzzles, batch_size=8)
    slots, b = _solve(TorchBackend(contractive_model(), device="cuda", static_shapes=True, batch_size=8), puzzles)
    np.testing.assert_array_equal(compacted["preds"], slots["preds"])
    np.testing.assert_array_equal(a.nstep, b.nstep)
    assert (a.batch_size < 8).any()  # compaction shrank the batch on the device


def test_real_cuda_graph_replay_equals_eager_slots():
    puzzles = random_puzzles(20, seed=23)
    eager, a = _solve(TorchBackend(contractive_model(), device="cuda", static_shapes=True, batch_size=8), puzzles)
    backend = TorchBackend(contractive_model(), device="cuda", cuda_graphs=True, batch_size=8)
    graphed, b = _solve(backend, puzzles)
    assert backend.graph_failure is None, backend.graph_failure
    np.testing.assert_array_equal(eager["preds"], graphed["preds"])
    np.testing.assert_array_equal(a.nstep, b.nstep)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_on_cuda_agrees_with_fp32_on_a_bundled_model(dtype):
    answers = {}
    for name in ("fp32", dtype):
        with Solver.load("sudoku-6x6", backend="torch", device="cuda", batch_size=256, dtype=name) as solver:
            data = solver.task.generate(512, seed=11)
            answers[name] = solver.solve(data.inputs, fixed_depth=8).preds
    assert (answers["fp32"] == answers[dtype]).all(axis=1).mean() >= 0.93


def test_scheduler_on_cuda_with_graphs():
    with Solver.load("sudoku-6x6", backend="torch", device="cuda", batch_size=32, cuda_graphs=True) as solver:
        data = solver.task.generate(64, seed=5)
        direct = solver.solve(data.inputs, max_steps=16)
        assert solver.backend.graph_failure is None, solver.backend.graph_failure
        with Scheduler(solver, batch_size=32, seed=0) as scheduler:
            futures = [scheduler.submit(data.inputs[i:i + 16], seed=0, max_steps=16, numbers=np.arange(i, i + 16))
                       for i in range(0, 64, 16)]  # the puzzle numbers of the direct solve: the same seeds
            results = [f.result(timeout=120) for f in futures]
    preds = np.concatenate([r.preds for r in results])
    assert (preds == direct.preds).all(axis=1).mean() >= 0.95
