"""The serving interface (docs/serving.md): Triton tensors in, one `Job` out; results back to tensors.

Nothing here imports Triton, so the rules a request must obey are tested without a server.
Inputs are numpy arrays keyed by name, as the Python backend hands them over:

    puzzle     TYPE_STRING [-1]     one puzzle per element, in the task's text format   } exactly
    tokens     TYPE_INT32  [-1, L]  official token ids                                  } one
    breadth    TYPE_INT32  [1]      trajectories per puzzle (default: the model's)
    max_steps  TYPE_INT32  [1]      outer-step cap, at most the model's
    seed       TYPE_INT64  [1]      seed of the initial states (puzzle p, breadth k) -> (seed, offset + p, k)
    offset     TYPE_INT64  [1]      number of the request's first puzzle in its seed stream (default 0)
    stream     TYPE_BOOL   [1]      true: provisional responses before the final one
    noise      TYPE_FP32   [1]      path-noise sigma (default: the model's `noise` parameter; 0: none)

A malformed request raises `Rejected` (Triton answers it with an error response); a bad puzzle
inside a good request only gets its own `error` element. Both carry a reason, the label of
the rejection counters in /metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from eqr.contract.errors import EqRError

# (name, numpy dtype, Triton type, dims with L for the sequence length); the one table that
# config.pbtxt, model.py and the clients read.
INPUTS: tuple[tuple[str, Any, str, tuple[str, ...]], ...] = (
    ("puzzle", np.object_, "TYPE_STRING", ("-1",)),
    ("tokens", np.int32, "TYPE_INT32", ("-1", "L")),
    ("breadth", np.int32, "TYPE_INT32", ("1",)),
    ("max_steps", np.int32, "TYPE_INT32", ("1",)),
    ("seed", np.int64, "TYPE_INT64", ("1",)),
    ("offset", np.int64, "TYPE_INT64", ("1",)),
    ("stream", np.bool_, "TYPE_BOOL", ("1",)),
    ("noise", np.float32, "TYPE_FP32", ("1",)),
)
OUTPUTS: tuple[tuple[str, Any, str, tuple[str, ...]], ...] = (
    ("answer", np.object_, "TYPE_STRING", ("-1",)),
    ("preds", np.int32, "TYPE_INT32", ("-1", "L")),
    ("steps", np.int32, "TYPE_INT32", ("-1",)),
    ("total_steps", np.int32, "TYPE_INT32", ("-1",)),
    ("depth", np.int32, "TYPE_INT32", ("-1",)),
    ("converged", np.bool_, "TYPE_BOOL", ("-1",)),
    ("diverged", np.bool_, "TYPE_BOOL", ("-1",)),
    ("residual", np.float32, "TYPE_FP32", ("-1",)),
    ("agreement", np.float32, "TYPE_FP32", ("-1",)),
    ("valid", np.bool_, "TYPE_BOOL", ("-1",)),
    ("error", np.object_, "TYPE_STRING", ("-1",)),
    ("backend", np.object_, "TYPE_STRING", ("1",)),
)
MAX_PUZZLES = 4096  # per request: a bigger one is a client bug or an attack on the queue
# The reason labels of /metrics' eqr_puzzles_rejected and eqr_requests_rejected counters.
PUZZLE_REJECTIONS = ("text", "tokens")  # malformed puzzle text; a token id outside the vocabulary
REQUEST_REJECTIONS = ("inputs", "shape", "dtype", "value", "size",  # malformed: what the client must fix
                      "busy", "unavailable")  # the queue is full; the model is not ready or is shutting down


class Rejected(EqRError):
    """A request the model refuses as a whole; `reason` is one of REQUEST_REJECTIONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Job:
    """One request, checked. P puzzles in request order, G of them good, L tokens."""

    tokens: np.ndarray  # int32 (G, L) the good puzzles
    good: np.ndarray  # int64 (G,) their positions among the P
    errors: list[str]  # (P,) "" for a good puzzle, one line otherwise
    rejected: list[str]  # the PUZZLE_REJECTIONS reason of each bad puzzle
    breadth: int | None
    max_steps: int | None
    seed: int
    offset: int
    stream: bool
    backend: str = ""  # JSON of what runs the steps (eqr.runtime.backends.base.backend_info)
    noise: float | None = None  # path-noise sigma; None: the model's default

    @property
    def puzzles(self) -> int:
        return len(self.errors)


