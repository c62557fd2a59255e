"""Calibrated stopping rules and the precision cascade: the replayed rule is the loop's rule, the fit
finds fewer steps at the fixed depth's accuracy, held-out puzzles are disjoint, the runtime uses a
manifest rule by default, and a cascade lands where the high precision lands."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_helpers import contractive_model, random_puzzles

from eqr.calibration.stopping import (Trajectories, evaluate_rule, fit_and_evaluate, fit_rule, record_trajectories,
                                      simulate)
from eqr.contract.artifact import Artifact, split_precision
from eqr.contract.errors import EqRError
from eqr.runtime import Scheduler, Solver
from eqr.runtime.backends.cascade import CascadeBackend
from eqr.runtime.backends.torch_backend import TorchBackend
from eqr.runtime.config import SolveConfig
from eqr.runtime.stopping_rules import RULE_FIELDS


@pytest.fixture(scope="module")
def model():
    model = contractive_model(seed=2)
    with torch.no_grad():  # a q_halt head that says something (its initialisation is a constant -5)
        model.q_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    return model


@pytest.fixture(scope="module")
def recorded(model):
    solver = Solver.from_model(model)
    puzzles = random_puzzles(16, seed=4)
    with solver:
        return puzzles, record_trajectories(solver, puzzles, steps=20, seed=3)


def test_recorded_trajectories_are_the_loops_steps(model, recorded) -> None:
    puzzles, traj = recorded
    assert traj.preds.shape == (20, 16, 16) and traj.residual.shape == traj.q_halt.shape == (20, 16)
    with Solver.from_model(model) as solver:
        for depth in (1, 7, 20):
            fixed = solver.solve(puzzles, fixed_depth=depth, seed=3)
            np.testing.assert_array_equal(traj.preds[depth - 1], fixed.preds)
            np.testing.assert_allclose(traj.residual[depth - 1], fixed.residual, rtol=1e-6)


def test_replayed_rules_stop_where_the_loop_stops(model, recorded) -> None:
    """`simulate` (no steps run) gives the loop's own nstep and answers for every kind of rule."""
    puzzles, traj = recorded
    median_q = float(np.quantile(traj.q_halt[5:], 0.7))
    median_floor = float(np.median(traj.residual[10]))
    rules = [{"max_steps": 20, "tol": median_floor, "patience": 2, "window": None},
             {"max_steps": 20, "tol": None, "window": 3},
             {"max_steps": 12, "tol": None, "window": None, "q_halt": True, "q_halt_threshold": median_q,
              "patience": 1},
             {"max_steps": 5, "tol": median_floor, "patience": 1, "window": 2}]
    with Solver.from_model(model) as solver:
        for rule in rules:
            cfg = SolveConfig(**rule)
            result = solver.run(puzzles, cfg, seed=3)
            nstep, preds = simulate(traj, {k: getattr(cfg, k) for k in RULE_FIELDS})
            np.testing.assert_array_equal(nstep, result.stats.nstep, err_msg=str(rule))
            np.testing.assert_array_equal(preds, result.preds, err_msg=str(rule))
    assert len({tuple(simulate(traj, r)[0]) for r in rules}) == len(rules)  # the rules really differ


def test_a_stopping_rule_is_one_registered_class(model, recorded) -> None:
    """Registering a rule is all the loop and the replay need: both stop where it says."""
    from eqr.runtime import stopping_rules
    from eqr.runtime.stopping_rules import RULES, StoppingRule

    class EarlyAnswer(StoppingRule):  # a toy rule on an existing field: settle after `patience` steps
        reason, fields = "stable", ("patience",)

        def active(self, rule):
            return True

        def hits(self, signals, rule):
            return np.ones_like(signals.changed)

        def need(self, rule):
            return int(rule.get("patience", 2))

        def describe(self, rule):
            return f"early x{rule.get('patience')}"

    puzzles, traj = recorded
    rule = {"max_steps": 20, "tol": None, "window": None, "patience": 3}
    original = stopping_rules.RULES
    try:
        stopping_rules.RULES = (*RULES, EarlyAnswer())
        import eqr.calibration.stopping as fitting
        import eqr.runtime.loop as loop

        loop.RULES = fitting.RULES = stopping_rules.RULES
        with Solver.from_model(model) as solver:
            result = solver.run(puzzles, SolveConfig(**rule), seed=3)
        nstep, _ = simulate(traj, rule)
        assert (result.stats.nstep == 3).all() and (nstep == 3).all()
        assert stopping_rules.describe_rule(rule) == "max 20 steps, early x3"
    finally:
        stopping_rules.RULES = loop.RULES = fitting.RULES = original
    assert all(f in SolveConfig.__dataclass_fields__ for r in RULES for f in r.fields)
    assert RULE_FIELDS == ("max_steps", "tol", "patience", "window", "q_halt", "q_halt_threshold")


