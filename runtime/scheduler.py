"""`Scheduler`: continuous batching for servers.

A worker thread keeps one working batch of at most `batch_size` trajectories and drives
`eqr.runtime.solve.run_loop` with it; whenever trajectories settle, their slots are refilled
from a bounded request queue. `submit(tokens) -> Future[SolveResult]` (one puzzle, P = 1) is
thread-safe; a full queue blocks the caller (back-pressure) up to `timeout`.

Each request's K trajectories are seeded by (seed, 0, k), with the request's own seed, so a
request's answer equals `Solver.solve(tokens[None], seed=seed)` whatever else is in the batch.

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
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eqr.errors import EqRError
from eqr.runtime.aggregate import get_aggregator
from eqr.runtime.config import SolveConfig
from eqr.runtime.solve import Finished, Rows, run_loop
from eqr.runtime.solver import Solver, aggregate_rows, initial_states
from eqr.runtime.stats import REASON_CODE, SolveStats

log = logging.getLogger(__name__)


@dataclass
class _Request:
    tokens: np.ndarray  # int32 (L,)
    seed: int
    future: Future
    breadth: int
    remaining: int = 0
    done: dict[int, tuple] = field(default_factory=dict)  # breadth index -> finished row fields


class Scheduler:
    """A fixed-size working batch fed from a bounded queue; one worker thread owns the backend."""

    def __init__(self, solver: Solver, cfg: SolveConfig | None = None, batch_size: int = 64, breadth: int = 1,
                 aggregate: str = "converged", seed: int = 0, max_queue: int = 1024) -> None:
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
        self._rows: dict[int, tuple[_Request, int]] = {}  # row id -> (request, breadth index); worker only
        self._row_ids = itertools.count()
        self._request_ids = itertools.count()
        self._enter_worker = solver.backend.thread_setup()  # per-thread engine settings, copied to the worker
        self._thread = threading.Thread(target=self._serve, name="eqr-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side
    def submit(self, tokens: np.ndarray, seed: int | None = None, timeout: float | None = None) -> Future:
        """Queue one puzzle (int [L]); blocks while the queue is full, raising queue.Full after `timeout`."""
        tokens = self.solver.check_tokens(np.asarray(tokens))
        if len(tokens) != 1:
            raise EqRError(f"submit takes one puzzle [L], got {tokens.shape[0]}")
        request = _Request(tokens[0], self.seed if seed is None else seed, Future(), self.breadth)
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or len(self._queue) < self._max_queue, timeout):
                raise queue.Full(f"scheduler queue is full ({self._max_queue} requests)")
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

    # ------------------------------------------------------------------ worker side
    def _serve(self) -> None:
        self._enter_worker()
        backend = self.solver.backend
        activated_here = not backend.is_active
        try:
            if activated_here:
                backend.activate()
            run_loop(backend, self.cfg, self, self._on_finish, capacity=self.batch_size)
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
        """RowSource for run_loop: whole requests (K rows each) that fit in `room`."""
        with self._cond:
            if block:
                self._cond.wait_for(lambda: self._queue or self._closed)
            if self._abort or (self._closed and not self._queue):
                return None if block else _no_rows()
            taken: list[_Request] = []
            while self._queue and (room is None or (len(taken) + 1) * self.breadth <= room):
                request = self._queue.popleft()
                if not request.future.cancelled():  # cancelled by its caller while queued
                    taken.append(request)
            self._cond.notify_all()  # queue space freed: wake blocked submitters
        return self._rows_for(taken) if taken else _no_rows()

    def aborted(self) -> bool:
        return self._abort

    def _rows_for(self, requests: list[_Request]) -> Rows:
        K = self.breadth
        ids = np.array([next(self._row_ids) for _ in range(len(requests) * K)], np.int64)
        groups = np.repeat(np.array([next(self._request_ids) for _ in requests], np.int64), K)
        z_H, z_L = [], []
        for i, request in enumerate(requests):
            request.remaining = K
            for k in range(K):
                self._rows[int(ids[i * K + k])] = (request, k)
            zh, zl = initial_states(self.solver.seq_len, self.solver.hidden_size, self.solver.init_std,
                                    request.seed, np.zeros(K, np.int64), np.arange(K))
            z_H.append(zh)
            z_L.append(zl)
        tokens = np.repeat(np.stack([r.tokens for r in requests]), K, axis=0)  # (R*K, L)
        return Rows(ids, groups, tokens, np.concatenate(z_H), np.concatenate(z_L))

    def _on_finish(self, done: Finished) -> None:
        for r, row_id in enumerate(done.ids.tolist()):
            request, k = self._rows.pop(row_id)
            request.done[k] = (done.preds[r], done.nstep[r], done.reason[r], done.residual[r], done.logit_delta[r],
                               done.score[r], done.q_halt[r])
            request.remaining -= 1
            if request.remaining == 0:
                self._resolve(request)

    def _resolve(self, request: _Request) -> None:
        K = request.breadth
        fields_by_k = [request.done[k] for k in range(K)]
        preds, nstep, reason, residual, logit_delta, score, q_halt = (np.stack(col) for col in zip(*fields_by_k))
        if (reason == _CANCELLED).any():  # shutdown(cancel=True) cut it short
            _settle(request.future, exception=CancelledError())
            return
        stats = SolveStats(nstep.astype(np.int32), reason.astype(np.int8), residual, logit_delta, score, q_halt,
                           None, None, np.zeros(0, np.int32), np.zeros(0))
        _settle(request.future, result=aggregate_rows(preds[None], stats, self.choose, 1, K))  # (K, L) -> (1, K, L)


_CANCELLED = REASON_CODE["cancelled"]


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
