"""Maze task: perfect-maze layout, path lengths and tiers, the shortest-path validator, text."""
from __future__ import annotations

import numpy as np
import pytest

from eqr.contract.errors import EqRError
from eqr.tasks import get_task
from eqr.tasks.maze import GOAL, OPEN, PATH, START, WALL, bfs, default_path_len

# An open 9x9 room with walls around it: S and G are 3 moves apart along row 2.
ROOM = "|".join(["#########", "#S  G   #"] + ["#       #"] * 6 + ["#########"])


@pytest.mark.parametrize("size", [9, 10, 11, 30])
def test_generated_mazes_pass_the_validator(size):
    task = get_task("maze", size)
    puzzles = task.generate(4 if size == 30 else 10, seed=3)
    lo, hi = default_path_len(size)
    assert puzzles.inputs.shape == (len(puzzles), size * size) and puzzles.inputs.dtype == np.uint8
    assert task.is_valid(puzzles.inputs, puzzles.labels).all()
    assert task.problems(puzzles.inputs, puzzles.labels) == []
    lengths = task.path_lengths(puzzles.inputs)
    assert np.array_equal(lengths, puzzles.difficulty.astype(int))
    assert (lengths >= lo).all() and (lengths <= hi).all()
    assert ((puzzles.labels == PATH).sum(axis=1) == lengths - 1).all()
    assert (task.tier_of(puzzles.inputs) == puzzles.tiers).all()
    assert len({row.tobytes() for row in puzzles.inputs}) == len(puzzles)


@pytest.mark.parametrize("size", [9, 12])
def test_layout_is_a_perfect_maze(size):
    task = get_task("maze", size)
    maze = task.generate(1, seed=0).inputs[0].reshape(size, size)
    if size % 2 == 0:  # even N: the last row and column are walls (eqr/tasks/maze.py)
        assert (maze[-1] == WALL).all() and (maze[:, -1] == WALL).all()
    open_ = maze != WALL
    assert open_[::2, ::2].all()  # every lattice cell is open
    assert not open_[1::2, 1::2].any()  # squares between four cells are walls
    squares = np.flatnonzero(open_.reshape(-1))
    dist = bfs(open_, int(squares[0]), size)
    assert all(dist[s] >= 0 for s in squares)  # connected
    horizontal = (open_[:, :-1] & open_[:, 1:]).sum()
    vertical = (open_[:-1, :] & open_[1:, :]).sum()
    assert horizontal + vertical == len(squares) - 1  # a tree: edges = squares - 1


def test_tiers_and_path_len_option():
    task = get_task("maze", 11)
    for tier in task.tiers:
        puzzles = task.generate(3, seed=1, tier=tier)
        band = task.tier_bands()[tier]
        assert list(puzzles.tiers) == [tier] * 3
        assert ((puzzles.difficulty >= band[0]) & (puzzles.difficulty <= band[1])).all()
    short = task.generate(5, seed=1, path_len=(2, 4))
    assert set(short.difficulty.astype(int)) <= {2, 3, 4} and (short.tiers == "short").all()
    with pytest.raises(EqRError, match="no lengths in the 'long' band"):
        task.generate(1, seed=1, tier="long", path_len=(2, 4))
    with pytest.raises(EqRError, match="path_len"):
        task.generate(1, seed=1, path_len=(5, 2))
    with pytest.raises(EqRError, match="maze size"):
        get_task("maze", 31)


def _room_answer(o_squares: list[tuple[int, int]]) -> np.ndarray:
    task = get_task("maze", 9)
    answer = task.parse_line(ROOM).reshape(9, 9).copy()
    for r, c in o_squares:
        answer[r, c] = PATH
    return answer.reshape(-1)


def test_validator_accepts_only_a_shortest_simple_path():
    task = get_task("maze", 9)
    maze = task.parse_line(ROOM)
    straight = _room_answer([(1, 2), (1, 3)])
    detour = _room_answer([(2, 1), (2, 2), (2, 3), (2, 4)])  # simple, connected, 5 moves instead of 3
    gap = _room_answer([(1, 2)])
    extra = _room_answer([(1, 2), (1, 3), (5, 5)])
    moved_goal = straight.copy()
    moved_goal[1 * 9 + 4], moved_goal[1 * 9 + 5] = OPEN, GOAL
    through_wall = straight.copy()
    through_wall[0] = PATH
    answers = [straight, detour, gap, extra, moved_goal, through_wall]
    assert list(task.is_valid(np.stack([maze] * len(answers)), np.stack(answers))) == [True] + [False] * 5
    problems = dict(task.problems(np.stack([maze] * 4), np.stack(answers[:4])))
    assert "shortest" in problems[1] and "do not connect" in problems[2] and "marks 3 'o'" in problems[3]


def test_validator_rejects_malformed_inputs():
    task = get_task("maze", 9)
    maze = task.parse_line(ROOM)
    two_starts = maze.copy()
    two_starts[20] = START
    answer = _room_answer([(1, 2), (1, 3)])
    assert not task.is_valid(two_starts, answer)[0]
    assert "2 starts" in task.problems(two_starts, answer)[0][1]
    assert task.tier_of(two_starts)[0] == "invalid"


def test_text_format_round_trips():
    task = get_task("maze", 9)
    maze = task.parse_line(ROOM)
    assert maze[10] == START and maze[13] == GOAL and maze[0] == WALL and maze[11] == OPEN
    assert task.format_tokens(maze) == ROOM
    assert np.array_equal(task.parse_line(ROOM.replace(" ", ".") + "\r\n"), maze)
    assert np.array_equal(task.parse_line(ROOM.replace("|", "")), maze)
    generated = task.generate(2, seed=9)
    for tokens in (*generated.inputs, *generated.labels):
        assert np.array_equal(task.parse_line(task.format_tokens(tokens)), tokens)
    with pytest.raises(EqRError, match="expected 9 rows of 9"):
        task.parse_line(ROOM[:-2])
    with pytest.raises(EqRError, match="'x'"):
        task.parse_line(ROOM.replace("S", "x"))
