"""The runtime pieces serving relies on: multi-puzzle requests, per-request caps, streaming
progress, and fault isolation with a backend that raises on chosen steps."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from runtime_helpers import contractive_model, random_puzzles, solver_for

from eqr.contract.errors import EqRError
from eqr.runtime import Scheduler, SolveConfig
from eqr.runtime.backends.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def model():
    return contractive_model(L_layers=1, H_cycles=1, L_cycles=1)


class FaultyBackend(TorchBackend):
    """Raises on the backend calls whose numbers (1-based) are in `fail`; `calls` counts them all."""

    def __init__(self, model, fail=(), gate: threading.Event | None = None) -> None:
        super().__init__(model)
        self.fail, self.calls, self.gate = set(fail), 0, gate

    def step_impl(self, feeds):
        if self.gate is not None:
            self.gate.wait()
        self.calls += 1
        if self.calls in self.fail or "always" in self.fail:
            raise RuntimeError(f"injected device fault at call {self.calls}")
        return super().step_impl(feeds)


def test_a_request_of_several_puzzles_equals_solver_solve_even_when_larger_than_the_batch(model):
    puzzles = random_puzzles(7, seed=3)
    with solver_for(model) as reference:
        expected = reference.solve(puzzles, breadth=2, seed=9, max_steps=5)
    with Scheduler(solver_for(model), SolveConfig(max_steps=64, tol=1e-3), batch_size=4) as scheduler:
        result = scheduler.submit(puzzles, seed=9, breadth=2, max_steps=5).result(timeout=60)
    np.testing.assert_array_equal(result.preds, expected.preds)
    np.testing.assert_array_equal(result.steps, expected.steps)
    assert result.steps.max() <= 2 * 5  # the request's own cap, below the scheduler's 64


def test_bad_breadth_or_max_steps_is_refused_at_submit(model):
    with Scheduler(solver_for(model), SolveConfig(max_steps=16), batch_size=4) as scheduler:
        with pytest.raises(EqRError, match="breadth must be 1..4"):
            scheduler.submit(random_puzzles(1)[0], breadth=5)
        with pytest.raises(EqRError, match="max_steps must be 1..16"):
            scheduler.submit(random_puzzles(1)[0], max_steps=17)


def test_streaming_reports_anytime_answers_every_few_steps_then_the_result(model):
    puzzles = random_puzzles(3, seed=5)
    seen = []
    cfg = SolveConfig(max_steps=12, tol=None, window=None)  # every trajectory runs all 12 steps
    with Scheduler(solver_for(model), cfg, batch_size=8, stream_every=3) as scheduler:
        result = scheduler.submit(puzzles, seed=1, on_progress=seen.append).result(timeout=60)
        quiet = scheduler.submit(puzzles, seed=1).result(timeout=60)  # no listener: same answer
    assert [p.steps.tolist() for p in seen] == [[3, 3, 3], [6, 6, 6], [9, 9, 9]]  # the 12th step is the result
    assert all(p.preds.shape == (3, 16) for p in seen)
    np.testing.assert_array_equal(result.preds, quiet.preds)


def test_a_fault_retried_once_loses_nothing(model):
    puzzles = random_puzzles(6, seed=8)
    cfg = SolveConfig(max_steps=8, tol=1e-3)
    with solver_for(model) as reference:
        expected = [reference.run(p[None], cfg, seed=0).preds for p in puzzles]
    with Scheduler(solver_for(model, FaultyBackend(model, fail={2})), cfg, batch_size=4) as scheduler:
        futures = [scheduler.submit(p) for p in puzzles]
        results = [f.result(timeout=60) for f in futures]
        assert scheduler.ready and scheduler.counts["faults"] == 1
    for result, answer in zip(results, expected):
        np.testing.assert_array_equal(result.preds, answer)


def test_a_fault_that_persists_fails_only_the_working_batch_and_serving_goes_on(model):
    gate = threading.Event()
    backend = FaultyBackend(model, fail={1, 2}, gate=gate)  # the first step fails, and its retry
    cfg = SolveConfig(max_steps=8, tol=1e-3)
    with Scheduler(solver_for(model, backend), cfg, batch_size=2) as scheduler:
        futures = [scheduler.submit(p) for p in random_puzzles(6, seed=2)]
        gate.set()
        errors = [f.exception(timeout=60) for f in futures]
        assert scheduler.ready  # one bad step is not a broken device
        later = scheduler.submit(random_puzzles(1, seed=3)[0]).result(timeout=60)
    k = sum(e is not None for e in errors)  # the working batch at the failed step: 1 or 2 requests (batch 2)
    assert 1 <= k <= 2 and [e is not None for e in errors] == [True] * k + [False] * (6 - k)
    assert "injected device fault" in str(errors[0])
    assert later.preds.shape == (1, 16) and scheduler.counts["failed"] == k


def test_repeated_faults_mark_the_scheduler_not_ready_and_fail_the_queue(model):
    gate = threading.Event()
    scheduler = Scheduler(solver_for(model, FaultyBackend(model, fail={"always"}, gate=gate)),
                          SolveConfig(max_steps=8), batch_size=2, max_faults=2, max_queue=100)
    futures = [scheduler.submit(p) for p in random_puzzles(10, seed=4)]
    gate.set()
    for future in futures:
        assert future.exception(timeout=60) is not None  # none hangs
    scheduler.shutdown(wait=True)
    assert not scheduler.ready
    messages = [str(f.exception()) for f in futures]
    faulted = sum(m.startswith("injected device fault") for m in messages)  # 2 failed batches (the 1st may be short)
    assert 2 <= faulted <= 4 and sum(m.startswith("the model is not ready") for m in messages) == 10 - faulted
    with pytest.raises(EqRError, match="not ready"):
        scheduler.submit(random_puzzles(1)[0])


class SmallBatchBackend(TorchBackend):
    """A backend whose working batch (e.g. a TensorRT profile's max) holds 2 trajectories."""

    def activate_impl(self) -> None:
        super().activate_impl()
        self.max_batch = 2


def test_a_breadth_the_backend_cannot_hold_fails_its_request_and_the_queue_goes_on(model) -> None:
    from eqr.contract.errors import RequestError

    puzzles = random_puzzles(2, seed=4)
    with Scheduler(solver_for(model, SmallBatchBackend(model)), SolveConfig(max_steps=4, tol=None), batch_size=8,
                   breadth=1) as scheduler:
        too_wide = scheduler.submit(puzzles[0], breadth=4)  # fits the scheduler's 8, not the backend's 2
        fits = scheduler.submit(puzzles[1], breadth=2)
        with pytest.raises(RequestError, match="breadth 4 does not fit the backend's working batch of 2"):
            too_wide.result(timeout=60)
        assert fits.result(timeout=60).preds.shape == (1, 16)