def parse_request(inputs: dict[str, np.ndarray | None], task: Any, vocab_size: int, default_seed: int = 0,
                  backend: str = "") -> Job:
    """Triton input arrays (None: absent) -> Job; `Rejected` for a malformed request."""
    unknown = sorted(set(inputs) - {name for name, *_ in INPUTS})
    if unknown:
        raise Rejected("inputs", f"unknown input(s) {', '.join(unknown)}; inputs are {', '.join(n for n, *_ in INPUTS)}")
    puzzle, tokens = inputs.get("puzzle"), inputs.get("tokens")
    if (puzzle is None) == (tokens is None):
        raise Rejected("inputs", "send exactly one of the inputs 'puzzle' (text, one puzzle per element) or "
                                 "'tokens' (int32 [P, L]; over HTTP generate a flat list of P*L ids)")
    if puzzle is not None:
        rows, errors = _parse_text(_vector(puzzle, "puzzle"), task)
        reason = "text"
    else:
        rows, errors = _check_tokens(np.asarray(tokens), task.seq_len, vocab_size)
        reason = "tokens"
    if not 1 <= len(errors) <= MAX_PUZZLES:
        raise Rejected("size", f"a request holds 1..{MAX_PUZZLES} puzzles, got {len(errors)}")
    good = np.array([p for p, e in enumerate(errors) if not e], np.int64)
    stacked = np.stack([rows[p] for p in good]).astype(np.int32) if len(good) else np.zeros((0, task.seq_len), np.int32)
    breadth = _scalar(inputs.get("breadth"), "breadth", np.integer)
    if breadth is not None and breadth < 1:
        raise Rejected("value", f"breadth must be >= 1, got {breadth}")
    max_steps = _scalar(inputs.get("max_steps"), "max_steps", np.integer)
    if max_steps is not None and max_steps < 1:
        raise Rejected("value", f"max_steps must be >= 1, got {max_steps}")
    seed = _scalar(inputs.get("seed"), "seed", np.integer)
    offset = _scalar(inputs.get("offset"), "offset", np.integer)
    if offset is not None and offset < 0:
        raise Rejected("value", f"offset must be >= 0, got {offset}")
    stream = _scalar(inputs.get("stream"), "stream", np.bool_)
    noise = _scalar(inputs.get("noise"), "noise", np.floating)
    if noise is not None and not (np.isfinite(noise) and noise >= 0):
        raise Rejected("value", f"noise must be >= 0 (sigma of the path noise; 0: none), got {noise}")
    return Job(stacked, good, errors, [reason for e in errors if e], None if breadth is None else int(breadth),
               None if max_steps is None else int(max_steps), default_seed if seed is None else int(seed),
               0 if offset is None else int(offset), bool(stream), backend, None if noise is None else float(noise))


def _vector(array: np.ndarray, name: str) -> list[str]:
    array = np.asarray(array)
    if array.ndim != 1:
        raise Rejected("shape", f"input '{name}' must be a 1-D list of strings, got shape {list(array.shape)}")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.tolist()]


def _parse_text(lines: list[str], task: Any) -> tuple[list[np.ndarray | None], list[str]]:
    parsed = task.parse_each(lines)  # the one text path, as `eqr solve` reads files
    rows = [None if isinstance(row, str) else row for row in parsed]
    return rows, [f"puzzle {p}: {row}" if isinstance(row, str) else "" for p, row in enumerate(parsed)]


