"""`Scheduler`: continuous batching for servers.

A worker thread keeps one working batch of at most `batch_size` trajectories and drives
`eqr.runtime.loop.run_loop` with it; whenever trajectories settle, their slots are refilled
from a bounded request queue. `submit(tokens) -> Future[SolveResult]` is thread-safe; a request
holds P >= 1 puzzles ([L] or [P, L]) and enters the batch a whole puzzle (K trajectories) at a
time, so a request larger than the batch still runs. With cfg.agree a puzzle enters a wave at a
time instead (progressive breadth, `eqr.runtime.loop.Waves`), and a puzzle's next wave goes
before new puzzles. A full queue blocks the caller (back-pressure) up to `timeout`.

Puzzle p of a request runs its K trajectories from the seeds (seed, p, k), with the request's
own seed, so a request's answer equals `Solver.solve(tokens, seed=seed)` whatever else is in
the batch; with path noise (cfg.noise, or a request's own `noise`) its noise stream is keyed the
same way, so that holds for noisy requests too. `submit(..., on_progress=fn)` streams anytime answers: every `stream_every` steps
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
from eqr.runtime.loop import Finished, Rows, RunningRows, Waves, run_loop
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
    noise: float = 0.0  # path-noise sigma of this request's trajectories
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
        if self.cfg.noise > 0:
            solver.check_noise()
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
        self._waves = Waves(self.cfg.agreeing)  # each puzzle's trajectories, launched in waves; worker only
        self._group_request: dict[int, _Request] = {}  # group (puzzle) with trajectories to come -> its request
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
               on_progress: Callable[[Partial], None] | None = None, numbers: np.ndarray | None = None,
               noise: float | None = None) -> Future:
        """Queue puzzles (int [L] or [P, L]) -> Future[SolveResult] with P answers.

        Blocks while the queue is full, raising queue.Full after `timeout`. breadth overrides the
        scheduler's K and max_steps lowers its step cap, for this request only. numbers (P,) replace
        the puzzle numbers 0..P-1 in the trajectory seeds (a server keeps each puzzle's position in
        its request, so a bad neighbour does not change an answer). noise: this request's path-noise
        sigma (None: the scheduler's cfg.noise), drawn per (seed, puzzle number, k, step) as in
        `Solver.solve`, so its answer does not depend on its neighbours either. on_progress(Partial)
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
        sigma = self.cfg.noise if noise is None else float(noise)
        if not 0 <= sigma < float("inf"):
            raise EqRError(f"noise must be >= 0 (sigma of the path noise; 0: none), got {noise}")
        if sigma > 0:
            self.solver.check_noise()
        request = _Request(tokens, self.seed if seed is None else seed, Future(), K, on_progress,
                           None if max_steps is None else int(max_steps),
                           None if numbers is None else np.asarray(numbers, np.int64), sigma)
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
        else:  # only requests cancelled by shutdown(cancel=True) remain: queued, or with waves to come
            self._drain(exception=None)
            for request, _ in list(self._rows.values()):
                _settle(request.future)
            self._rows.clear()
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
        """RowSource for run_loop: the next waves of running puzzles, then the first waves of the
        queued requests' puzzles, whole waves that fit in `room` (a first wave is all K without agree)."""
        with self._cond:
            if block:
                self._cond.wait_for(lambda: self._queue or self._closed or self._waves.waiting)
            if self._abort or (self._closed and not self._queue and not self._waves.waiting):
                return None if block else _no_rows()
            self._admit(None if room is None else room - self._waves.waiting, room, block)
            self._cond.notify_all()  # queue space freed: wake blocked submitters
        ids, groups = self._waves.take(room, split=block)
        return self._rows_for(ids, groups) if len(ids) else _no_rows()

    def _admit(self, free: int | None, room: int | None, block: bool) -> None:
        """Open the queued requests' puzzles whose first waves fit in `free` trajectories (None: all)."""
        opened = False
        while self._queue:
            request = self._queue[0]
            if request.future.cancelled():  # cancelled by its caller: admit no more of it
                self._queue.popleft()
                continue
            first = self._waves.first(request.breadth)
            n = request.puzzles - request.admitted
            if free is not None:
                n = min(n, max(free, 0) // first)
            if n == 0:
                if block and not opened and not self._waves.waiting:  # an empty batch and it still does not fit: never will
                    self._queue.popleft()
                    _settle(request.future, exception=RequestError(
                        f"breadth {request.breadth} does not fit the backend's working batch of {room} "
                        "trajectories; lower the breadth or raise the batch"))
                    continue
                break
            self._open(request, n)
            opened = True
            free = None if free is None else free - n * first
            self._queue.popleft()
            if request.admitted < request.puzzles:  # the rest waits its turn behind the others:
                self._queue.append(request)  # a big request cannot starve small ones
                break

    def settled(self, group: int, best: int | None) -> np.ndarray | None:
        """RowSource for run_loop: a puzzle's wave is over; its next wave waits in `_waves` unless it
        agreed, ran all K, failed, or its request is done (cancelled by its caller)."""
        request = self._group_request[group]
        skipped = self._waves.settled(group, None if request.future.done() else best)
        if skipped is not None:
            del self._group_request[group]
        return skipped

    def aborted(self) -> bool:
        return self._abort

    def _open(self, request: _Request, n: int) -> None:
        """Admit the request's next n puzzles: K row ids each (row p*K + k), a group, its first wave queued."""
        K = request.breadth
        for p in range(request.admitted, request.admitted + n):
            ids = np.fromiter(itertools.islice(self._row_ids, K), np.int64, K)
            for k, row_id in enumerate(ids.tolist()):
                self._rows[row_id] = (request, p * K + k)
            group = next(self._group_ids)
            self._group_request[group] = request
            self._waves.open(group, ids)
        request.admitted += n
        request.remaining += n * K  # launched or not, each trajectory is reported once to _on_finish
        if request.on_progress is not None and request.now is None:
            P = request.puzzles
            request.now = (np.zeros((P * K, self.solver.seq_len), np.int32), np.zeros(P * K, np.int32),
                           np.full(P * K, np.inf, np.float32))
            self._streaming += 1

    def _rows_for(self, ids: np.ndarray, groups: np.ndarray) -> Rows:
        """Loop rows for the trajectories `ids` (R,) of `groups`: tokens, initial states seeded by
        (seed, p, k), step caps, path noise; one block per request."""
        placed = [self._rows[row_id] for row_id in ids.tolist()]
        requests = list({id(request): request for request, _ in placed}.values())
        number = {id(request): j for j, request in enumerate(requests)}
        owner = np.array([number[id(request)] for request, _ in placed])  # (R,) each row's request
        rows = np.array([row for _, row in placed], np.int64)  # (R,) p*K + k
        blocks = []
        for j, request in enumerate(requests):
            at = np.flatnonzero(owner == j)
            puzzles, breadths = np.divmod(rows[at], request.breadth)
            numbers = puzzles if request.numbers is None else request.numbers[puzzles]
            zh, zl = initial_states(self.solver.seq_len, self.solver.hidden_size, self.solver.init_std,
                                    request.seed, numbers, breadths)
            noise_keys = np.stack([np.full(len(at), request.seed, np.int64), numbers, breadths], axis=1)  # (R_j, 3)
            blocks.append((ids[at], groups[at], request.tokens[puzzles], zh, zl,
                           np.full(len(at), request.max_steps or self.cfg.max_steps, np.int32),
                           np.full(len(at), request.noise, np.float32), noise_keys))
        return Rows(*(np.concatenate(column) for column in zip(*blocks)))  # Rows' fields in order

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
        result = aggregate_rows(preds.reshape(P, K, -1), stats, self.choose, P, K,  # (P*K, L) -> (P, K, L)
                                agree=self.cfg.agreeing)
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
