"""Progressive breadth: with `agree`, a puzzle's trajectories launch in waves until A of them
agree (docs/algorithm.md#progressive-breadth); Solver.run and the Scheduler alike."""
from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import StaticTorchBackend, contractive_model, random_puzzles, solver_for

import eqr.runtime.scheduler as scheduler_module
import eqr.runtime.solver as solver_module
from eqr.runtime import Scheduler, SolveConfig
from eqr.runtime.backends.torch_backend import TorchBackend
from eqr.runtime.loop import Waves, wave_bounds
from eqr.runtime.solver import latency

K = 8
CFG = SolveConfig(max_steps=40, tol=1e-3, window=None, agree=2)


@pytest.fixture(scope="module")
def model():
    return contractive_model(L_layers=1, H_cycles=1, L_cycles=1)


@pytest.fixture
def poisoned(monkeypatch):
    """Trajectory k=0 of puzzle 0 starts from NaN (it diverges), so that puzzle's first wave of
    two cannot agree."""
    clean = solver_module.initial_states

    def initial_states(*args):
        z_H, z_L = clean(*args)
        puzzles, breadths = args[-2], args[-1]
        z_H[(puzzles == 0) & (breadths == 0)] = np.nan
        return z_H, z_L

    monkeypatch.setattr(solver_module, "initial_states", initial_states)
    monkeypatch.setattr(scheduler_module, "initial_states", initial_states)


def launched(result, P: int) -> np.ndarray:
    return result.stats.launched.reshape(P, -1).sum(axis=1)  # (P*K,) -> (P, K) -> (P,)


def test_wave_bounds_start_at_agree_and_double_up_to_the_breadth():
    assert wave_bounds(None, 8) == [8]  # no agree: all at once, as before
    assert wave_bounds(2, 8) == [2, 4, 8]
    assert wave_bounds(3, 8) == [3, 6, 8]
    assert wave_bounds(1, 5) == [1, 2, 4, 5]
    assert wave_bounds(10, 8) == [8]


def test_latency_adds_the_longest_trajectory_of_each_wave():
    nstep = np.array([[3, 5, 2, 0, 0, 0, 0, 0], [4, 4, 0, 0, 0, 0, 0, 0]], np.int32)  # (P, K)
    assert latency(nstep, 2).tolist() == [5 + 2, 4]
    assert latency(nstep, None).tolist() == [5, 4]


def test_waves_split_a_wave_larger_than_an_empty_batch_and_close_with_the_rest():
    waves = Waves(2)
    waves.open(7, np.arange(10, 18))
    assert waves.take(1, split=False)[0].size == 0  # whole waves only while the batch has rows
    ids, groups = waves.take(1, split=True)
    assert ids.tolist() == [10] and groups.tolist() == [7]
    assert waves.settled(7, 0) is None  # the wave's second trajectory is still to launch
    assert waves.take(None, split=False)[0].tolist() == [11]
    assert waves.settled(7, 1) is None and waves.waiting == 2  # no agreement: the next wave (2 more)
    assert waves.take(None, split=False)[0].tolist() == [12, 13]
    assert waves.settled(7, 2).tolist() == [14, 15, 16, 17]  # agreed: the rest never launch


def test_easy_puzzles_launch_only_their_first_wave_on_a_bundled_model():
    from eqr.model.load import load_model
    from eqr.runtime import Solver
    from eqr.tasks import get_task

    net = load_model("sudoku-6x6")
    task = get_task(net.metadata["task"]["name"], net.metadata["task"]["size"])
    puzzles = task.generate(24, 5, None)
    with Solver.from_model(net) as solver:
        result = solver.solve(puzzles.inputs.astype(np.int32), breadth=K, seed=0, max_steps=16, agree=2)
    count = launched(result, 24)
    assert (count == 2).mean() >= 0.75 and set(count.tolist()) <= {2, 4, 8}
    assert (result.preds == puzzles.labels).all(axis=1).mean() >= 0.9
    stats = result.stats
    assert (stats.nstep[~stats.launched] == 0).all()
    np.testing.assert_array_equal(result.steps, stats.nstep.reshape(24, K).sum(axis=1))
    assert stats.summary()["stop_reasons"]["not_launched"] == 24 * K - count.sum()
    assert stats.summary()["mean_steps"] == pytest.approx(stats.nstep[stats.launched].mean())