def _check_tokens(tokens: np.ndarray, seq_len: int, vocab_size: int) -> tuple[list[np.ndarray | None], list[str]]:
    if tokens.ndim != 2 or tokens.shape[1] != seq_len:
        raise Rejected("shape", f"input 'tokens' must be int32 [P, {seq_len}] (over HTTP generate: a flat list of "
                                f"P*{seq_len} ids), got shape {list(tokens.shape)}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise Rejected("dtype", f"input 'tokens' must be int32, got {tokens.dtype}")
    errors = []
    for p, row in enumerate(tokens):
        bad = (row < 0) | (row >= vocab_size)
        errors.append(f"puzzle {p}: token ids must be in 0..{vocab_size - 1}, got {int(row[bad][0])} at position "
                      f"{int(np.flatnonzero(bad)[0])}" if bad.any() else "")
    return list(tokens), errors


def _scalar(array: np.ndarray | None, name: str, kind: type) -> Any:
    if array is None:
        return None
    array = np.asarray(array)
    if array.size != 1:
        raise Rejected("shape", f"input '{name}' must hold exactly one value, got shape {list(array.shape)}")
    if not np.issubdtype(array.dtype, kind):
        raise Rejected("dtype", f"input '{name}' has dtype {array.dtype}; see docs/serving.md for the input types")
    return array.reshape(-1)[0]


def result_tensors(job: Job, result: Any, task: Any, failed: str | None = None) -> dict[str, np.ndarray]:
    """A `SolveResult` over the job's good puzzles (or None) -> the seven output arrays, P elements each.

    failed: one line that becomes the `error` of every good puzzle (the backend failed on them).
    """
    out = _empty(job, task.seq_len)
    if failed is not None:
        out["error"][job.good] = failed
    elif result is not None and len(job.good):
        g = job.good
        out["preds"][g] = result.preds
        out["answer"][g] = [task.format_tokens(row) for row in result.preds]
        K = len(result.stats.nstep) // len(g)
        out["steps"][g] = result.stats.nstep.reshape(len(g), K)[np.arange(len(g)), result.chosen]  # (G*K,) -> (G, K)
        out["total_steps"][g] = result.steps
        out["depth"][g] = result.depth
        out["converged"][g] = result.converged
        out["diverged"][g] = result.diverged
        out["residual"][g] = result.residual
        out["agreement"][g] = result.agreement
        out["valid"][g] = task.is_valid(job.tokens, result.preds)
    return out


def partial_tensors(job: Job, partial: Any, task: Any) -> dict[str, np.ndarray]:
    """A provisional response: each good puzzle's current best answer, `converged` false."""
    out = _empty(job, task.seq_len)
    g = job.good
    started = partial.steps > 0
    out["preds"][g] = partial.preds
    out["answer"][g] = [task.format_tokens(row) if s else "" for row, s in zip(partial.preds, started)]
    out["steps"][g] = partial.steps
    out["residual"][g] = np.where(np.isfinite(partial.residual), partial.residual, np.nan)
    out["valid"][g] = task.is_valid(job.tokens, partial.preds) & started
    return out


def _empty(job: Job, L: int) -> dict[str, np.ndarray]:
    """Outputs with nothing answered yet: only the bad puzzles' errors filled in."""
    P = job.puzzles
    return {"answer": np.array([""] * P, dtype=np.object_), "preds": np.zeros((P, L), np.int32),
            "steps": np.zeros(P, np.int32), "total_steps": np.zeros(P, np.int32), "depth": np.zeros(P, np.int32),
            "converged": np.zeros(P, bool), "diverged": np.zeros(P, bool),
            "residual": np.full(P, np.nan, np.float32), "agreement": np.zeros(P, np.float32),
            "valid": np.zeros(P, bool), "error": np.array(job.errors, dtype=np.object_),
            "backend": np.array([job.backend], dtype=np.object_)}
