"""Sudoku for any box shape: 4x4 (2x2 boxes), 6x6 (2x3), 9x9 (3x3).

Tokens (docs/formats.md#token-ids, Sudoku-Extreme): 0 PAD, 1 blank, 2..n+1 the digits 1..n, row-major; labels
are the full solved grid. Internally a grid is a list of cell values 0..n (0 blank).

The backtracker keeps one candidate bitmask per cell (bit d-1 for digit d), propagates naked and
hidden singles to a fixed point, then branches on a cell with the fewest candidates. It counts
solutions (uniqueness), and counts guesses (grading).

Text format: one puzzle per line, n*n cells row-major, '.' or '0' for a blank, digits 1..n.
Whitespace anywhere in the line is ignored, a '#' starts a comment (whole-line or trailing),
and a line that is empty after that holds no puzzle.

Tiers (`grade`), easiest first. A puzzle either falls to naked and hidden singles alone, or
needs guesses; "guesses" are the branch assignments the backtracker tries before it finds the
solution, averaged over `GRADE_ISOMORPHS` random isomorphs of the puzzle (relabelled digits,
permuted rows and columns) since one ordering can be lucky. The isomorphs are seeded from the
puzzle itself, so a grade is a pure function of the puzzle.
  singles-only  easy up to `TierRule.easy_max_blanks` blanks, medium up to
                `medium_max_blanks`, hard above
  guesses       medium below `TierRule.hard_min_guesses` mean guesses, hard at or above
At 9x9 about half the minimal puzzles need guesses, so the blank limits are off (81) and the
tiers are singles-only (easy) / fewer than 4 mean guesses (medium) / 4 or more (hard); random
minimal 9x9 puzzles come out about 48% / 27% / 25% (300 from `eqr data generate --seed 0`).
At 4x4 every uniquely solvable puzzle falls to singles and at 6x6 nearly every one, so there
the blank count carries the grade: 4x4 easy <= 6, medium 7-9, hard 10-12 blanks; 6x6 easy
<= 16, medium 17-22, hard >= 23 (or any guess). Without an explicit blanks range,
`generate(tier=...)` draws blanks inside the tier's band. Augmented copies keep their grade
except near the 9x9 medium/hard line: singles-solvability and blanks are isomorph-invariant,
the sampled guess mean is not.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from eqr.contract.errors import EqRError
from eqr.tasks.base import PAD_ID, ProgressFn, Puzzles, Task, parse_range, puzzle_rng

BLANK_ID = 1  # digits d are tokens d + 1
BOX_SHAPES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # size -> (box rows, box columns)
TIERS = ("easy", "medium", "hard")
UNSOLVABLE = "unsolvable"  # tier_of for a puzzle with no solution
GRADE_ISOMORPHS = 4


@dataclass(frozen=True)
class TierRule:
    """Thresholds of `grade` at one size (see the module docstring)."""

    easy_max_blanks: int  # singles-only puzzles with at most this many blanks are easy
    medium_max_blanks: int  # singles-only puzzles with at most this many blanks are medium, else hard
    hard_min_guesses: float  # puzzles needing guesses: hard at or above this mean, else medium

    def blanks_for(self, tier: str, cells: int) -> tuple[int, int] | None:
        """Default blanks range when generating `tier` (None: minimal puzzles)."""
        if tier == "easy" and self.easy_max_blanks < cells:
            return (self.easy_max_blanks + 1) // 2, self.easy_max_blanks
        if tier == "medium" and self.medium_max_blanks < cells:
            return self.easy_max_blanks + 1, self.medium_max_blanks
        if tier == "hard" and self.medium_max_blanks < cells:
            return self.medium_max_blanks + 1, cells
        return None


TIER_RULES = {
    4: TierRule(easy_max_blanks=6, medium_max_blanks=9, hard_min_guesses=1.0),
    6: TierRule(easy_max_blanks=16, medium_max_blanks=22, hard_min_guesses=1.0),
    9: TierRule(easy_max_blanks=81, medium_max_blanks=81, hard_min_guesses=4.0),
}
MAX_TRIES_PER_PUZZLE = 500
MAX_BLANKS = {4: 12, 6: 28, 9: 64}  # most blanks a uniquely solvable puzzle can have (fewest clues 4, 8, 17)


# --------------------------------------------------------------------------------------------
# Geometry and the bitmask backtracker


@dataclass(frozen=True)
class Geometry:
    """Cells, units (rows, columns, boxes) and peers of one board shape."""

    size: int
    box_rows: int
    box_cols: int
    units: tuple[tuple[int, ...], ...]  # 3n units of n cells
    peers: tuple[tuple[int, ...], ...]  # per cell: the other cells sharing a unit with it

    @property
    def cells(self) -> int:
        return self.size * self.size

    @property
    def full_mask(self) -> int:
        return (1 << self.size) - 1


@functools.lru_cache(maxsize=None)
def geometry(size: int) -> Geometry:
    if size not in BOX_SHAPES:
        raise EqRError(f"sudoku size must be one of {', '.join(map(str, BOX_SHAPES))}, got {size}")
    box_rows, box_cols = BOX_SHAPES[size]
    rows = [tuple(r * size + c for c in range(size)) for r in range(size)]
    cols = [tuple(r * size + c for r in range(size)) for c in range(size)]
    boxes = [
        tuple((br + r) * size + bc + c for r in range(box_rows) for c in range(box_cols))
        for br in range(0, size, box_rows) for bc in range(0, size, box_cols)
    ]
    units = tuple(rows + cols + boxes)
    peers = tuple(
        tuple(sorted({p for unit in units if cell in unit for p in unit} - {cell})) for cell in range(size * size)
    )
    return Geometry(size, box_rows, box_cols, units, peers)


class Backtracker:
    """Bitmask constraint propagation (naked + hidden singles) with MRV backtracking."""

    def __init__(self, size: int):
        self.geo = geometry(size)

    def candidates(self, values: Sequence[int]) -> list[int] | None:
        """Candidate masks after propagating the givens; None if they contradict."""
        cand, queue = self._givens(values)
        return cand if self._propagate(cand, queue) else None

    def _givens(self, values: Sequence[int]) -> tuple[list[int], list[int]]:
        """Masks with the givens placed, and the givens queued for elimination from their peers."""
        cand = [self.geo.full_mask] * self.geo.cells
        queue = []
        for cell, value in enumerate(values):
            if value:
                cand[cell] = 1 << (value - 1)
                queue.append(cell)
        return cand, queue

    def solve(self, values: Sequence[int], limit: int = 2, exclude: tuple[int, int] | None = None,
              rng: np.random.Generator | None = None) -> tuple[list[list[int]], int]:
        """Up to `limit` solutions (cell value lists) and the number of guesses made.

        exclude=(cell, digit) forbids that digit in that cell (a fast uniqueness test when a
        clue is removed); rng shuffles the order digits are tried in (random full grids).
        """
        cand, queue = self._givens(values)
        if exclude is not None:
            cell, digit = exclude
            cand[cell] &= ~(1 << (digit - 1))
            if cand[cell] == 0:
                return [], 0
        solutions: list[list[int]] = []
        guesses = self._search(cand, queue, limit, solutions, rng)
        return solutions, guesses

    def _propagate(self, cand: list[int], queue: list[int]) -> bool:
        """Eliminate placed digits from peers and place hidden singles until nothing changes."""
        peers, units, full = self.geo.peers, self.geo.units, self.geo.full_mask
        while True:
            while queue:
                cell = queue.pop()
                bit = cand[cell]
                for peer in peers[cell]:
                    mask = cand[peer]
                    if mask & bit:
                        mask &= ~bit
                        if not mask:
                            return False
                        cand[peer] = mask
                        if not mask & (mask - 1):
                            queue.append(peer)
            for unit in units:
                seen_once = seen_twice = 0
                for cell in unit:
                    mask = cand[cell]
                    seen_twice |= seen_once & mask
                    seen_once |= mask
                if seen_once != full:
                    return False  # some digit has no place left in this unit
                hidden = seen_once & ~seen_twice
                if not hidden:
                    continue
                for cell in unit:
                    mask = cand[cell]
                    only_here = mask & hidden
                    if only_here and mask != only_here:
                        if only_here & (only_here - 1):
                            return False  # two digits can only go in this one cell
                        cand[cell] = only_here
                        queue.append(cell)
            if not queue:
                return True

    def _search(self, cand: list[int], queue: list[int], limit: int, solutions: list[list[int]],
                rng: np.random.Generator | None) -> int:
        if not self._propagate(cand, queue):
            return 0
        best_cell, best_count = -1, self.geo.size + 1
        for cell, mask in enumerate(cand):
            if mask & (mask - 1):
                count = mask.bit_count()
                if count < best_count:
                    best_cell, best_count = cell, count
                    if count == 2:
                        break
        if best_cell < 0:
            solutions.append([mask.bit_length() for mask in cand])
            return 0
        mask = cand[best_cell]
        bits = [1 << d for d in range(self.geo.size) if mask >> d & 1]
        if rng is not None:
            bits = [bits[i] for i in rng.permutation(len(bits))]
        guesses = 0
        for bit in bits:
            child = cand.copy()
            child[best_cell] = bit
            guesses += 1 + self._search(child, [best_cell], limit, solutions, rng)
            if len(solutions) >= limit:
                break
        return guesses


# --------------------------------------------------------------------------------------------
# Isomorphs (docs/training.md#data-and-curricula, generalised to box shapes)


@dataclass(frozen=True)
class Transform:
    """A validity-preserving relabelling: new cell i takes old cell `cell_index[i]`, and token t
    becomes `token_map[t]` (PAD and blank map to themselves)."""

    cell_index: np.ndarray  # int [L]
    token_map: np.ndarray  # uint8 [n + 2]

    def apply(self, tokens: np.ndarray) -> np.ndarray:
        return self.token_map[tokens[..., self.cell_index]]


def random_transform(size: int, rng: np.random.Generator) -> Transform:
    """Relabel digits; transpose with p=0.5 (square boxes only: a 2x3 box would become
    3x2); permute bands and the rows inside each band, stacks and the columns inside each."""
    geo = geometry(size)
    token_map = np.concatenate([[PAD_ID, BLANK_ID], 2 + rng.permutation(size)]).astype(np.uint8)
    transpose = geo.box_rows == geo.box_cols and rng.random() < 0.5
    row_perm = np.concatenate([band * geo.box_rows + rng.permutation(geo.box_rows)
                               for band in rng.permutation(size // geo.box_rows)])
    col_perm = np.concatenate([stack * geo.box_cols + rng.permutation(geo.box_cols)
                               for stack in rng.permutation(size // geo.box_cols)])
    if transpose:  # new (r, c) <- transposed (row_perm[r], col_perm[c]) = old (col_perm[c], row_perm[r])
        cell_index = col_perm[None, :] * size + row_perm[:, None]
    else:  # new (r, c) <- old (row_perm[r], col_perm[c])
        cell_index = row_perm[:, None] * size + col_perm[None, :]
    return Transform(cell_index.reshape(-1), token_map)


def augment(inputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random isomorph per row, the same transform for a puzzle and its solution.

    inputs, labels: uint8 [L] or [N, L] with L = n*n; returns arrays of the same shapes.
    """
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    if inputs.shape != labels.shape or inputs.shape[-1] not in {s * s for s in BOX_SHAPES}:
        raise EqRError(f"augment needs inputs and labels of one shape [N, n*n] with n in {sorted(BOX_SHAPES)}, "
                       f"got {list(inputs.shape)} and {list(labels.shape)}")
    size = int(round(inputs.shape[-1] ** 0.5))
    if inputs.ndim == 1:
        t = random_transform(size, rng)
        return t.apply(inputs), t.apply(labels)
    out_inputs, out_labels = np.empty_like(inputs), np.empty_like(labels)
    for row in range(len(inputs)):
        t = random_transform(size, rng)
        out_inputs[row], out_labels[row] = t.apply(inputs[row]), t.apply(labels[row])
    return out_inputs, out_labels


