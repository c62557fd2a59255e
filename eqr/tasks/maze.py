"""Maze-Unique (the official maze data set; docs/formats.md#token-ids) at any size N from 9 to 30.

Tokens: 0 PAD, then the characters "# SGo" as 1..5 (wall, open, start, goal, path). S = N*N,
row-major. A maze is a perfect (spanning-tree) maze carved by randomised depth-first search on
the lattice of cells at even coordinates; the squares between two joined cells are opened and
every other square is wall. For even N this is the official data set's layout exactly (inner (N-1)x(N-1)
grid, last row and column walls: N = 30 gives the official 15x15 cells); for odd N the lattice
reaches the last row and column, so no row is wasted.

Start and goal are open squares whose breadth-first shortest path has a length (moves) drawn
uniformly from `path_len` (default scaled from the official [100, 140] at N = 30 by (N/30)^2).
Because the maze is a tree, that path is the only simple S-G path. The label is the input with
the path's interior squares (length - 1 of them) set to 'o'.

Tiers split the default path-length range in three equal bands: short, medium, long (a path
below the range counts as short, above it as long).

Text format: one maze per line, its N rows joined by '|' (or the N*N characters with no '|'),
characters "# SGo" with '.' also read as open. Only the line break is stripped: leading and
trailing spaces are open squares. A maze line has no comment syntax ('#' is a wall).
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from eqr.contract.errors import EqRError
from eqr.tasks.base import ProgressFn, Puzzles, Task, parse_range, puzzle_rng

CHARS = "# SGo"
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5
SIZES = range(9, 31)
TIERS = ("short", "medium", "long")
STARTS_PER_MAZE = 20  # start squares tried per carved maze before carving another
MAX_TRIES_PER_PUZZLE = 500


def default_path_len(size: int) -> tuple[int, int]:
    """Official 30x30: [100, 140]; other sizes scale with the number of squares."""
    scale = (size / 30) ** 2
    return max(2, round(100 * scale)), max(3, round(140 * scale))


def carve(size: int, rng: np.random.Generator) -> np.ndarray:
    """bool [size, size], True where open: a randomised-DFS spanning tree of the even lattice."""
    open_ = np.zeros((size, size), dtype=bool)
    start = (2 * int(rng.integers(0, (size + 1) // 2)), 2 * int(rng.integers(0, (size + 1) // 2)))
    open_[start] = True
    stack = [start]
    while stack:
        r, c = stack[-1]
        nexts = [(r + dr, c + dc) for dr, dc in ((-2, 0), (2, 0), (0, -2), (0, 2))
                 if 0 <= r + dr < size and 0 <= c + dc < size and not open_[r + dr, c + dc]]
        if not nexts:
            stack.pop()
            continue
        nr, nc = nexts[int(rng.integers(0, len(nexts)))]
        open_[(r + nr) // 2, (c + nc) // 2] = True
        open_[nr, nc] = True
        stack.append((nr, nc))
    return open_


@functools.lru_cache(maxsize=None)
def _neighbours(size: int) -> tuple[tuple[int, ...], ...]:
    """Flat indices of the 4-neighbours of each square."""
    result = []
    for r in range(size):
        for c in range(size):
            result.append(tuple(rr * size + cc for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
                                if 0 <= rr < size and 0 <= cc < size))
    return tuple(result)


def bfs(passable: np.ndarray | list[bool], source: int, size: int) -> list[int]:
    """Moves from `source` to every square through passable squares (-1 where unreachable)."""
    passable = list(np.asarray(passable).reshape(-1).tolist())
    neighbours = _neighbours(size)
    dist = [-1] * (size * size)
    dist[source] = 0
    queue = collections.deque([source])
    while queue:
        square = queue.popleft()
        for nxt in neighbours[square]:
            if dist[nxt] < 0 and passable[nxt]:
                dist[nxt] = dist[square] + 1
                queue.append(nxt)
    return dist


@dataclass(frozen=True, repr=False)
class MazeTask(Task):
    size: int = 30
    name: str = "maze"
    tiers: tuple[str, ...] = TIERS

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise EqRError(f"maze size must be in {SIZES.start}..{SIZES.stop - 1}, got {self.size}")

    @property
    def seq_len(self) -> int:
        return self.size * self.size

    @property
    def vocab_size(self) -> int:
        return len(CHARS) + 1

    def tier_bands(self) -> dict[str, tuple[int, int]]:
        """Inclusive path-length band of each tier, splitting the default range in three."""
        lo, hi = default_path_len(self.size)
        width = hi - lo + 1
        cut1, cut2 = lo + round(width / 3), lo + round(2 * width / 3)
        return {"short": (lo, cut1 - 1), "medium": (cut1, cut2 - 1), "long": (cut2, hi)}

    def tier_of_length(self, length: int) -> str:
        bands = self.tier_bands()
        if length < bands["medium"][0]:
            return "short"
        return "medium" if length < bands["long"][0] else "long"

    # -- generation ----------------------------------------------------------------------------

    def generate(self, n: int, seed: int, tier: str | None = None, *, progress: ProgressFn | None = None,
                 path_len: tuple[int, int] | None = None, exclude: np.ndarray | None = None,
                 **options: Any) -> Puzzles:
        """`n` distinct mazes. path_len=(lo, hi): S-G shortest path length range (moves);
        default `default_path_len(size)`. tier: restrict lengths to that tier's band.
        exclude: mazes (tokens [M, L], e.g. another split) never to produce."""
        if options:
            raise EqRError(f"unknown maze generate options: {', '.join(sorted(options))} (valid: path_len, exclude)")
        self._check_tier(tier)
        lengths = parse_range(path_len, "path_len", 1, self.seq_len) or default_path_len(self.size)
        args = {"n": n, "seed": seed, "tier": tier, "path_len": list(path_len) if path_len else None}
        if tier is not None:
            band = self.tier_bands()[tier]
            if tier == "short":
                band = (1, band[1])
            elif tier == "long":
                band = (band[0], self.seq_len)
            lo, hi = max(lengths[0], band[0]), min(lengths[1], band[1])
            if lo > hi:
                raise EqRError(f"path_len {lengths} has no lengths in the {tier!r} band {self.tier_bands()[tier]} "
                               f"of {self.size}x{self.size} mazes")
            lengths = (lo, hi)
        seen = set() if exclude is None else {row.tobytes() for row in self._as_batch(exclude, "exclude")}
        inputs, labels, found = [], [], []
        for index in range(n):
            maze, solution, length = self._generate_one(seed, index, lengths, seen)
            inputs.append(maze)
            labels.append(solution)
            found.append(length)
            if progress:
                progress(1)
        return Puzzles(
            inputs=np.array(inputs, dtype=np.uint8).reshape(n, self.seq_len),
            labels=np.array(labels, dtype=np.uint8).reshape(n, self.seq_len),
            tiers=np.array([self.tier_of_length(length) for length in found], dtype=str),
            difficulty=np.array(found, dtype=np.float32),
            generate_args=args,
        )

    def _generate_one(self, seed: int, index: int, lengths: tuple[int, int],
                      seen: set[bytes]) -> tuple[np.ndarray, np.ndarray, int]:
        for attempt in range(MAX_TRIES_PER_PUZZLE):
            rng = puzzle_rng(seed, index, attempt)
            target = int(rng.integers(lengths[0], lengths[1] + 1))
            open_ = carve(self.size, rng).reshape(-1)
            squares = np.flatnonzero(open_)
            for start in rng.choice(squares, size=min(STARTS_PER_MAZE, len(squares)), replace=False).tolist():
                dist = np.array(bfs(open_, start, self.size))
                goals = np.flatnonzero(dist == target)
                if not len(goals):
                    continue
                goal = int(rng.choice(goals))
                maze = np.where(open_, OPEN, WALL).astype(np.uint8)
                maze[start], maze[goal] = START, GOAL
                key = maze.tobytes()
                if key in seen:
                    break
                seen.add(key)
                return maze, self._mark_path(maze, dist, goal), target
        raise EqRError(f"no {self.size}x{self.size} maze with a path length in {list(lengths)} after "
                       f"{MAX_TRIES_PER_PUZZLE} tries; lower the path_len range")

    def _mark_path(self, maze: np.ndarray, dist: np.ndarray, goal: int) -> np.ndarray:
        """The label: walk back from the goal along decreasing BFS distance, marking 'o'."""
        label = maze.copy()
        neighbours = _neighbours(self.size)
        square = goal
        while dist[square] > 1:
            square = next(nxt for nxt in neighbours[square] if dist[nxt] == dist[square] - 1)
            label[square] = PATH
        return label

    # -- grading and rules ---------------------------------------------------------------------

    def path_lengths(self, inputs: np.ndarray) -> np.ndarray:
        """int [N]: S-G shortest path length of each maze (-1: malformed or no path)."""
        inputs = self._as_batch(inputs, "inputs")
        lengths = []
        for row in inputs:
            ends = self._ends(row)
            if ends is None:
                lengths.append(-1)
                continue
            lengths.append(bfs(row != WALL, ends[0], self.size)[ends[1]])
        return np.array(lengths, dtype=np.int64)

    def tier_of(self, inputs: np.ndarray) -> np.ndarray:
        return np.array([self.tier_of_length(int(length)) if length > 0 else "invalid"
                         for length in self.path_lengths(inputs)], dtype=str)

    def _ends(self, row: np.ndarray) -> tuple[int, int] | None:
        """(start, goal) squares of a well-formed maze input, else None."""
        if row.min() < WALL or row.max() > GOAL:
            return None
        starts, goals = np.flatnonzero(row == START), np.flatnonzero(row == GOAL)
        if len(starts) != 1 or len(goals) != 1:
            return None
        return int(starts[0]), int(goals[0])

    def is_valid(self, inputs: np.ndarray, preds: np.ndarray) -> np.ndarray:
        inputs, preds = self._as_batch(inputs, "inputs"), self._as_batch(preds, "preds")
        if len(inputs) != len(preds):
            raise EqRError(f"inputs and preds differ in length: {len(inputs)} vs {len(preds)}")
        return np.array([self._explain(maze, pred) is None for maze, pred in zip(inputs, preds)], dtype=bool)

    def problems(self, inputs: np.ndarray, labels: np.ndarray) -> list[tuple[int, str]]:
        inputs, labels = self._as_batch(inputs, "inputs"), self._as_batch(labels, "labels")
        found = []
        for index, (maze, label) in enumerate(zip(inputs, labels)):
            problem = self._explain(maze, label)
            if problem is not None:
                found.append((index, problem))
        return found

    def _explain(self, maze: np.ndarray, pred: np.ndarray) -> str | None:
        """None if `pred` marks a shortest simple S-G path through open squares of `maze`."""
        if maze.min() < WALL or maze.max() > GOAL:
            bad = int(np.flatnonzero((maze < WALL) | (maze > GOAL))[0])
            return f"input square {self._where(bad)} holds token {int(maze[bad])}, expected 1..4 ('# SG')"
        ends = self._ends(maze)
        if ends is None:
            return f"input has {int((maze == START).sum())} starts and {int((maze == GOAL).sum())} goals, expected 1 each"
        kept = np.where(maze == OPEN, (pred == OPEN) | (pred == PATH), pred == maze)
        if not kept.all():
            bad = int(np.flatnonzero(~kept)[0])
            return (f"answer square {self._where(bad)} is {self._char(pred[bad])!r} where the input has "
                    f"{self._char(maze[bad])!r} (only open squares may become 'o')")
        start, goal = ends
        shortest = bfs(maze != WALL, start, self.size)[goal]
        if shortest < 0:
            return "input has no path from S to G"
        marked = int((pred == PATH).sum())
        along_path = bfs((pred == PATH) | (pred == GOAL), start, self.size)[goal]
        if along_path < 0:
            return "answer's 'o' squares do not connect S to G"
        if along_path != shortest or marked != shortest - 1:
            return (f"answer marks {marked} 'o' squares; the shortest S-G path has {shortest - 1} "
                    f"(length {shortest} moves)")
        return None

    def _where(self, square: int) -> str:
        return f"(row {square // self.size + 1}, col {square % self.size + 1})"

    @staticmethod
    def _char(token: int) -> str:
        return CHARS[token - 1] if 1 <= token <= len(CHARS) else "?"

    # -- text ----------------------------------------------------------------------------------

    def parse_line(self, text: str) -> np.ndarray:
        body = text.rstrip("\r\n")
        rows = body.split("|") if "|" in body else [body[i:i + self.size] for i in range(0, len(body), self.size)]
        if len(body.replace("|", "")) != self.seq_len or len(rows) != self.size or any(len(r) != self.size for r in rows):
            lengths = sorted({len(r) for r in rows})
            raise EqRError(f"expected {self.size} rows of {self.size} characters for a {self.size}x{self.size} maze "
                           f"(rows joined by '|'), got {len(rows)} rows of length {lengths}")
        tokens = np.empty(self.seq_len, dtype=np.uint8)
        for square, char in enumerate("".join(rows)):
            index = CHARS.find(" " if char == "." else char)
            if index < 0:
                raise EqRError(f"square {self._where(square)} is {char!r}; a maze takes the characters "
                               f"'#', ' ' (or '.'), 'S', 'G' and 'o'")
            tokens[square] = index + 1
        return tokens

    def format_tokens(self, tokens: np.ndarray) -> str:
        """Rows joined by '|'; '?' for a token outside "# SGo" (e.g. PAD in a model answer)."""
        chars = "".join(self._char(int(t)) for t in np.asarray(tokens).reshape(-1))
        return "|".join(chars[r * self.size:(r + 1) * self.size] for r in range(self.size))

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"path_len_default": list(default_path_len(self.size)),
                                     "tier_bands": {k: list(v) for k, v in self.tier_bands().items()}}
