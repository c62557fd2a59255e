"""What every puzzle task provides: token layout, generation, grading, rule checks, text I/O.

A task is a small frozen object (`SudokuTask(size=9)`, `MazeTask(size=30)`) that owns the
mapping between its text format and the official token ids, and every rule about its puzzles.
Models, training and the runtime only see uint8 token arrays [N, L]; nothing outside a task
knows what a token means.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from eqr.contract.errors import EqRError

PAD_ID = 0  # padding token of every task (docs/formats.md#token-ids); labels equal to it are ignored by the loss

ProgressFn = Callable[[int], None]  # called with the number of newly finished puzzles


@dataclass(frozen=True)
class Puzzles:
    """A batch of generated puzzles.

    inputs      uint8 [N, L]  token ids of the puzzles
    labels      uint8 [N, L]  token ids of their solutions
    tiers       str [N]       tier name of each puzzle (one of `task.tiers`)
    difficulty  float32 [N]   the number the tier is read from: mean guesses of the grading
                              solver (Sudoku) or the S-G shortest path length (maze)
    """

    inputs: np.ndarray
    labels: np.ndarray
    tiers: np.ndarray
    difficulty: np.ndarray
    generate_args: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.inputs)


class Task(abc.ABC):
    """A puzzle family at one size. Subclasses define the abstract members below."""

    name: str
    size: int
    tiers: tuple[str, ...]

    @property
    @abc.abstractmethod
    def seq_len(self) -> int:
        """L: tokens per puzzle."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """V: token ids are 0..V-1, 0 being PAD."""

    @abc.abstractmethod
    def generate(self, n: int, seed: int, tier: str | None = None, *, progress: ProgressFn | None = None,
                 **options: Any) -> Puzzles:
        """`n` distinct puzzles with their solutions; the same (n, seed, options) gives the same
        puzzles, and a smaller n gives a prefix of a larger one."""

    @abc.abstractmethod
    def tier_of(self, inputs: np.ndarray) -> np.ndarray:
        """Tier name of each puzzle in `inputs` [N, L] (str [N]); a puzzle that cannot be graded
        gets a name outside `tiers` ("unsolvable" Sudoku, "invalid" maze)."""

    @abc.abstractmethod
    def is_valid(self, inputs: np.ndarray, preds: np.ndarray) -> np.ndarray:
        """bool [N]: `preds` [N, L] solves `inputs` [N, L] by the rules. A verifier: report it,
        never use it to pick among candidate answers."""

    @abc.abstractmethod
    def problems(self, inputs: np.ndarray, labels: np.ndarray) -> list[tuple[int, str]]:
        """(row index, what is wrong) for every malformed puzzle/solution pair, for data checks."""

    @abc.abstractmethod
    def parse_line(self, text: str) -> np.ndarray:
        """uint8 [L] tokens of one puzzle in the task's one-line text format; EqRError if malformed."""

    @abc.abstractmethod
    def format_tokens(self, tokens: np.ndarray) -> str:
        """The one-line text of a puzzle or answer [L]; `parse_line` reads it back."""

    def parse_each(self, lines: Iterable[str]) -> list[np.ndarray | str]:
        """Each line's uint8 [L] tokens, or one line saying why it is not a puzzle.

        The one way eqr reads puzzle text: `eqr solve`'s files, the server's `puzzle` input and
        `parse` all come here. Only a line ending is dropped, never other whitespace: a maze's
        open border squares are spaces.
        """
        parsed: list[np.ndarray | str] = []
        for line in lines:
            try:
                parsed.append(self.parse_line(line.rstrip("\r\n")))
            except EqRError as e:
                parsed.append(str(e))
        return parsed

    def parse(self, lines: str | Iterable[str]) -> np.ndarray:
        """int32 [P, L] tokens of puzzles in the one-line text format (one line or several);
        EqRError naming the first malformed line."""
        rows = self.parse_each([lines] if isinstance(lines, str) else lines)
        bad = next((i for i, row in enumerate(rows) if isinstance(row, str)), None)
        if bad is not None:
            raise EqRError(f"line {bad}: {rows[bad]}")
        return np.stack(rows).astype(np.int32) if rows else np.zeros((0, self.seq_len), np.int32)

    def format(self, tokens: np.ndarray) -> list[str]:
        """The one-line text of each puzzle or answer in `tokens` [P, L] (a single [L] gives one)."""
        return [self.format_tokens(row) for row in self._as_batch(tokens, "tokens")]

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the task, stored in dataset.json under "eqr_task"."""
        return {"name": self.name, "size": self.size, "seq_len": self.seq_len, "vocab_size": self.vocab_size,
                "tiers": list(self.tiers)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"

    def _check_tier(self, tier: str | None) -> None:
        if tier is not None and tier not in self.tiers:
            raise EqRError(f"unknown {self.name} tier {tier!r}; choose one of: {', '.join(self.tiers)}")

    def _as_batch(self, tokens: np.ndarray, what: str) -> np.ndarray:
        """Tokens as uint8 [N, L]; a single [L] puzzle becomes [1, L]."""
        array = np.asarray(tokens)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != self.seq_len:
            raise EqRError(f"{what} must have shape [N, {self.seq_len}] for {self!r}, got {list(array.shape)}")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise EqRError(f"{what} holds values outside 0..255; expected token ids 0..{self.vocab_size - 1}")
        return array.astype(np.uint8)


def parse_range(value: tuple[int, int] | None, what: str, lowest: int, highest: int) -> tuple[int, int] | None:
    """Check an inclusive (lo, hi) option against the possible [lowest, highest]."""
    if value is None:
        return None
    lo, hi = (int(v) for v in value)
    if not lowest <= lo <= hi <= highest:
        raise EqRError(f"{what} must satisfy {lowest} <= lo <= hi <= {highest}, got ({lo}, {hi})")
    return lo, hi


def puzzle_rng(seed: int, index: int, attempt: int) -> np.random.Generator:
    """The random stream of puzzle `index`, try `attempt`: independent of n, so runs are prefixes."""
    return np.random.default_rng([int(seed), int(index), int(attempt)])