def synthetic(T: int, N: int = 16, seed: int = 0) -> tuple[Trajectories, np.ndarray]:
    """Answers that settle on the label after a per-puzzle number of steps; a few drift away late."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, 5, (T, 4)).astype(np.int32)
    settle = rng.integers(1, 6, T)  # steps until the answer is right
    preds = np.zeros((N, T, 4), np.int32)
    for n in range(N):
        preds[n] = np.where((n + 1 >= settle)[:, None], labels, (labels + n + 1) % 5)
    drift = rng.random(T) < 0.2  # late drift: fixed depths past 10 lose these
    preds[10:, drift] = (labels[drift] + 1) % 5
    residual = np.tile(0.5 ** np.arange(1, N + 1, dtype=np.float32)[:, None], (1, T))
    q_halt = np.where(np.arange(1, N + 1)[:, None] >= settle + 1, 1.0, -1.0).astype(np.float32)
    return Trajectories(preds, residual, np.ones((N, T), np.float32), q_halt), labels


def test_fit_finds_fewer_steps_than_the_best_fixed_depth_within_the_margin() -> None:
    traj, labels = synthetic(200)
    fitted = fit_rule(traj, labels, margin=1.0)
    assert fitted["best_fixed_accuracy"] == 100.0 and fitted["best_fixed_depth"] == 5
    assert fitted["accuracy"] >= 99.0
    assert fitted["mean_steps"] < fitted["best_fixed_depth"]  # settling early pays
    again = evaluate_rule(traj, labels, fitted["rule"])
    assert (again["accuracy"], again["mean_steps"]) == (fitted["accuracy"], fitted["mean_steps"])
    # a huge margin buys the cheapest rule of all: one step
    assert fit_rule(traj, labels, margin=100.0)["mean_steps"] == 1.0


def test_fit_and_evaluate_uses_disjoint_halves() -> None:
    traj, labels = synthetic(41, seed=1)
    result = fit_and_evaluate(traj, labels, margin=0.0)
    assert result["fit"]["puzzles"] == 21 and result["heldout"]["puzzles"] == 20
    assert set(result["rule"]) == {"max_steps", "tol", "patience", "window", "q_halt", "q_halt_threshold"}
    # the held-out numbers are the rule replayed on the odd puzzles only
    odd = evaluate_rule(traj.select(np.arange(1, 41, 2)), labels[1::2], result["rule"], result["fit"]["best_fixed_depth"])
    assert odd == result["heldout"]
    with pytest.raises(ValueError, match="at least 2 puzzles"):
        fit_and_evaluate(traj.select(np.arange(1)), labels[:1])


def test_the_manifest_rule_is_the_default_and_explicit_values_win() -> None:
    rule = {"max_steps": 9, "tol": None, "patience": 3, "window": 2, "q_halt": True, "q_halt_threshold": 1.5}
    artifact = Artifact(kind="checkpoint", location="tiny", seq_len=16, hidden_size=16, vocab_size=6, checkpoint="tiny", stopping={"fp32": rule})
    solver = Solver.load(artifact, backend="torch")
    cfg = solver.config()
    assert {k: getattr(cfg, k) for k in rule} == rule
    assert solver.config(window=None, tol=1e-3).window is None and solver.config(tol=1e-3).tol == 1e-3
    assert Solver.load(Artifact(kind="checkpoint", location="tiny", seq_len=16, hidden_size=16, vocab_size=6, checkpoint="tiny"), backend="torch").config().window == 16
    with Scheduler(solver, batch_size=2) as scheduler:  # the scheduler's default is the same rule
        assert scheduler.cfg == cfg
    assert split_precision("INT8+fp32") == ("int8", "fp32")
    with pytest.raises(EqRError, match="int8\\+fp32"):
        split_precision("fp32+int8")


class NoisyBackend(TorchBackend):
    """A stand-in for a low precision: the same map plus relative noise 1e-2, so its residual
    floors near 1e-2 and never reaches a tighter tol."""

    def step_impl(self, feeds):
        out = super().step_impl(feeds)
        g = torch.Generator().manual_seed(int(1e6 * float(feeds["z_H"].abs().sum())) % 2**31)
        for state, name in (("z_H", "z_H_out"), ("z_L", "z_L_out")):
            out[name] = out[name] * (1 + 1e-2 * torch.randn(out[name].shape, generator=g))
        delta = torch.cat([(out["z_H_out"] - feeds["z_H"]).flatten(1), (out["z_L_out"] - feeds["z_L"]).flatten(1)], 1)
        norm = torch.cat([feeds["z_H"].flatten(1), feeds["z_L"].flatten(1)], 1).norm(dim=1)
        out["residual"] = delta.norm(dim=1) / norm
        return out


def test_cascade_lands_on_the_high_precision_answers_below_the_low_floor(model) -> None:
    puzzles = random_puzzles(10, seed=8)
    rule = {"max_steps": 80, "tol": 1e-4, "window": None}
    high = Solver.from_model(model)
    low = Solver(NoisyBackend(model), 16, 16)
    both = Solver(CascadeBackend(NoisyBackend(model), TorchBackend(model), "int8+fp32"), 16, 16)
    with high, low, both:
        reference = high.solve(puzzles, seed=1, **rule)
        alone = low.solve(puzzles, seed=1, **rule)
        result = both.solve(puzzles, seed=1, **rule)
        with Scheduler(both, both.config(**rule), batch_size=4) as scheduler:
            served = [scheduler.submit(p, seed=1).result() for p in puzzles]
    assert (alone.residual > 1e-4).all() and (alone.stats.nstep == 80).all()  # the low floor alone never stops
    assert (reference.residual < 1e-4).all()
    np.testing.assert_array_equal(result.preds, reference.preds)
    assert (result.residual < 1e-4).all() and (result.stats.nstep < 80).all()
    low_steps = result.stats.low_steps
    assert (low_steps >= 2).all() and (low_steps < result.stats.nstep).all()  # both stages ran
    for p, answer in enumerate(served):  # the scheduler drives the same two-stage loop
        np.testing.assert_array_equal(answer.preds[0], reference.preds[p])


def test_a_settling_rule_in_the_low_stage_hands_the_row_to_the_high_stage(model) -> None:
    """The answer settles before the low precision's floor: the row switches then, not at the floor."""
    puzzles = random_puzzles(6, seed=9)
    both = Solver(CascadeBackend(NoisyBackend(model), TorchBackend(model), "int8+fp32"), 16, 16)
    with both:  # the floor rule can never fire (patience 1000): only the stable window switches rows
        result = both.solve(puzzles, seed=2, max_steps=80, tol=None, window=3, cascade_patience=1000)
    low, nstep = result.stats.low_steps, result.stats.nstep
    assert (low >= 4).all() and (low < 40).all()  # left the low stage when its answer had settled
    high = nstep - low  # the high stage's fresh counter needs its own 3 unchanged steps
    assert (high >= 3).all() and (high <= 6).all()
    assert set(result.stats.reasons()) == {"stable"}