def augment_groups(inputs: np.ndarray, labels: np.ndarray, copies: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each puzzle followed by `copies` augmented variants (the group layout of docs/formats.md#hrm).

    Returns inputs, labels [N * (1 + copies), L] and group offsets int32 [N + 1].
    """
    group = 1 + copies
    out_inputs = np.repeat(inputs, group, axis=0)  # (N * group, L)
    out_labels = np.repeat(labels, group, axis=0)
    variants = np.arange(len(out_inputs)) % group != 0
    out_inputs[variants], out_labels[variants] = augment(out_inputs[variants], out_labels[variants], rng)
    offsets = np.arange(0, len(out_inputs) + 1, group, dtype=np.int32)
    return out_inputs, out_labels, offsets


# --------------------------------------------------------------------------------------------
# Generation and grading


def _grade_rng(values: Sequence[int]) -> np.random.Generator:
    digest = hashlib.sha256(bytes(values)).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def grade(values: Sequence[int], size: int, backtracker: Backtracker | None = None) -> tuple[str, float]:
    """(tier, mean guesses) of one puzzle given as cell values 0..n; see the module docstring."""
    backtracker = backtracker or Backtracker(size)
    cand = backtracker.candidates(values)
    if cand is None:
        return UNSOLVABLE, float("nan")
    rule = TIER_RULES[size]
    blanks = sum(1 for v in values if not v)
    if all(not mask & (mask - 1) for mask in cand):
        if blanks <= rule.easy_max_blanks:
            return "easy", 0.0
        return ("medium" if blanks <= rule.medium_max_blanks else "hard"), 0.0
    rng = _grade_rng(values)
    total = 0
    for _ in range(GRADE_ISOMORPHS):
        t = random_transform(size, rng)
        permuted = t.apply(np.asarray(values, dtype=np.uint8) + 1) - 1  # values <-> tokens, blank 0 <-> 1
        solutions, guesses = backtracker.solve(permuted.tolist(), limit=1)
        if not solutions:
            return UNSOLVABLE, float("nan")
        total += guesses
    mean = total / GRADE_ISOMORPHS
    return ("hard" if mean >= rule.hard_min_guesses else "medium"), mean


def random_solution(size: int, rng: np.random.Generator, backtracker: Backtracker | None = None) -> list[int]:
    """A random full grid: a randomised search from the empty board, then a random isomorph
    (the search alone always branches on the same first cells)."""
    backtracker = backtracker or Backtracker(size)
    solutions, _ = backtracker.solve([0] * size * size, limit=1, rng=rng)
    grid = np.asarray(solutions[0], dtype=np.uint8) + 1  # values -> tokens
    return (random_transform(size, rng).apply(grid) - 1).tolist()


def remove_clues(solution: Sequence[int], target_blanks: int, rng: np.random.Generator,
                 backtracker: Backtracker) -> list[int]:
    """Blank cells of `solution` in random order, skipping any whose removal would allow a second
    solution, until `target_blanks` are blank or no cell can go (a minimal puzzle)."""
    puzzle = list(solution)
    blanks = 0
    for cell in rng.permutation(len(puzzle)).tolist():
        if blanks >= target_blanks:
            break
        digit = puzzle[cell]
        puzzle[cell] = 0
        others, _ = backtracker.solve(puzzle, limit=1, exclude=(cell, digit))
        if others:
            puzzle[cell] = digit
        else:
            blanks += 1
    return puzzle


# --------------------------------------------------------------------------------------------
# The task


@functools.lru_cache(maxsize=None)
def _char_tokens(size: int) -> np.ndarray:
    """uint8 [256]: the token of each ASCII character in the text format, 0 where not allowed."""
    table = np.zeros(256, dtype=np.uint8)
    table[ord(".")] = table[ord("0")] = BLANK_ID
    for digit in range(1, size + 1):
        table[ord(str(digit))] = digit + 1
    return table


@dataclass(frozen=True, repr=False)
class SudokuTask(Task):
    size: int = 9
    name: str = "sudoku"
    tiers: tuple[str, ...] = TIERS

    def __post_init__(self) -> None:
        geometry(self.size)  # validates the size

    @property
    def seq_len(self) -> int:
        return self.size * self.size

    @property
    def vocab_size(self) -> int:
        return self.size + 2

    @property
    def geometry(self) -> Geometry:
        return geometry(self.size)

    def generate(self, n: int, seed: int, tier: str | None = None, *, progress: ProgressFn | None = None,
                 blanks: tuple[int, int] | None = None, exclude: np.ndarray | None = None,
                 **options: Any) -> Puzzles:
        """`n` distinct uniquely solvable puzzles.

        blanks=(lo, hi): aim for a number of blanks drawn uniformly from [lo, hi] (a curriculum
        knob); a grid that turns minimal first is kept if it has at least lo blanks, else redrawn.
        None: the tier's blank band (`TierRule.blanks_for`), or minimal puzzles.
        tier: keep only puzzles of that tier (rejection sampling).
        exclude: puzzles (tokens [M, L], e.g. another split) never to produce.
        """
        if options:
            raise EqRError(f"unknown sudoku generate options: {', '.join(sorted(options))} (valid: blanks, exclude)")
        self._check_tier(tier)
        blanks = parse_range(blanks, "blanks", 0, self.seq_len)
        if blanks is not None and blanks[0] > MAX_BLANKS[self.size]:
            raise EqRError(f"a uniquely solvable {self.size}x{self.size} sudoku has at most {MAX_BLANKS[self.size]} "
                           f"blanks; lower the blanks range {blanks}")
        args = {"n": n, "seed": seed, "tier": tier, "blanks": list(blanks) if blanks else None}
        if blanks is None and tier is not None:
            blanks = TIER_RULES[self.size].blanks_for(tier, self.seq_len)
        backtracker = Backtracker(self.size)
        seen = set() if exclude is None else {(row - 1).tobytes() for row in self._as_batch(exclude, "exclude")}
        inputs, labels, tiers, difficulty = [], [], [], []
        for index in range(n):
            puzzle, solution, puzzle_tier, guesses = self._generate_one(seed, index, tier, blanks, seen, backtracker)
            inputs.append(puzzle)
            labels.append(solution)
            tiers.append(puzzle_tier)
            difficulty.append(guesses)
            if progress:
                progress(1)
        return Puzzles(
            inputs=(np.array(inputs, dtype=np.uint8).reshape(n, self.seq_len) + 1),
            labels=(np.array(labels, dtype=np.uint8).reshape(n, self.seq_len) + 1),
            tiers=np.array(tiers, dtype=str),
            difficulty=np.array(difficulty, dtype=np.float32),
            generate_args=args,
        )

    def _generate_one(self, seed: int, index: int, tier: str | None, blanks: tuple[int, int] | None,
                      seen: set[bytes], backtracker: Backtracker) -> tuple[list[int], list[int], str, float]:
        for attempt in range(MAX_TRIES_PER_PUZZLE):
            rng = puzzle_rng(seed, index, attempt)
            solution = random_solution(self.size, rng, backtracker)
            target = self.seq_len if blanks is None else int(rng.integers(blanks[0], blanks[1] + 1))
            puzzle = remove_clues(solution, target, rng, backtracker)
            if blanks is not None and puzzle.count(0) < blanks[0]:
                continue
            key = bytes(puzzle)
            if key in seen:
                continue
            puzzle_tier, guesses = grade(puzzle, self.size, backtracker)
            if tier is not None and puzzle_tier != tier:
                continue
            seen.add(key)
            return puzzle, solution, puzzle_tier, guesses
        raise EqRError(f"no {tier + ' ' if tier else ''}{self.size}x{self.size} sudoku with blanks {blanks} after "
                       f"{MAX_TRIES_PER_PUZZLE} tries; widen the blanks range or pick another tier")

    def tier_of(self, inputs: np.ndarray) -> np.ndarray:
        inputs = self._as_batch(inputs, "inputs")
        backtracker = Backtracker(self.size)
        tiers = []
        for row in inputs:
            values = self._values(row)
            tiers.append(UNSOLVABLE if values is None else grade(values, self.size, backtracker)[0])
        return np.array(tiers, dtype=str)

    def solution_counts(self, inputs: np.ndarray, limit: int = 2) -> np.ndarray:
        """int [N]: solutions of each puzzle, counted up to `limit` (0 also for malformed rows)."""
        inputs = self._as_batch(inputs, "inputs")
        backtracker = Backtracker(self.size)
        counts = []
        for row in inputs:
            values = self._values(row)
            counts.append(0 if values is None else len(backtracker.solve(values, limit=limit)[0]))
        return np.array(counts, dtype=np.int64)

    def _values(self, row: np.ndarray) -> list[int] | None:
        if row.min() < BLANK_ID or row.max() > self.size + 1:
            return None
        return (row.astype(np.int64) - 1).tolist()

    # -- rule checks ---------------------------------------------------------------------------

    def _unit_ok(self, grids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row/column/box: holds each digit once. grids int [N, n, n] of digits 1..n."""
        n, geo = self.size, self.geometry
        digits = np.arange(1, n + 1)
        boxes = grids.reshape(-1, n // geo.box_rows, geo.box_rows, n // geo.box_cols, geo.box_cols)
        boxes = boxes.transpose(0, 1, 3, 2, 4).reshape(-1, n, n)  # (N, box, cell in box)
        rows_ok = (np.sort(grids, axis=2) == digits).all(axis=2)  # (N, n)
        cols_ok = (np.sort(grids, axis=1) == digits[:, None]).all(axis=1)  # (N, n)
        boxes_ok = (np.sort(boxes, axis=2) == digits).all(axis=2)  # (N, n)
        return rows_ok, cols_ok, boxes_ok

    def is_valid(self, inputs: np.ndarray, preds: np.ndarray) -> np.ndarray:
        inputs, preds = self._as_batch(inputs, "inputs"), self._as_batch(preds, "preds")
        if len(inputs) != len(preds):
            raise EqRError(f"inputs and preds differ in length: {len(inputs)} vs {len(preds)}")
        n = self.size
        ok = ((inputs >= BLANK_ID) & (inputs <= n + 1)).all(axis=1)
        ok &= ((preds >= 2) & (preds <= n + 1)).all(axis=1)
        ok &= ~((inputs >= 2) & (inputs != preds)).any(axis=1)
        grids = preds.astype(np.int16).reshape(-1, n, n) - 1  # (N, n, n) digits
        rows_ok, cols_ok, boxes_ok = self._unit_ok(grids)
        return ok & rows_ok.all(axis=1) & cols_ok.all(axis=1) & boxes_ok.all(axis=1)

    def problems(self, inputs: np.ndarray, labels: np.ndarray) -> list[tuple[int, str]]:
        inputs, labels = self._as_batch(inputs, "inputs"), self._as_batch(labels, "labels")
        bad = np.flatnonzero(~self.is_valid(inputs, labels))
        return [(int(i), self._explain(inputs[i], labels[i])) for i in bad]

    def _explain(self, puzzle: np.ndarray, solution: np.ndarray) -> str:
        n = self.size
        for what, row, lo in (("input", puzzle, BLANK_ID), ("label", solution, 2)):
            wrong = np.flatnonzero((row < lo) | (row > n + 1))
            if len(wrong):
                cell = int(wrong[0])
                return (f"{what} cell (row {cell // n + 1}, col {cell % n + 1}) holds token {int(row[cell])}, "
                        f"expected {lo}..{n + 1}")
        changed = np.flatnonzero((puzzle >= 2) & (puzzle != solution))
        if len(changed):
            cell = int(changed[0])
            return f"label changes the given at row {cell // n + 1}, col {cell % n + 1}"
        grids = solution.astype(np.int16).reshape(1, n, n) - 1
        for unit, oks in zip(("row", "column", "box"), self._unit_ok(grids)):
            broken = np.flatnonzero(~oks[0])
            if len(broken):
                return f"label repeats a digit in {unit} {int(broken[0]) + 1}"
        return "invalid"

    # -- text ----------------------------------------------------------------------------------

    def parse_line(self, text: str) -> np.ndarray:
        body = "".join(text.split("#", 1)[0].split())
        if len(body) != self.seq_len:
            raise EqRError(f"expected {self.seq_len} cells for a {self.size}x{self.size} sudoku, got {len(body)} "
                           f"(digits 1-{self.size}, '.' or '0' for blanks; whitespace ignored)")
        codes = np.frombuffer(body.encode("utf-8", "replace"), dtype=np.uint8)
        tokens = _char_tokens(self.size)[codes] if len(codes) == self.seq_len else np.zeros(0, np.uint8)
        if len(tokens) != self.seq_len or not tokens.all():
            cell = next(i for i, char in enumerate(body) if char not in ".0123456789"[:self.size + 2])
            raise EqRError(f"cell {cell + 1} is {body[cell]!r}; a {self.size}x{self.size} sudoku takes digits "
                           f"1-{self.size} and '.' or '0' for blanks")
        return tokens

    def format_tokens(self, tokens: np.ndarray) -> str:
        """Digits, '.' for blanks, '?' for a token that is neither (e.g. PAD in a model answer)."""
        tokens = np.asarray(tokens).reshape(-1)
        chars = []
        for token in tokens.tolist():
            if token == BLANK_ID:
                chars.append(".")
            elif 2 <= token <= self.size + 1:
                chars.append(str(token - 1))
            else:
                chars.append("?")
        return "".join(chars)

    def describe(self) -> dict[str, Any]:
        geo = self.geometry
        return super().describe() | {"box": [geo.box_rows, geo.box_cols]}
