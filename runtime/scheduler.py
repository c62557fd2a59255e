"""`Scheduler`: continuous batching for servers.

A worker thread keeps one working batch of at most `batch_size` trajectories and drives
`eqr.runtime.loop.run_loop` with it; whenever trajectories settle, their slots are refilled
from a bounded request queue. `submit(tokens) -> Future[SolveResult]` is thread-safe; a request
holds P >= 1 puzzles ([L] or [P, L]) and enters the batch a whole puzzle (K trajectories) at a
time, so a request larger than the batch still runs. A full queue blocks the caller
(back-pressure) up to `timeout`.

Puzzle p of a request runs its K trajectories from the seeds (seed, p, k), with the request's
own seed, so a request's answer equals `Solver.solve(tokens, seed=seed)` whatever else is in
the batch. `submit(..., on_progress=fn)` streams anytime answers: every `stream_every` steps
fn(Partial) gets each puzzle's current best trajectory (lowest residual so far).

Faults: a `backend.step` that raises is retried once; if it fails again, only the requests with
trajectories in the working batch at that step fail (with the backend's exception), the fault
is logged and the queue is served on. `max_faults` failed steps in a row mark the scheduler not
`ready`: it stops intake and fails what is queued, so a server reports unhealthy instead of
hanging.

shutdown(cancel=False) stops intake and finishes every queued and in-flight request;
shutdown(cancel=True) cancels the queued and in-flight ones. Either way every submitted future
ends done (result, cancelled, or the backend's exception): no request is silently lost.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eqr.contract.errors import EqRError, NotReady, RequestError
from eqr.runtime.aggregate import get_aggregator
from eqr.runtime.config import SolveConfig
from eqr.runtime.loop import Finished, Rows, RunningRows, run_loop
from eqr.runtime.solver import Solver, aggregate_rows, initial_states
from eqr.runtime.stats import REASON_CODE, SolveStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partial:
    """A streaming request's anytime answer. P puzzles, L tokens.

    preds     int32 (P, L)  each puzzle's current best trajectory (lowest residual so far)
    steps     int32 (P,)    steps that trajectory has taken (0: the puzzle has not started)
    residual  fp32  (P,)    its current relative residual (inf before the first step)
    """

    preds: np.ndarray
    steps: np.ndarray
    residual: np.ndarray


@dataclass
class _Request:
    tokens: np.ndarray  # int32 (P, L)
    seed: int
    future: Future
    breadth: int
    on_progress: Callable[[Partial], None] | None = None
    max_steps: int | None = None  # this request's step cap (<= the scheduler's cfg.max_steps)
    numbers: np.ndarray | None = None  # int64 (P,) puzzle numbers in the seeds (seed, p, k); None: 0..P-1
    admitted: int = 0  # puzzles handed to the loop so far
    remaining: int = 0  # trajectories admitted and not yet finished
    done: dict[int, tuple] = field(default_factory=dict)  # row p*K + k -> finished row fields
    steps_run: int = 0  # loop steps with this request in the batch (streaming only)
    now: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # streaming: preds (P*K, L), nstep, residual

    @property
    def puzzles(self) -> int:
        return len(self.tokens)


# The serving defaults (`eqr triton` and `eqr serve` flags, config.pbtxt parameters) are these.
DEFAULT_BATCH = 64  # trajectories in the working batch
DEFAULT_BREADTH = 1  # trajectories per puzzle unless a request asks for more
DEFAULT_MAX_QUEUE = 1024  # requests waiting beyond the working batch before "busy"
DEFAULT_STREAM_EVERY = 4  # outer steps between provisional answers of a streaming request


class Scheduler:
    """A fixed-size working batch fed from a bounded queue; one worker thread owns the backend."""

    def __init__(self, solver: Solver, cfg: SolveConfig | None = None, batch_size: int = DEFAULT_BATCH,
                 breadth: int = DEFAULT_BREADTH, aggregate: str = "converged", seed: int = 0,
                 max_queue: int = DEFAULT_MAX_QUEUE, stream_every: int = DEFAULT_STREAM_EVERY,
                 max_faults: int = 3) -> None:
        if stream_every < 1 or max_faults < 1:
            raise EqRError(f"stream_every ({stream_every}) and max_faults ({max_faults}) must be >= 1")
        if batch_size < breadth:
            raise EqRError(f"batch_size ({batch_size}) must hold at least one puzzle's {breadth} trajectories")
        if cfg is not None and cfg.stats == "trace":
            raise EqRError("the scheduler keeps no per-step traces; use stats='final' or 'none'")
        self.solver = solver
        self.cfg = cfg if cfg is not None else solver.config()  # the precision's calibrated stopping rule
        self.batch_size, self.breadth, self.seed = batch_size, breadth, seed
        self.choose = get_aggregator(aggregate)
        self._queue: deque[_Request] = deque()
        self._max_queue = max_queue
        self._cond = threading.Condition()
        self._closed = False
        self._abort = False
        self.stream_every, self.max_faults = stream_every, max_faults
        self._rows: dict[int, tuple[_Request, int]] = {}  # row id -> (request, row p*K + k); worker only
        self._row_ids = itertools.count()
        self._group_ids = itertools.count()
        self._streaming = 0  # streaming requests in the batch; worker only
        self._failed_steps = 0  # consecutive steps that failed even after their retry; worker only
        self._broken: BaseException | None = None  # set once max_faults is reached
        self._last_fault: BaseException | None = None
        # Totals for a server's metrics (worker writes, anyone reads): puzzles answered / failed,
        # trajectory steps run, converged puzzles, diverged trajectories, backend faults.
        self.counts = dict.fromkeys(("answered", "failed", "steps", "converged", "diverged", "faults"), 0)
        self._enter_worker = solver.backend.thread_setup()  # per-thread engine settings, copied to the worker
        self._thread = threading.Thread(target=self._serve, name="eqr-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side
    def submit(self, tokens: np.ndarray, seed: int | None = None, timeout: float | None = None,
               breadth: int | None = None, max_steps: int | None = None,
               on_progress: Callable[[Partial], None] | None = None, numbers: np.ndarray | None = None) -> Future:
        """Queue puzzles (int [L] or [P, L]) -> Future[SolveResult] with P answers.

        Blocks while the queue is full, raising queue.Full after `timeout`. breadth overrides the
        scheduler's K and max_steps lowers its step cap, for this request only. numbers (P,) replace
        the puzzle numbers 0..P-1 in the trajectory seeds (a server keeps each puzzle's position in
        its request, so a bad neighbour does not change an answer). on_progress(Partial)
        is called from the worker thread every `stream_every` steps until the result is set (it
        must not block for long).
        """
        tokens = self.solver.check_tokens(np.asarray(tokens))
        K = self.breadth if breadth is None else int(breadth)
        if len(tokens) == 0:
            raise EqRError("submit needs at least one puzzle, got none")
        if not 1 <= K <= self.batch_size:
            raise EqRError(f"breadth must be 1..{self.batch_size} (the working batch), got {K}")
        if max_steps is not None and not 1 <= max_steps <= self.cfg.max_steps:
            raise EqRError(f"max_steps must be 1..{self.cfg.max_steps} (this scheduler's cap), got {max_steps}")
        if self.cfg.fixed_depth is not None and max_steps is not None:
            raise EqRError("max_steps cannot be set per request when the scheduler runs a fixed depth")
        if numbers is not None and np.shape(numbers) != (len(tokens),):
            raise EqRError(f"numbers must give one puzzle number per puzzle ({len(tokens)}), got shape {np.shape(numbers)}")
        request = _Request(tokens, self.seed if seed is None else seed, Future(), K, on_progress,
                           None if max_steps is None else int(max_steps),
                           None if numbers is None else np.asarray(numbers, np.int64))
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or len(self._queue) < self._max_queue, timeout):
                raise queue.Full(f"scheduler queue is full ({self._max_queue} requests)")
            if self._broken is not None:
                raise NotReady(f"the model is not ready: {self._broken_reason()}")
            if self._closed:
                raise RuntimeError("scheduler is shut down; create a new one")
            self._queue.append(request)
            self._cond.notify_all()
        return request.future

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Stop intake; finish (cancel=False) or cancel (cancel=True) queued and in-flight work."""
        with self._cond:
            self._closed = True
            self._abort = self._abort or cancel
            self._cond.notify_all()
        if wait:
            self._thread.join()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True, cancel=exc[0] is not None)

    @property
    def pending(self) -> int:
        """Requests waiting in the queue (not yet in the working batch)."""
        with self._cond:
            return len(self._queue)

    @property
    def ready(self) -> bool:
        """False once the backend failed `max_faults` steps in a row, or the worker has stopped."""
        return self._broken is None and self._thread.is_alive()

    def _broken_reason(self) -> str:
        return f"the backend failed {self.max_faults} steps in a row (last: {self._broken})"

    # ------------------------------------------------------------------ worker side
    def _serve(self) -> None:
        self._enter_worker()
        backend = self.solver.backend
        activated_here = not backend.is_active
        try:
            if activated_here:
                backend.activate()
            run_loop(backend, self.cfg, self, self._on_finish, capacity=self.batch_size, on_step=self._on_step,
                     on_fault=self._on_fault)
        except BaseException as error:  # the backend failed: fail every request instead of hanging
            log.exception("scheduler worker failed")
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            for request, _ in list(self._rows.values()):
                _settle(request.future, exception=error)
            self._rows.clear()
            self._drain(exception=error)
        else:
            self._drain(exception=None)  # only requests cancelled by shutdown(cancel=True) remain
        finally:
            if activated_here:
                backend.deactivate()

    def _drain(self, exception: BaseException | None) -> None:
        with self._cond:
            leftover, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for request in leftover:
            _settle(request.future, exception=exception)

    def take(self, room: int | None, block: bool) -> Rows | None:
        """RowSource for run_loop: whole puzzles (K rows each) of the queued requests that fit in `room`."""
        with self._cond:
            if block:
                self._cond.wait_for(lambda: self._queue or self._closed)
            if self._abort or (self._closed and not self._queue):
                return None if block else _no_rows()
            taken: list[tuple[_Request, int, int]] = []  # (request, first puzzle, puzzle count)
            free = room
            while self._queue:
                request = self._queue[0]
                if request.future.cancelled():  # cancelled by its caller: admit no more of it
                    self._queue.popleft()
                    continue
                n = request.puzzles - request.admitted
                if free is not None:
                    n = min(n, free // request.breadth)
                if n == 0:
                    if block and not taken:  # the batch is empty and one puzzle still does not fit: never will
                        self._queue.popleft()
                        _settle(request.future, exception=RequestError(
                            f"breadth {request.breadth} does not fit the backend's working batch of {room} "
                            "trajectories; lower the breadth or raise the batch"))
                        continue
                    break
                taken.append((request, request.admitted, n))
                request.admitted += n
                free = None if free is None else free - n * request.breadth
                self._queue.popleft()
                if request.admitted < request.puzzles:  # the rest waits its turn behind the others:
                    self._queue.append(request)  # a big request cannot starve small ones
                    break
            self._cond.notify_all()  # queue space freed: wake blocked submitters
        return self._rows_for(taken) if taken else _no_rows()

    def aborted(self) -> bool:
        return self._abort

    def _rows_for(self, taken: list[tuple[_Request, int, int]]) -> Rows:
        ids, groups, tokens, z_H, z_L, caps = [], [], [], [], [], []
        for request, first, n in taken:
            K = request.breadth
            puzzles = np.repeat(np.arange(first, first + n), K)  # row p*K + k, the K rows of a puzzle adjacent
            breadths = np.tile(np.arange(K), n)
            for p, k in zip(puzzles.tolist(), breadths.tolist()):
                row_id = next(self._row_ids)
                self._rows[row_id] = (request, p * K + k)
                ids.append(row_id)
            request.remaining += n * K
            if request.on_progress is not None and request.now is None:
                P = request.puzzles
                request.now = (np.zeros((P * K, self.solver.seq_len), np.int32), np.zeros(P * K, np.int32),
                               np.full(P * K, np.inf, np.float32))
                self._streaming += 1
            caps.append(np.full(n * K, request.max_steps or self.cfg.max_steps, np.int32))
            groups.append(np.repeat(np.array([next(self._group_ids) for _ in range(n)], np.int64), K))
            tokens.append(request.tokens[puzzles])  # (n*K, L)
            zh, zl = initial_states(self.solver.seq_len, self.solver.hidden_size, self.solver.init_std,
                                    request.seed, puzzles if request.numbers is None else request.numbers[puzzles],
                                    breadths)
            z_H.append(zh)
            z_L.append(zl)
        return Rows(np.array(ids, np.int64), np.concatenate(groups), np.concatenate(tokens),
                    np.concatenate(z_H), np.concatenate(z_L), np.concatenate(caps))

    def _on_finish(self, done: Finished) -> None:
        self.counts["steps"] += int(done.nstep.sum())
        self.counts["diverged"] += int((done.reason == _DIVERGED).sum())
        for r, row_id in enumerate(done.ids.tolist()):
            request, row = self._rows.pop(row_id)
            request.done[row] = (done.preds[r], done.nstep[r], done.reason[r], done.residual[r], done.logit_delta[r],
                                 done.score[r], done.q_halt[r])
            if request.now is not None:
                final = done.residual[r] if np.isfinite(done.residual[r]) else np.inf
                request.now[0][row], request.now[1][row], request.now[2][row] = done.preds[r], done.nstep[r], final
            request.remaining -= 1
            if request.remaining == 0 and request.admitted == request.puzzles:
                self._resolve(request)
            elif request.remaining == 0 and request.future.done() and request.now is not None:
                request.now = None  # cancelled (or failed) before all its puzzles ran: stop streaming it
                self._streaming -= 1

    def _resolve(self, request: _Request) -> None:
        if request.now is not None:
            self._streaming -= 1
        P, K = request.puzzles, request.breadth
        fields_by_row = [request.done[r] for r in range(P * K)]
        preds, nstep, reason, residual, logit_delta, score, q_halt = (np.stack(col) for col in zip(*fields_by_row))
        if (reason == _CANCELLED).any():  # shutdown(cancel=True) cut it short
            _settle(request.future, exception=CancelledError())
            return
        if (reason == _FAILED).any():  # the backend failed on it: its answers are not to be trusted
            self.counts["failed"] += P
            _settle(request.future, exception=self._last_fault or RuntimeError("backend step failed"))
            return
        stats = SolveStats(nstep.astype(np.int32), reason.astype(np.int8), residual, logit_delta, score, q_halt,
                           None, None, np.zeros(0, np.int32), np.zeros(0))
        result = aggregate_rows(preds.reshape(P, K, -1), stats, self.choose, P, K)  # (P*K, L) -> (P, K, L)
        self.counts["answered"] += P
        self.counts["converged"] += int(result.converged.sum())
        _settle(request.future, result=result)

    def _on_step(self, progress: RunningRows) -> None:
        """After every good step: reset the fault streak; stream to requests that asked for it."""
        self._failed_steps = 0
        if not self._streaming:
            return
        due: dict[int, _Request] = {}
        for r, row_id in enumerate(progress.ids.tolist()):
            request, row = self._rows[row_id]
            if request.now is None:
                continue
            preds, nstep, residual = request.now
            preds[row], nstep[row] = progress.preds[r], progress.nstep[r]
            residual[row] = progress.residual[r] if np.isfinite(progress.residual[r]) else np.inf
            due[id(request)] = request
        for request in due.values():
            request.steps_run += 1
            if request.steps_run % self.stream_every == 0 and not request.future.done():
                _report(request)

    def _on_fault(self, error: Exception, attempt: int) -> bool:
        """run_loop's fault handler: retry a failed step once; count steps that failed twice."""
        self.counts["faults"] += 1
        self._last_fault = error
        if attempt < 2:
            log.warning("backend step failed (%s: %s); retrying it once", type(error).__name__, error)
            return True
        self._failed_steps += 1
        log.error("backend step failed twice (%s: %s); failing the requests in the working batch (%d in a row)",
                  type(error).__name__, error, self._failed_steps)
        if self._failed_steps >= self.max_faults:
            self._broken = error
            log.error("scheduler not ready: %s", self._broken_reason())
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._drain(exception=NotReady(f"the model is not ready: {self._broken_reason()}"))
        return False


def _report(request: _Request) -> None:
    """Send a streaming request its anytime answer: per puzzle, the trajectory with the lowest residual."""
    preds, nstep, residual = request.now
    P, K = request.puzzles, request.breadth
    best = np.arange(P) * K + np.argmin(residual.reshape(P, K), axis=1)  # (P*K,) -> (P, K) -> row per puzzle
    try:
        request.on_progress(Partial(preds[best].copy(), nstep[best].copy(), residual[best].copy()))
    except Exception:  # a listener's bug must not stop the loop that serves everyone else
        log.exception("on_progress listener failed; the request keeps running")


_CANCELLED, _FAILED, _DIVERGED = REASON_CODE["cancelled"], REASON_CODE["failed"], REASON_CODE["diverged"]


def _no_rows() -> Rows:
    empty = np.zeros(0, np.int64)
    return Rows(empty, empty, np.zeros((0, 0), np.int32), np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0), np.float32))


def _settle(future: Future, result: Any = None, exception: BaseException | None = None) -> None:
    """Finish a future unless its caller already cancelled it."""
    if isinstance(exception, CancelledError) or (exception is None and result is None):
        future.cancel()
        return
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:  # the caller cancelled it meanwhile; nobody waits for the result
        pass