def test_recorded_at_breadth_the_rows_are_the_solvers_trajectories(model) -> None:
    puzzles = random_puzzles(3, seed=5)
    with Solver.from_model(model) as solver:
        traj = record_trajectories(solver, puzzles, steps=6, seed=3, breadth=2)
        fixed = solver.solve(puzzles, fixed_depth=6, breadth=2, seed=3, keep_trajectories=True)
    assert traj.breadth == 2 and traj.preds.shape == (6, 6, 16)
    np.testing.assert_array_equal(traj.preds[-1].reshape(3, 2, 16), fixed.trajectory_preds)  # row p*K + k
    assert traj.puzzles(np.array([2])).preds.shape == (6, 2, 16)


def test_at_breadth_a_rule_is_judged_by_the_answer_the_converged_score_picks() -> None:
    """One puzzle, K = 2: trajectory 0 is right, trajectory 1 wrong but moving little at first. At depth 4
    trajectory 1's last three deltas are the larger, so the puzzle is right; stopped at step 2 it wins."""
    preds = np.array([[[1], [2]]] * 4, np.int32)  # (N=4, T=2, L=1)
    logit_delta = np.array([[5.0, 1.0], [5.0, 1.0], [5.0, 9.0], [5.0, 9.0]], np.float32)
    residual, q_halt = np.ones((4, 2), np.float32), np.zeros((4, 2), np.float32)
    labels = np.array([[1]], np.int32)
    traj = Trajectories(preds, residual, logit_delta, q_halt, breadth=2)
    assert evaluate_rule(traj, labels, {"max_steps": 4})["accuracy"] == 100.0
    assert evaluate_rule(traj, labels, {"max_steps": 2})["accuracy"] == 0.0
    single = traj.select(np.arange(2))  # the same trajectories judged one by one: the two caps tie
    assert evaluate_rule(single, labels[[0, 0]], {"max_steps": 2})["accuracy"] == 50.0
    assert fit_rule(traj, labels, margin=0.0)["rule"]["max_steps"] >= 3
    diverging = residual.copy()
    diverging[1:, 1] = np.nan  # trajectory 1 diverges at step 2: it never wins
    assert evaluate_rule(Trajectories(preds, diverging, logit_delta, q_halt, 2), labels,
                         {"max_steps": 2})["accuracy"] == 100.0
