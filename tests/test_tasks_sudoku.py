"""Sudoku task: generation (unique, graded), grading, rule checks, augmentation, text format."""
from __future__ import annotations

import numpy as np
import pytest

from eqr.contract.errors import EqRError
from eqr.tasks import get_task
from eqr.tasks.sudoku import Backtracker, augment, augment_groups, grade

# Wikipedia's example puzzle: naked and hidden singles solve it.
EASY_9 = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
# Arto Inkala's "world's hardest sudoku" (2012): needs many guesses.
HARD_9 = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."


@pytest.mark.parametrize("size", [4, 6, 9])
def test_generated_puzzles_are_unique_valid_and_graded(size):
    task = get_task("sudoku", size)
    puzzles = task.generate(3 if size == 9 else 12, seed=7)
    assert puzzles.inputs.dtype == np.uint8 and puzzles.inputs.shape == (len(puzzles), size * size)
    assert (task.solution_counts(puzzles.inputs) == 1).all()
    assert task.is_valid(puzzles.inputs, puzzles.labels).all()
    assert (task.tier_of(puzzles.inputs) == puzzles.tiers).all()
    assert len({row.tobytes() for row in puzzles.inputs}) == len(puzzles)
    solver = Backtracker(size)
    for puzzle, label in zip(puzzles.inputs, puzzles.labels):
        solutions, _ = solver.solve((puzzle.astype(int) - 1).tolist(), limit=2)
        assert solutions == [(label.astype(int) - 1).tolist()]


@pytest.mark.parametrize("size,tiers", [(4, ("easy", "medium", "hard")), (6, ("easy", "medium", "hard")),
                                        (9, ("easy", "hard"))])
def test_requested_tier_matches_the_grader(size, tiers):
    task = get_task("sudoku", size)
    for tier in tiers:
        puzzles = task.generate(2, seed=3, tier=tier)
        assert list(puzzles.tiers) == [tier, tier]
        assert list(task.tier_of(puzzles.inputs)) == [tier, tier]
        assert (task.solution_counts(puzzles.inputs) == 1).all()


def test_grader_separates_singles_from_guessing():
    task = get_task("sudoku", 9)
    tiers = task.tier_of(np.stack([task.parse_line(EASY_9), task.parse_line(HARD_9)]))
    assert list(tiers) == ["easy", "hard"]
    values = (task.parse_line(HARD_9).astype(int) - 1).tolist()
    assert grade(values, 9)[1] >= 4.0
    assert grade(values, 9) == grade(values, 9)  # a pure function of the puzzle


def test_small_boards_grade_by_blanks():
    task = get_task("sudoku", 4)
    solution = task.generate(1, seed=0, blanks=(0, 0)).labels[0]
    blanked = solution.copy()
    blanked[:5] = 1
    assert task.tier_of(blanked)[0] == "easy"
    assert task.solution_counts(np.full(16, 1, dtype=np.uint8))[0] == 2  # counted up to the limit
    conflicting = solution.copy()
    conflicting[1] = conflicting[0]
    assert task.tier_of(conflicting)[0] == "unsolvable"


def test_generation_is_seeded_and_prefix_stable():
    task = get_task("sudoku", 6)
    a, b = task.generate(5, seed=11), task.generate(3, seed=11)
    assert np.array_equal(a.inputs[:3], b.inputs) and np.array_equal(a.labels[:3], b.labels)
    assert not np.array_equal(task.generate(3, seed=12).inputs, b.inputs)


def test_blanks_range_is_respected_and_exclude_is_honoured():
    task = get_task("sudoku", 6)
    puzzles = task.generate(10, seed=1, blanks=(4, 9))
    blanks = (puzzles.inputs == 1).sum(axis=1)
    assert blanks.min() >= 4 and blanks.max() <= 9
    again = task.generate(10, seed=1, blanks=(4, 9), exclude=puzzles.inputs[:5])
    assert not {r.tobytes() for r in again.inputs} & {r.tobytes() for r in puzzles.inputs[:5]}


