"""Scheduler: continuous batching from several threads, back-pressure, shutdown, failures."""
from __future__ import annotations

import gc
import queue
import threading
import tracemalloc
from concurrent.futures import CancelledError, wait

import numpy as np
import pytest
from runtime_helpers import StaticTorchBackend, contractive_model, random_puzzles, solver_for

from eqr.contract.errors import NotReady
from eqr.runtime import Scheduler, SolveConfig
from eqr.runtime.backends.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def model():
    # one block application per step: thousands of requests stay within seconds
    return contractive_model(L_layers=1, H_cycles=1, L_cycles=1)


def test_thousands_of_requests_from_several_threads_all_answered_in_order(model):
    puzzles = random_puzzles(40, seed=21)
    seeds = [0, 1]
    cfg = SolveConfig(max_steps=12, tol=1e-2)  # a loose tol keeps 2000 requests within seconds
    with solver_for(model) as reference:  # each (puzzle, seed) answered alone, for comparison
        expected = {(j, s): reference.run(puzzles[j:j + 1], cfg, seed=s) for j in range(40) for s in seeds}
    results: dict[int, list] = {}

    def client(thread: int, scheduler: Scheduler) -> None:
        rng = np.random.default_rng(thread)
        mine = []
        for _ in range(500):
            j, s = int(rng.integers(40)), int(rng.integers(2))
            mine.append(((j, s), scheduler.submit(puzzles[j], seed=s)))
        results[thread] = mine

    with Scheduler(solver_for(model), cfg, batch_size=64, max_queue=256) as scheduler:
        threads = [threading.Thread(target=client, args=(t, scheduler)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    answered = [(key, future.result(timeout=0)) for mine in results.values() for key, future in mine]
    assert len(answered) == 2000
    for key, result in answered:
        np.testing.assert_array_equal(result.preds, expected[key].preds)
        assert result.steps == expected[key].steps and result.converged == expected[key].converged


def test_memory_does_not_grow_across_rounds(model):
    puzzles = random_puzzles(16, seed=4)
    cfg = SolveConfig(max_steps=12, tol=1e-2, agree=2)  # breadth 2 + agree: per-puzzle bookkeeping too
    with Scheduler(solver_for(model), cfg, batch_size=32, breadth=2) as scheduler:

        def round_() -> None:
            futures = [scheduler.submit(puzzles[i % 16], seed=i % 3) for i in range(200)]
            wait(futures)
            assert all(f.result().preds.shape == (1, 16) for f in futures)

        round_()  # warm-up: torch/allocator caches fill here
        tracemalloc.start()
        try:
            round_()
            gc.collect()
            first = tracemalloc.get_traced_memory()[0]
            for _ in range(2):
                round_()
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - first
        finally:
            tracemalloc.stop()
    assert growth < 64 * 1024, f"python heap grew by {growth} bytes over two rounds of 200 requests"


class GatedBackend(TorchBackend):
    """A torch backend whose steps wait for an event: holds the worker so the queue fills up."""

    def __init__(self, model, gate: threading.Event) -> None:
        super().__init__(model)
        self.gate = gate
        self.stepping = threading.Event()  # set once the worker is inside a step

    def step_impl(self, feeds):
        self.stepping.set()
        self.gate.wait()
        return super().step_impl(feeds)


def test_full_queue_blocks_then_raises_and_drains_after_release(model):
    gate = threading.Event()
    backend = GatedBackend(model, gate)
    scheduler = Scheduler(solver_for(model, backend), batch_size=2, max_queue=3)
    puzzles = random_puzzles(6)
    futures = [scheduler.submit(puzzles[i]) for i in range(2)]
    assert backend.stepping.wait(30)  # the worker holds one or both in its (blocked) batch
    futures += [scheduler.submit(puzzles[i]) for i in range(2, 2 + 3 - scheduler.pending)]  # fills the queue
    assert scheduler.pending == 3
    with pytest.raises(queue.Full):
        scheduler.submit(puzzles[5], timeout=0.05)
    gate.set()
    scheduler.shutdown(wait=True)
    assert all(f.done() and not f.cancelled() for f in futures)


def test_shutdown_with_cancel_settles_every_future(model):
    gate = threading.Event()
    scheduler = Scheduler(solver_for(model, GatedBackend(model, gate)), batch_size=4, max_queue=100)
    futures = [scheduler.submit(p) for p in random_puzzles(20)]
    threading.Timer(0.1, gate.set).start()
    scheduler.shutdown(wait=True, cancel=True)
    assert all(f.done() for f in futures)
    assert sum(f.cancelled() for f in futures) >= 16  # at most one batch (4 puzzles) could finish
    with pytest.raises(RuntimeError, match="shut down"):
        scheduler.submit(random_puzzles(1)[0])


class FailingBackend(TorchBackend):
    def step_impl(self, feeds):
        raise RuntimeError("device lost")


def test_backend_failure_fails_every_request_instead_of_hanging(model):
    scheduler = Scheduler(solver_for(model, FailingBackend(model)), batch_size=4)
    futures = [scheduler.submit(p) for p in random_puzzles(10)]
    scheduler.shutdown(wait=True)
    for future in futures:  # the working batches fail; after 3 faulted steps in a row, those still queued get NotReady
        with pytest.raises((RuntimeError, CancelledError, NotReady), match="device lost|"):
            future.result(timeout=1)
    assert any(isinstance(f.exception(), RuntimeError) for f in futures)


def test_breadth_and_caller_cancellation(model):
    with solver_for(model) as reference:
        expected = reference.solve(random_puzzles(3), breadth=3, seed=5)
    with Scheduler(solver_for(model), batch_size=9, breadth=3, seed=5) as scheduler:
        futures = [scheduler.submit(p, seed=5) for p in random_puzzles(3)]
        results = [f.result(timeout=30) for f in futures]
    for p, result in enumerate(results):
        assert result.steps.shape == (1,) and result.preds.shape == (1, 16)
        # the scheduler seeds each request as puzzle 0; only puzzle 0 shares seeds with the batch solve
    np.testing.assert_array_equal(results[0].preds[0], expected.preds[0])


def test_static_shape_backend_refills_slots_in_place(model):
    puzzles = random_puzzles(12, seed=31)
    with solver_for(model) as reference:
        expected = [reference.solve(p[None], seed=2).preds[0] for p in puzzles]
    with Scheduler(solver_for(model, StaticTorchBackend(model, batch=4)), batch_size=4, seed=2) as scheduler:
        futures = [scheduler.submit(p) for p in puzzles]
    for future, answer in zip(futures, expected):
        np.testing.assert_array_equal(future.result(timeout=0).preds[0], answer)
