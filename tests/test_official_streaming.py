"""The bench's re-implementation of the official streaming evaluator (eqr/bench/official.py): q_halt
halting after the minimum steps, refilled slots that start fresh, convergence top-1 selection; and the
frontier_vs_official RESULT line. No timing is asserted (speed lives in `eqr bench`)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config

from eqr.bench import parse_result_line
from eqr.bench.official import (GOAL_BY_BREADTH, THRESHOLDS, OfficialRun, Point, frontier_ratios, goal_threshold,
                                official_solve)
from eqr.commands import cli
from eqr.model.network import EqRModel, LatentState, StepOutput

V = 16


class CountingModel(torch.nn.Module):
    """A stand-in step whose z_H gains 1 per step: a job's preds are round(mean over D of z_H), the steps
    since its own initial state (whose mean over D = 256 is ~0), and its q_halt is that count minus the
    puzzle's token 0, so puzzle p halts at threshold 0.5 after token 0 + 1 steps."""

    dtype = torch.float32

    def __init__(self, seq_len: int = 3, hidden: int = 256) -> None:
        super().__init__()
        self.config = SimpleNamespace(seq_len=seq_len, hidden_size=hidden)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the device official_solve reads
        self.calls: list[int] = []  # slots stepped per call

    def step(self, state: LatentState, tokens: torch.Tensor, noise: float = 0.0,
             generator: torch.Generator | None = None) -> StepOutput:
        self.calls.append(len(tokens))
        z_H = state.z_H + 1.0
        count = z_H.mean(-1)  # [B, L]
        logits = -(torch.arange(V, dtype=torch.float32) - count[..., None]) ** 2  # [B, L, V], argmax = count
        return StepOutput(LatentState(z_H, state.z_L), logits, count[:, 0] - tokens[:, 0].float())


def _tokens(first: list[int], L: int = 3) -> np.ndarray:
    tokens = np.ones((len(first), L), np.int32)
    tokens[:, 0] = first
    return tokens


def test_an_infinite_threshold_runs_every_job_to_the_cap() -> None:
    run = official_solve(CountingModel(), _tokens([0, 1, 2, 3, 0]), breadth=3, slots=2, threshold=math.inf, seed=0,
                         max_steps=5)
    assert run.steps.shape == (5, 3) and (run.steps == 5).all()
    assert (run.job_preds == 5).all()  # every job counted its own 5 steps from a fresh state


def test_jobs_halt_on_q_halt_and_refilled_slots_start_fresh() -> None:
    """Puzzles halt after different step counts, so slots are refilled mid-run; a refilled job whose state,
    step count or window carried over from the slot's last job would predict more steps than it ran."""
    model = CountingModel()
    first = [0, 3, 1, 5, 2]
    run = official_solve(model, _tokens(first), breadth=4, slots=3, threshold=0.5, seed=0, max_steps=64)
    expected = np.array(first)[:, None] + 1  # (P, 1): q_halt = steps - token 0 > 0.5
    assert (run.steps == expected).all()
    assert (run.job_preds == expected[:, :, None]).all()
    assert model.calls[0] == 3 and model.calls[-1] == 2  # slots: the loader batch's puzzles (3, then 2)
    assert sum(model.calls) == run.steps.sum()  # every stepped slot holds a job: refilled or dropped at once
    # a halted slot takes the next queued job at once (simulated by hand: 11 steps for the first loader
    # batch, 18 for the second); waiting for the slowest job of a wave would take 4 * 4 + 4 * 6
    assert len(model.calls) == 11 + 18
    # scores: the mean delta over the last min(steps - 1, 3) steps; a job that halted at step 1 scores 0
    assert (run.scores[0] == 0).all() and (run.scores[1:] > 0).all()


def test_min_steps_and_the_cap_bound_the_halting_step() -> None:
    run = official_solve(CountingModel(), _tokens([0, 9]), breadth=2, slots=2, threshold=-math.inf, seed=0,
                         max_steps=4)
    assert (run.steps == 1).all() and (run.scores == 0).all()  # halts at the first step allowed
    capped = official_solve(CountingModel(), _tokens([0, 9]), breadth=2, slots=2, threshold=0.5, seed=0,
                            max_steps=4)
    assert capped.steps.tolist() == [[1, 1], [4, 4]]


def test_the_answer_is_the_lowest_score_job_ties_to_the_lowest_init() -> None:
    preds = np.arange(2 * 3)[:, None].repeat(2, axis=1).reshape(2, 3, 2).astype(np.int32)  # job (p, k): p*3 + k
    scores = np.array([[0.5, 0.2, 0.9], [0.0, 0.4, 0.0]], np.float32)
    run = OfficialRun(preds, scores, np.ones((2, 3), np.int32), 1.0)
    assert run.answers().tolist() == [[1, 1], [3, 3]]


@torch.inference_mode()
def test_on_the_tiny_model_every_job_ends_with_its_own_steps() -> None:
    model = EqRModel(tiny_config(), seed=0).eval()
    tokens = np.random.default_rng(0).integers(1, 5, (3, model.config.seq_len)).astype(np.int32)
    run = official_solve(model, tokens, breadth=2, slots=2, threshold=math.inf, seed=1, max_steps=3)
    assert (run.steps == 3).all() and np.isfinite(run.scores).all() and (run.scores > 0).all()
    again = official_solve(model, tokens, breadth=2, slots=2, threshold=math.inf, seed=1, max_steps=3)
    assert (again.job_preds == run.job_preds).all()  # randomness is the seed's
    assert run.answers().shape == tokens.shape


def _point(side: str, accuracy: float, seconds: float) -> Point:
    return Point(side, "", "", [], seconds=seconds, accuracy=accuracy)


def test_frontier_ratio_takes_the_fastest_eqr_point_at_no_lower_accuracy() -> None:
    official = [_point("official", 0.5, 1.0), _point("official", 0.9, 4.0)]
    runtime = [_point("eqr", 0.6, 0.1), _point("eqr", 0.95, 1.0), _point("eqr", 0.4, 0.01)]
    assert frontier_ratios(official, runtime, puzzles=10) == pytest.approx([10.0, 4.0])
    assert math.isnan(frontier_ratios([_point("official", 0.99, 1.0)], runtime, puzzles=10)[0])


def test_the_goal_depends_on_the_breadth() -> None:
    assert goal_threshold(4) is None
    assert goal_threshold(8) == goal_threshold(32) == GOAL_BY_BREADTH[8] == 2.0
    assert goal_threshold(64) == goal_threshold(128) == 10.0


@pytest.mark.parametrize("breadth, goal", [(2, None), (8, "2")])
def test_bench_prints_the_frontier_result_line(breadth: int, goal: str | None) -> None:
    args = ["bench", "--model", "tiny", "--only", "frontier_vs_official", "--puzzles", "2", "--breadth",
            str(breadth), "--batch", str(max(4, breadth)), "--rule-puzzles", "4", "--precision", "fp32", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1
    name, fields = parse_result_line(lines[0])
    assert name == "frontier_vs_official" and fields["breadth"] == str(breadth)
    assert fields.get("goal_min") == goal
    official = [k for k in fields if k.startswith("official_") and k.endswith("_pps")]
    assert len(official) == len(THRESHOLDS) and all(float(fields[k]) > 0 for k in official)
    runtime = [k for k in fields if k.startswith("eqr_") and k.endswith("_acc")]
    assert "eqr_rule_acc" in runtime and all(0 <= float(fields[k]) <= 1 for k in runtime)
    value = float(fields[name]) if fields[name] != "nan" else math.nan
    assert math.isnan(value) or value > 0