def test_generate_rejects_bad_options():
    task = get_task("sudoku", 4)
    with pytest.raises(EqRError, match="tier"):
        task.generate(1, seed=0, tier="extreme")
    with pytest.raises(EqRError, match="at most 12 blanks"):
        task.generate(1, seed=0, blanks=(13, 14))
    with pytest.raises(EqRError, match="unknown sudoku generate options"):
        task.generate(1, seed=0, path_len=(2, 3))
    with pytest.raises(EqRError, match="size"):
        get_task("sudoku", 5)


def test_validator_rejects_broken_answers():
    task = get_task("sudoku", 4)
    puzzles = task.generate(1, seed=2, blanks=(6, 8))
    puzzle, label = puzzles.inputs[0], puzzles.labels[0]
    given = int(np.flatnonzero(puzzle >= 2)[0])
    changed_given = label.copy()
    changed_given[given] = 2 + (label[given] - 1) % 4  # another digit
    swapped = label.copy()  # swap two cells of row 1 (keeps the row valid, breaks columns)
    swapped[[0, 1]] = swapped[[1, 0]]
    with_blank = label.copy()
    with_blank[5] = 1
    with_pad = label.copy()
    with_pad[5] = 0
    preds = np.stack([label, changed_given, swapped, with_blank, with_pad])
    assert list(task.is_valid(np.repeat(puzzle[None], 5, axis=0), preds)) == [True, False, False, False, False]
    problems = dict(task.problems(np.repeat(puzzle[None], 3, axis=0), preds[:3]))
    assert set(problems) == {1, 2}
    assert "given" in problems[1] or "repeats" in problems[1]
    assert "repeats a digit in column" in problems[2] or "given" in problems[2]


@pytest.mark.parametrize("size", [4, 6, 9])
def test_augmentations_keep_puzzles_valid(size):
    task = get_task("sudoku", size)
    puzzles = task.generate(2, seed=5, blanks=(size, 2 * size))
    rng = np.random.default_rng(0)
    inputs, labels, groups = augment_groups(puzzles.inputs, puzzles.labels, 6, rng)
    assert inputs.shape == (14, size * size) and list(groups) == [0, 7, 14]
    assert np.array_equal(inputs[[0, 7]], puzzles.inputs)
    assert task.is_valid(inputs, labels).all()
    assert ((inputs == 1).sum(axis=1) == np.repeat((puzzles.inputs == 1).sum(axis=1), 7)).all()
    assert len({row.tobytes() for row in inputs}) > 7  # the copies differ
    one_in, one_label = augment(puzzles.inputs[0], puzzles.labels[0], np.random.default_rng(1))
    assert one_in.shape == (size * size,) and task.is_valid(one_in, one_label).all()


def test_augment_rejects_mismatched_shapes():
    with pytest.raises(EqRError, match="augment"):
        augment(np.ones((2, 16), np.uint8), np.ones((2, 81), np.uint8), np.random.default_rng(0))


def test_text_format_is_robust_and_round_trips():
    task = get_task("sudoku", 9)
    tokens = task.parse_line(EASY_9)
    assert task.format_tokens(tokens) == EASY_9
    spaced = " ".join(EASY_9.replace(".", "0")) + "   # a comment\r\n"
    assert np.array_equal(task.parse_line(spaced), tokens)
    assert tokens[0] == 6 and tokens[2] == 1  # digit 5 -> token 6, blank -> 1
    with pytest.raises(EqRError, match="expected 81 cells"):
        task.parse_line(EASY_9[:-1])
    with pytest.raises(EqRError, match="cell 3 is 'x'"):
        task.parse_line(EASY_9[:2] + "x" + EASY_9[3:])
    with pytest.raises(EqRError, match="digits 1-4"):
        get_task("sudoku", 4).parse_line("1234341221434321".replace("4", "5", 1))
    assert get_task("sudoku", 4).format_tokens(np.array([0, 1, 2, 5] * 4)) == "?.14" * 4