def test_a_first_wave_that_cannot_agree_launches_the_next(model, poisoned):
    with solver_for(model) as solver:
        result = solver.run(random_puzzles(3, seed=3), CFG, breadth=K, seed=1)
    assert launched(result, 3).tolist() == [4, 2, 2]
    reasons = np.array(result.stats.reasons()).reshape(3, K)
    assert reasons[0, 0] == "diverged" and (reasons[0, 4:] == "not_launched").all()
    assert (reasons[1:, 2:] == "not_launched").all()
    assert not result.diverged.any() and result.chosen[0] != 0
    assert result.agreement.tolist() == [1.0, 1.0, 1.0]  # unlaunched rows (zero preds) cast no vote
    nstep = result.stats.nstep.reshape(3, K)
    assert result.depth[0] == nstep[0, :2].max() + nstep[0, 2:4].max()  # wave 2 starts after wave 1


def test_every_wave_runs_when_none_agrees(model):
    with solver_for(model) as solver:
        result = solver.run(random_puzzles(2), CFG.replace(max_steps=1), breadth=K, seed=0)
    assert result.stats.launched.all() and set(result.stats.reasons()) == {"max_steps"}
    assert result.steps.tolist() == [K, K] and result.depth.tolist() == [3, 3]  # waves of 2, 2, 4


def test_no_puzzles_with_agree(model):
    with solver_for(model) as solver:
        result = solver.run(np.zeros((0, 16), np.int32), CFG, breadth=K)
    assert result.preds.shape == (0, 16) and result.steps.shape == (0,)


@pytest.mark.parametrize("batch", [4, 5, 7])
def test_answers_do_not_depend_on_the_batch(model, poisoned, batch):
    puzzles = random_puzzles(5, seed=8)
    with solver_for(model) as solver:
        alone = solver.run(puzzles, CFG, breadth=K, seed=4)
    with solver_for(model) as solver:
        solver.batch_size = batch
        batched = solver.run(puzzles, CFG, breadth=K, seed=4)
    with solver_for(model, StaticTorchBackend(model, batch=batch)) as solver:
        static = solver.run(puzzles, CFG, breadth=K, seed=4)
    with Scheduler(solver_for(model), CFG, batch_size=K, breadth=K, seed=4) as scheduler:  # holds K, at least
        served = scheduler.submit(puzzles).result(timeout=60)
    assert launched(alone, 5)[0] == 4  # the poisoned puzzle ran a second wave
    for other in (batched, static, served):
        np.testing.assert_array_equal(other.preds, alone.preds)
        np.testing.assert_array_equal(other.stats.nstep, alone.stats.nstep)
        np.testing.assert_array_equal(other.stats.reason, alone.stats.reason)
        np.testing.assert_array_equal(other.depth, alone.depth)


def test_without_agree_every_trajectory_launches_and_rows_fill_the_batch(model):
    with solver_for(model) as solver:
        solver.batch_size = 3
        result = solver.run(random_puzzles(4), CFG.replace(agree=None), breadth=2, seed=0)
    assert result.stats.launched.all()
    assert result.stats.batch_size[0] == 3  # rows, not whole puzzles: one puzzle's two rows split


class AbortingBackend(TorchBackend):
    """Calls `during_step` inside every step (here: a shutdown that cancels)."""

    during_step = staticmethod(lambda: None)

    def step_impl(self, feeds):
        self.during_step()
        return super().step_impl(feeds)


def test_cancel_while_a_wave_waits_settles_the_request(model):
    backend = AbortingBackend(model)
    scheduler = Scheduler(solver_for(model, backend), CFG.replace(max_steps=1), batch_size=K, breadth=K)
    backend.during_step = lambda: scheduler.shutdown(wait=False, cancel=True)  # the first wave ends, unagreed
    future = scheduler.submit(random_puzzles(1)[0])
    scheduler.shutdown(wait=True)
    assert future.cancelled()
