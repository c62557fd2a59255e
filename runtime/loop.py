"""THE inference loop: per-trajectory gating, compaction, divergence detection.

`solve(backend, tokens, z0, cfg)` runs every row of `tokens` until it settles, refilling the
working batch from the remaining rows (continuous batching); `Scheduler` drives the same
`run_loop` from a request queue. No other module loops over outer steps.

Per step the host reads only residual, logit_delta, q_halt (B,) and preds (B, L); the state
stays on the backend's device. A row stops (first rule that fires, in this order; docs/algorithm.md#stopping-rules):

  diverged     residual or logit_delta is NaN/Inf: the state went non-finite. The row keeps its
               last finite preds and is dropped from its puzzle's vote; the batch carries on.
  fixed_depth  `cfg.fixed_depth` steps done (the paper's protocol: no other rule applies).
  tol          residual < cfg.tol for cfg.patience consecutive steps.      } the registered stopping
  stable       preds unchanged for cfg.window consecutive steps.          } rules (runtime/
  q_halt       cfg.q_halt and the q_halt logit > cfg.q_halt_threshold     } stopping_rules.py)
               for cfg.patience consecutive steps.
  agree        cfg.agree rows of the same group (puzzle) converged to one answer.
               With agree, a group's rows run in waves (progressive breadth, `Waves`): the row
               source offers the next wave only once the current one stopped without agreeing,
               and the rows never launched are reported with reason "not_launched".
  max_steps    cfg.max_steps steps done (or the row's own lower cap, `Rows.max_steps`).

Precision cascade (a backend with `stages == 2`, e.g. int8+fp32, runtime/backends/cascade.py):
every row starts in the low-precision stage, where only diverged and max_steps stop it; once its
residual makes no new low for cfg.cascade_patience steps (the low precision's floor), falls
below cfg.cascade_tol, or a settling rule (tol, stable, q_halt) fires, it moves to the
high-precision stage with fresh counters, and the rules above stop it there. The loop tells the backend each row's stage before every step (`route`); the
state stays on the device across the switch.

The returned iterate is the LAST one (the state after the row's final step), not the
lowest-residual one: stopping rules make the last iterate the settled one, and `converged`
scoring (docs/algorithm.md#breadth-and-aggregation) is defined on the final steps.

Listeners (both optional, both off for `solve`): `on_step` sees every running row's current
preds after each step, from the host copies the loop reads anyway (no extra transfer, and no
work at all when nobody listens); `on_fault` turns a raising `backend.step` into a retry or a
"failed" stop of the rows in the working batch at that step, so a server outlives one fault.

Settled rows leave the batch (compaction: the device state is gathered to the remaining rows,
so compute shrinks). Backends with static shapes (CUDA-graph replay) instead keep fixed slots:
settled rows are frozen by a done mask and their slots refilled in place.
"""
from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from eqr.contract.artifact import NOISE_INPUT
from eqr.contract.errors import EqRError
from eqr.runtime.backends.base import Backend
from eqr.runtime.config import SolveConfig
from eqr.runtime.path_noise import draw_noise
from eqr.runtime.stats import CONVERGED_REASONS, REASON_CODE, SolveStats
from eqr.runtime.stopping_rules import RULES, Rule, Signals, StoppingRule, active_rules, rule_of

log = logging.getLogger(__name__)

InitFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # row ids (R,) -> z_H, z_L (R, L, D)


@dataclass
class Rows:
    """Trajectories entering the loop. ids are the caller's keys; groups tie rows of one puzzle."""

    ids: np.ndarray  # int64 (R,)
    groups: np.ndarray  # int64 (R,)
    tokens: np.ndarray  # int32 (R, L)
    z_H: np.ndarray  # float32 (R, L, D)
    z_L: np.ndarray  # float32 (R, L, D)
    max_steps: np.ndarray | None = None  # int32 (R,) per-row step caps <= cfg.max_steps (None: cfg's)
    # path noise (runtime/path_noise.py): each row's sigma (None: cfg.noise for all) and the key of its
    # noise stream, (seed, puzzle, breadth index), needed when a row's sigma > 0
    noise: np.ndarray | None = None  # float32 (R,)
    noise_keys: np.ndarray | None = None  # int64 (R, 3)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Finished:
    """Rows that stopped in one step, with everything `SolveStats` records about them."""

    ids: np.ndarray  # int64 (R,)
    groups: np.ndarray  # int64 (R,)
    preds: np.ndarray  # int32 (R, L) last finite predictions
    nstep: np.ndarray  # int32 (R,)
    reason: np.ndarray  # int8 (R,)
    residual: np.ndarray  # fp32 (R,)
    logit_delta: np.ndarray  # fp32 (R,)
    score: np.ndarray  # fp32 (R,)
    q_halt: np.ndarray  # fp32 (R,)
    residual_trace: np.ndarray | None  # fp32 (R, N) NaN-padded
    logit_delta_trace: np.ndarray | None  # fp32 (R, N)
    low_steps: np.ndarray | None = None  # int32 (R,) steps in the cascade's low-precision stage


class RunningRows:
    """The rows still running after one step. Each field is a host copy, made when first read
    (during the `on_step` call: the loop reuses its table afterwards), so a listener that reads
    nothing costs nothing; the copies themselves may be kept.

    ids       int64 (R,)
    preds     int32 (R, L) current predictions
    nstep     int32 (R,)   steps taken so far
    residual  fp32  (R,)   current relative residual
    """

    def __init__(self, table: "_Table", running: np.ndarray) -> None:
        self._table, self._running = table, running  # running: bool (B,) over the batch's rows

    @cached_property
    def _rows(self) -> np.ndarray:
        return np.flatnonzero(self._running)

    @cached_property
    def ids(self) -> np.ndarray:
        return self._table.ids[self._rows]

    @cached_property
    def preds(self) -> np.ndarray:
        return self._table.preds[self._rows]

    @cached_property
    def nstep(self) -> np.ndarray:
        return self._table.nstep[self._rows]

    @cached_property
    def residual(self) -> np.ndarray:
        return self._table.residual[self._rows]


# on_fault(error, attempt) -> True to retry the same step once more, False to fail its rows.
FaultHandler = Callable[[Exception, int], bool]


class RowSource(Protocol):
    def take(self, room: int | None, block: bool) -> Rows | None:
        """Up to `room` rows (None: any number). With block=True wait for work; None then means
        no more rows will ever come. With block=False return None or an empty Rows when idle."""

    def aborted(self) -> bool:
        """True to stop now: every active row is finished with reason "cancelled"."""

    def settled(self, group: int, best: int | None) -> np.ndarray | None:
        """Every admitted row of `group` has stopped; `best` of them converged to one answer (None:
        they were cancelled or failed). None: more rows of the group will come (its next wave);
        else the group is done and the array holds the ids of its rows never launched (maybe none)."""


# --------------------------------------------------------------------------- progressive breadth


def wave_bounds(agree: int | None, breadth: int) -> list[int]:
    """A group's trajectories launched once each of its waves is in (cumulative, ending at K):
    all K at once without agree; else A, then doubling (2A, 4A, ...) up to K
    (docs/algorithm.md#progressive-breadth says why doubling)."""
    bounds, n = [], min(agree or breadth, breadth)
    while n < breadth:
        bounds.append(n)
        n *= 2
    return bounds + [breadth]


@dataclass
class _Group:
    ids: np.ndarray  # int64 (K,) the source's ids of the group's trajectories, in breadth order
    bounds: list[int]  # wave_bounds
    launched: int = 0  # trajectories handed to the loop
    end: int = 0  # trajectories launched once the current wave is in


class Waves:
    """A row source's progressive-breadth bookkeeping: which trajectories of each group run next.

    `open` a group with its K row ids; `take` hands out waves in order (whole waves, so a wave's
    trajectories start at the same step and a group's answer does not depend on the batch);
    `settled` is the RowSource method: it queues the next wave of a group that stopped without
    agreeing, or closes the group and returns the ids never launched.
    """

    def __init__(self, agree: int | None) -> None:
        self.agree = agree
        self._groups: dict[int, _Group] = {}
        self._ready: deque[int] = deque()  # groups with a wave to launch, in order
        self.waiting = 0  # trajectories in those waves

    def first(self, breadth: int) -> int:
        """Trajectories in a group's first wave."""
        return wave_bounds(self.agree, breadth)[0]

    def open(self, group: int, ids: np.ndarray) -> None:
        bounds = wave_bounds(self.agree, len(ids))
        self._groups[group] = _Group(np.asarray(ids, np.int64), bounds, 0, bounds[0])
        self._queue(group)

    def _queue(self, group: int) -> None:
        g = self._groups[group]
        self._ready.append(group)
        self.waiting += g.end - g.launched

    def take(self, room: int | None, split: bool) -> tuple[np.ndarray, np.ndarray]:
        """(ids, groups) int64 (R,) of the waiting waves that fit in `room` (None: all), in order;
        split: a first wave larger than `room` gives its first `room` ids (so it still runs)."""
        taken, groups = [], []
        free = self.waiting if room is None else room
        while self._ready and free > 0:
            group = self._ready[0]
            g = self._groups[group]
            n = g.end - g.launched
            if n > free:
                if taken or not split:
                    break
                n = free
            taken.append(g.ids[g.launched:g.launched + n])
            groups.append(np.full(n, group, np.int64))
            g.launched += n
            free -= n
            self.waiting -= n
            if g.launched == g.end:
                self._ready.popleft()
        if not taken:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(taken), np.concatenate(groups)

    def settled(self, group: int, best: int | None) -> np.ndarray | None:
        g = self._groups[group]
        if best is not None and (self.agree is None or best < self.agree):
            if g.launched < g.end:
                return None  # the rest of this (split) wave is still to launch
            if g.launched < len(g.ids):
                g.end = next(b for b in g.bounds if b > g.launched)
                self._queue(group)
                return None
        del self._groups[group]
        if g.launched < g.end:  # agreed or failed before its split wave was all in
            self._ready.remove(group)
            self.waiting -= g.end - g.launched
        return g.ids[g.launched:]


# --------------------------------------------------------------------------- per-row bookkeeping


@dataclass(kw_only=True)
class _Table:
    """Host bookkeeping, one entry per batch row (compacted position or static slot)."""

    ids: np.ndarray
    groups: np.ndarray
    live: np.ndarray  # bool: slot holds a running trajectory (always True when compacting)
    nstep: np.ndarray
    counts: np.ndarray  # int32 (B, len(RULES)): consecutive steps each stopping rule's hits held
    cap: np.ndarray  # int32: this row's max_steps
    preds: np.ndarray  # last finite preds (B, L)
    residual: np.ndarray
    logit_delta: np.ndarray
    q_halt: np.ndarray
    ring: np.ndarray  # (B, W) last W logit_deltas
    residual_trace: np.ndarray | None  # (B, N)
    logit_delta_trace: np.ndarray | None
    stage: np.ndarray  # int8 (B,): 0 low-precision, 1 high-precision stage of a cascade (always 1 otherwise)
    low_steps: np.ndarray  # int32 (B,) steps taken in the low stage
    lowest: np.ndarray  # fp32 (B,) lowest residual of the low stage so far
    floor_count: np.ndarray  # int32 (B,) low-stage steps since the residual last made a new low
    sigma: np.ndarray  # fp32 (B,) path-noise sigma (0: noise-free)
    noise_keys: np.ndarray  # int64 (B, 3) (seed, puzzle, breadth index) of the row's noise stream

    @classmethod
    def empty(cls, n: int, seq_len: int, window: int, trace_steps: int | None, stage: int = 1) -> "_Table":
        trace = (lambda: np.full((n, trace_steps), np.nan, np.float32)) if trace_steps else (lambda: None)
        nan = lambda: np.full(n, np.nan, np.float32)  # noqa: E731
        return cls(ids=np.full(n, -1, np.int64), groups=np.full(n, -1, np.int64), live=np.zeros(n, bool),
                   nstep=np.zeros(n, np.int32), counts=np.zeros((n, len(RULES)), np.int32),
                   cap=np.zeros(n, np.int32), preds=np.zeros((n, seq_len), np.int32), residual=nan(),
                   logit_delta=nan(), q_halt=nan(), ring=np.zeros((n, window), np.float32),
                   residual_trace=trace(), logit_delta_trace=trace(), stage=np.full(n, stage, np.int8),
                   low_steps=np.zeros(n, np.int32), lowest=np.full(n, np.inf, np.float32),
                   floor_count=np.zeros(n, np.int32), sigma=np.zeros(n, np.float32),
                   noise_keys=np.zeros((n, 3), np.int64))

    def _arrays(self) -> dict[str, np.ndarray | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def select(self, rows: np.ndarray) -> "_Table":
        return _Table(**{k: None if v is None else v[rows] for k, v in self._arrays().items()})

    def append(self, other: "_Table") -> "_Table":
        return _Table(**{k: None if v is None else np.concatenate([v, getattr(other, k)])
                         for k, v in self._arrays().items()})

    def assign(self, slots: np.ndarray, other: "_Table") -> None:
        for k, v in self._arrays().items():
            if v is not None:
                v[slots] = getattr(other, k)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Batch:
    """The working batch: device arrays plus the host table, row for row."""

    tokens: Any
    z_H: Any
    z_L: Any
    table: _Table


# --------------------------------------------------------------------------- the loop


class _Agreement:
    """Counts converged answers per group; tells when `agree` of them match, and tells the row
    source when a group has no rows left in the batch (its wave is over)."""

    def __init__(self, agree: int | None, source: RowSource) -> None:
        self.agree, self.source = agree, source
        self.answers: dict[int, Counter] = {}
        self.rows_left: Counter = Counter()

    def admit(self, groups: np.ndarray) -> None:
        self.rows_left.update(groups.tolist())

    def converged(self, group: int, preds: np.ndarray) -> bool:
        """Record one converged answer; True when its group now has `agree` matching answers."""
        if self.agree is None:
            return False
        counts = self.answers.setdefault(group, Counter())
        counts[preds.tobytes()] += 1
        return counts[preds.tobytes()] >= self.agree

    def finished(self, groups: np.ndarray, abnormal: bool) -> list[tuple[int, np.ndarray]]:
        """Count stopped rows (abnormal: cancelled or failed) -> (group, ids never launched) of each
        group the source closed with rows it never launched."""
        closed = []
        for group in groups.tolist():
            self.rows_left[group] -= 1
            if self.rows_left[group] > 0:
                continue
            del self.rows_left[group]
            counts = self.answers.get(group)
            skipped = self.source.settled(group, None if abnormal else max(counts.values()) if counts else 0)
            if skipped is not None:  # the group is done: forget it (a server runs forever)
                self.answers.pop(group, None)
                if len(skipped):
                    closed.append((group, skipped))
        return closed


def run_loop(backend: Backend, cfg: SolveConfig, source: RowSource, on_finish: Callable[[Finished], None],
             capacity: int | None = None, on_step: Callable[[RunningRows], None] | None = None,
             on_fault: FaultHandler | None = None) -> tuple[list[int], list[float]]:
    """Step the working batch until `source` is exhausted; report stopped rows to `on_finish`.

    capacity caps the working batch (None: admit everything at once); the backend's own
    `max_batch` caps it further, and is the batch size itself for static-shape backends.
    on_step(progress) follows the rows still running after each step. on_fault decides what a
    raising `backend.step` does: without it the exception propagates (ends the loop); with it
    the step is retried while on_fault says so, then the working batch's rows stop as "failed"
    and the loop goes on with the rows still waiting in `source`.
    Returns (active rows per batched step, seconds per batched step).
    """
    if backend.max_batch is not None:
        static = backend.static_shapes or capacity is None
        capacity = backend.max_batch if static else min(capacity, backend.max_batch)
    if backend.static_shapes and capacity is None:
        raise ValueError(f"the {backend.name} backend has static shapes but no max_batch after activate()")
    trace_steps = cfg.step_cap if cfg.stats == "trace" else None
    agreement = _Agreement(cfg.agreeing, source)
    rule = rule_of(cfg)
    settling = active_rules(rule) if cfg.gated else []  # (index, StoppingRule) the config turns on
    batch: _Batch | None = None
    sizes: list[int] = []
    times: list[float] = []
    while True:
        n_live = 0 if batch is None else int(batch.table.live.sum())
        # Without compaction settled rows still occupy (and cost) their place in the batch.
        n_used = n_live if cfg.compaction or batch is None or backend.static_shapes else len(batch.table)
        if source.aborted():
            if batch is not None and n_live:
                _finish(batch.table, batch.table.live.copy(), None, on_finish, agreement, code=REASON_CODE["cancelled"])
            break
        room = None if capacity is None else capacity - n_used
        if room is None or room > 0:
            rows = source.take(room, block=n_live == 0)
            if rows is None and n_live == 0:
                break
            if rows is not None and len(rows):
                agreement.admit(rows.groups)
                batch = _admit(backend, batch, rows, trace_steps, cfg, capacity)
        if batch is None or not batch.table.live.any():
            continue
        if backend.stages > 1:
            backend.route(batch.table.stage)
        outputs = _step(backend, batch, on_fault)
        if outputs is None:  # the step kept failing: its rows fail, the queue is still served
            _finish(batch.table, batch.table.live.copy(), None, on_finish, agreement, code=REASON_CODE["failed"])
            batch = None  # a fresh batch (and, for static shapes, fresh slots) from the next rows
            continue
        sizes.append(len(batch.table))
        times.append(backend.last_inference_time() or 0.0)
        stop, reason = _update(backend, batch.table, outputs, cfg, agreement, rule, settling)
        batch.z_H, batch.z_L = outputs["z_H_out"], outputs["z_L_out"]
        if on_step is not None:
            on_step(RunningRows(batch.table, batch.table.live & ~stop))  # read before _finish frees the rows
        if stop.any():
            _finish(batch.table, stop, reason, on_finish, agreement)
            batch = _release(backend, batch, cfg)
    return sizes, times


def _step(backend: Backend, batch: _Batch, on_fault: FaultHandler | None) -> dict[str, Any] | None:
    """One backend step on the working batch; None when it raised and `on_fault` gave up on it."""
    feeds = {"tokens": batch.tokens, "z_H": batch.z_H, "z_L": batch.z_L} | _noise_feed(backend, batch.table)
    if on_fault is None:
        return backend.step(feeds)
    attempt = 1
    while True:
        try:
            return backend.step(feeds)  # the feeds are untouched by a failed step: safe to rerun
        except Exception as error:
            if not on_fault(error, attempt):
                return None
            attempt += 1


def _noise_feed(backend: Backend, t: _Table) -> dict[str, Any]:
    """{NOISE_INPUT: the step's path noise (B, U, L, D)} when a running row has noise, else {}
    (the noise-free graph runs). Frozen and settled rows get zeros."""
    sigma = np.where(t.live, t.sigma, 0.0)  # (B,)
    if not (sigma > 0).any():
        return {}
    if backend.noise_shape is None:
        raise EqRError(f"--noise: the {backend.name} backend has no noisy step graph; export one with "
                       "`eqr export MODEL --noisy`")
    return {NOISE_INPUT: backend.upload(draw_noise(t.noise_keys, t.nstep + 1, sigma, backend.noise_shape))}


def _admit(backend: Backend, batch: _Batch | None, rows: Rows, trace_steps: int | None, cfg: SolveConfig,
           capacity: int | None) -> _Batch:
    """Add `rows` to the working batch: appended (compacting backends) or written into free slots."""
    table = _Table.empty(len(rows), rows.tokens.shape[1], cfg.score_window, trace_steps, stage=2 - backend.stages)
    table.ids[:], table.groups[:], table.live[:] = rows.ids, rows.groups, True
    table.cap[:] = cfg.max_steps if rows.max_steps is None else np.minimum(rows.max_steps, cfg.max_steps)
    table.sigma[:] = cfg.noise if rows.noise is None else rows.noise
    if rows.noise_keys is not None:
        table.noise_keys[:] = rows.noise_keys
    elif (table.sigma > 0).any():
        raise ValueError("rows with path noise need their noise keys (Rows.noise_keys: seed, puzzle, breadth index)")
    tokens, z_H, z_L = (backend.upload(a) for a in (rows.tokens.astype(np.int32), rows.z_H, rows.z_L))
    if not backend.static_shapes:
        if batch is None or len(batch.table) == 0:
            return _Batch(tokens, z_H, z_L, table)
        return _Batch(backend.concat([batch.tokens, tokens]), backend.concat([batch.z_H, z_H]),
                      backend.concat([batch.z_L, z_L]), batch.table.append(table))
    if batch is None:  # fixed slots, all free: frozen placeholders until filled
        L, D = rows.z_H.shape[1:]
        empty = _Table.empty(capacity, L, cfg.score_window, trace_steps)
        batch = _Batch(backend.upload(np.zeros((capacity, L), np.int32)),
                       backend.upload(np.zeros((capacity, L, D), np.float32)),
                       backend.upload(np.zeros((capacity, L, D), np.float32)), empty)
    slots = np.flatnonzero(~batch.table.live)[:len(rows)]
    batch.tokens = backend.put(batch.tokens, slots, tokens)
    batch.z_H = backend.put(batch.z_H, slots, z_H)
    batch.z_L = backend.put(batch.z_L, slots, z_L)
    batch.table.assign(slots, table)
    backend.freeze(~batch.table.live)
    return batch


def _update(backend: Backend, t: _Table, outputs: dict[str, Any], cfg: SolveConfig, agreement: _Agreement,
            rule: Rule, settling: list[tuple[int, StoppingRule]]) -> tuple[np.ndarray, np.ndarray]:
    """Fold one step's host outputs into the table -> (stop mask (B,), reason codes (B,))."""
    residual = backend.download(outputs["residual"]).astype(np.float32)  # (B,)
    logit_delta = backend.download(outputs["logit_delta"]).astype(np.float32)  # (B,)
    q_halt = backend.download(outputs["q_halt"]).astype(np.float32)  # (B,)
    preds = backend.download(outputs["preds"]).astype(np.int32)  # (B, L)
    live = t.live
    finite = np.isfinite(residual) & np.isfinite(logit_delta)
    ok = live & finite
    first = t.nstep == 0
    t.nstep[live] += 1
    changed = (preds != t.preds).any(axis=1) | first
    signals = Signals(residual=residual, q_halt=q_halt, changed=changed)
    for i, stopping in settling:
        t.counts[ok, i] = np.where(stopping.hits(signals, rule), t.counts[:, i] + 1, 0)[ok]
    t.preds[ok], t.residual[ok], t.logit_delta[ok], t.q_halt[ok] = preds[ok], residual[ok], logit_delta[ok], q_halt[ok]
    W = t.ring.shape[1]
    t.ring[ok, (t.nstep[ok] - 1) % W] = logit_delta[ok]
    if t.residual_trace is not None:
        at = np.flatnonzero(live)
        t.residual_trace[at, t.nstep[at] - 1] = residual[at]
        t.logit_delta_trace[at, t.nstep[at] - 1] = logit_delta[at]

    # the rules that say a row has settled
    settles = [(stopping.reason, ok & (t.counts[:, i] >= stopping.need(rule))) for i, stopping in settling]
    if backend.stages > 1:  # a low-stage row that settled moves on to the high stage instead of stopping
        low = ok & (t.stage == 0)
        settled = np.logical_or.reduce([hit for _, hit in settles]) if settles else np.zeros(len(t), bool)
        _cascade_switch(t, low, residual, cfg, settled)
        settles = [(name, hit & ~low) for name, hit in settles]

    reason = np.full(len(t), -1, np.int8)
    rules: list[tuple[str, np.ndarray]] = [("diverged", live & ~finite)]
    if cfg.gated:
        rules += settles
        rules.append(("max_steps", live & (t.nstep >= t.cap)))
    else:
        rules.append(("fixed_depth", live & (t.nstep >= cfg.fixed_depth)))
    for name, hit in rules:
        reason[hit & (reason < 0)] = REASON_CODE[name]
    if agreement.agree is not None:
        _apply_agreement(t, reason, agreement)
    return reason >= 0, reason


def _cascade_switch(t: _Table, low: np.ndarray, residual: np.ndarray, cfg: SolveConfig, settled: np.ndarray) -> None:
    """Low-stage rows whose residual reached its floor, or that a stopping rule calls settled,
    move to the high-precision stage."""
    t.low_steps[low] += 1
    improved = residual < t.lowest
    t.floor_count[low] = np.where(improved, 0, t.floor_count + 1)[low]
    t.lowest[low] = np.minimum(t.lowest, residual)[low]
    floor = (t.floor_count >= cfg.cascade_patience) | settled
    if cfg.cascade_tol is not None:
        floor |= residual < cfg.cascade_tol
    switch = low & floor
    t.stage[switch] = 1
    t.counts[switch] = 0  # the high stage judges afresh


def _apply_agreement(t: _Table, reason: np.ndarray, agreement: _Agreement) -> None:
    """Rows converged this step vote; a group reaching `agree` matching answers stops entirely."""
    converged_now = np.isin(reason, [REASON_CODE[r] for r in CONVERGED_REASONS])
    agreed = {int(t.groups[b]) for b in np.flatnonzero(converged_now) if agreement.converged(int(t.groups[b]), t.preds[b])}
    if agreed:
        rest = t.live & (reason < 0) & np.isin(t.groups, list(agreed))
        reason[rest] = REASON_CODE["agree"]


def _finish(t: _Table, stop: np.ndarray, reason: np.ndarray | None, on_finish: Callable[[Finished], None],
            agreement: _Agreement, code: int | None = None) -> None:
    """Report the rows in `stop` with their `reason` codes (or one `code` for all) and free them."""
    rows = np.flatnonzero(stop)
    W = t.ring.shape[1]
    counts = np.minimum(t.nstep[rows], W).clip(min=1)
    filled = np.arange(W)[None, :] < counts[:, None]  # (R, W): ring entries written so far
    score = np.where(filled, t.ring[rows], 0.0).sum(axis=1) / counts
    codes = np.full(len(rows), code, np.int8) if code is not None else reason[rows]
    finished = Finished(
        t.ids[rows].copy(), t.groups[rows].copy(), t.preds[rows].copy(), t.nstep[rows].copy(), codes,
        t.residual[rows].copy(), t.logit_delta[rows].copy(), score.astype(np.float32), t.q_halt[rows].copy(),
        None if t.residual_trace is None else t.residual_trace[rows].copy(),
        None if t.logit_delta_trace is None else t.logit_delta_trace[rows].copy(), t.low_steps[rows].copy())
    t.live[rows] = False
    closed = agreement.finished(finished.groups, abnormal=code is not None)
    on_finish(finished)
    if closed:
        trace_steps = None if t.residual_trace is None else t.residual_trace.shape[1]
        on_finish(_not_launched(closed, t.preds.shape[1], trace_steps))


def _not_launched(closed: list[tuple[int, np.ndarray]], seq_len: int, trace_steps: int | None) -> Finished:
    """The rows of closed groups that never ran (progressive breadth): 0 steps, no answer (zeros)."""
    ids = np.concatenate([skipped for _, skipped in closed])
    groups = np.concatenate([np.full(len(skipped), group, np.int64) for group, skipped in closed])
    R = len(ids)
    nan = np.full(R, np.nan, np.float32)
    trace = None if trace_steps is None else np.full((R, trace_steps), np.nan, np.float32)
    return Finished(ids, groups, np.zeros((R, seq_len), np.int32), np.zeros(R, np.int32),
                    np.full(R, REASON_CODE["not_launched"], np.int8), nan, nan.copy(), nan.copy(), nan.copy(),
                    trace, None if trace is None else trace.copy(), np.zeros(R, np.int32))


def _release(backend: Backend, batch: _Batch, cfg: SolveConfig) -> _Batch:
    """Drop stopped rows: gather the device state (compaction) or freeze their slots (static)."""
    if backend.static_shapes:
        backend.freeze(~batch.table.live)
        return batch
    keep = np.flatnonzero(batch.table.live)
    if len(keep) == 0:
        return _Batch(None, None, None, batch.table.select(keep))
    if not cfg.compaction:
        return batch  # settled rows keep running (and keep costing) until the batch ends
    return _Batch(backend.take(batch.tokens, keep), backend.take(batch.z_H, keep), backend.take(batch.z_L, keep),
                  batch.table.select(keep))


# --------------------------------------------------------------------------- one-shot solve


class _ArraySource:
    """All rows known up front; initial states drawn only when rows are admitted."""

    def __init__(self, tokens: np.ndarray, groups: np.ndarray, init: InitFn, noise_keys: np.ndarray | None = None,
                 agree: int | None = None) -> None:
        self.tokens, self.groups, self.init, self.noise_keys = tokens, groups, init, noise_keys
        self.next = 0  # rows handed out (no agree), or groups opened (progressive breadth)
        self.waves = None if agree is None else Waves(agree)
        self.members = [] if agree is None else _rows_by_group(groups)

    def take(self, room: int | None, block: bool) -> Rows | None:
        if self.waves is not None:
            return self._take_waves(room, block)
        if self.next >= len(self.tokens):
            return None
        end = len(self.tokens) if room is None else min(len(self.tokens), self.next + room)
        ids = np.arange(self.next, end, dtype=np.int64)
        self.next = end
        return self._rows(ids)

    def _take_waves(self, room: int | None, block: bool) -> Rows | None:
        """Next waves of running groups first, then first waves of new groups (opened as room needs)."""
        while self.next < len(self.members) and (room is None or self.waves.waiting < room):
            ids = self.members[self.next]
            self.waves.open(int(self.groups[ids[0]]), ids)
            self.next += 1
        ids, _ = self.waves.take(room, split=block)
        return self._rows(ids) if len(ids) else None

    def _rows(self, ids: np.ndarray) -> Rows:
        z_H, z_L = self.init(ids)
        noise_keys = None if self.noise_keys is None else self.noise_keys[ids]
        return Rows(ids, self.groups[ids], self.tokens[ids], z_H, z_L, noise_keys=noise_keys)

    def aborted(self) -> bool:
        return False

    def settled(self, group: int, best: int | None) -> np.ndarray | None:
        return np.zeros(0, np.int64) if self.waves is None else self.waves.settled(group, best)


def _rows_by_group(groups: np.ndarray) -> list[np.ndarray]:
    """Row ids of each group, in id order; groups in the order of their first row."""
    if not len(groups):
        return []
    order = np.argsort(groups, kind="stable")  # (B,) row ids, grouped
    _, starts = np.unique(groups[order], return_index=True)
    members = np.split(order.astype(np.int64), starts[1:])
    members.sort(key=lambda rows: rows[0])
    return members


def solve(backend: Backend, tokens: np.ndarray, z0: tuple[np.ndarray, np.ndarray] | InitFn, cfg: SolveConfig,
          groups: np.ndarray | None = None, batch_size: int | None = None,
          progress: Callable[[int], None] | None = None,
          noise_keys: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], SolveStats]:
    """Run every row of `tokens` (int [B, L]) to its stop -> ({"preds": (B, L) int32}, SolveStats).

    z0 is (z_H, z_L) float32 [B, L, D] each, or a function of row ids drawing them on admission
    (so a large input never holds every initial state at once). groups (B,) ties the K breadth
    rows of one puzzle for `cfg.agree`, which launches them in waves in row order (rows never
    launched: reason "not_launched", 0 steps). batch_size caps the working batch; settled rows are
    replaced by waiting ones. progress(n) is called with the count of rows that just stopped.
    noise_keys int64 (B, 3): each row's path-noise stream (seed, puzzle, breadth index), needed when
    cfg.noise > 0 (None: (0, row, 0)). The backend must be active.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
    B = len(tokens)
    init = z0 if callable(z0) else (lambda ids, z=z0: (z[0][ids], z[1][ids]))
    groups = np.arange(B, dtype=np.int64) if groups is None else np.asarray(groups, np.int64)
    trace_steps = cfg.step_cap if cfg.stats == "trace" else None
    collected = _Table.empty(B, tokens.shape[1], 1, trace_steps)
    reason = np.full(B, -1, np.int8)
    score = np.full(B, np.nan, np.float32)

    def on_finish(done: Finished) -> None:
        ids = done.ids
        collected.preds[ids], collected.nstep[ids], reason[ids] = done.preds, done.nstep, done.reason
        collected.residual[ids], collected.logit_delta[ids], collected.q_halt[ids] = \
            done.residual, done.logit_delta, done.q_halt
        score[ids] = done.score
        collected.low_steps[ids] = done.low_steps
        if done.residual_trace is not None:
            collected.residual_trace[ids], collected.logit_delta_trace[ids] = done.residual_trace, done.logit_delta_trace
        if progress is not None:
            progress(len(ids))

    if noise_keys is None and cfg.noise > 0:
        noise_keys = np.stack([np.zeros(B, np.int64), np.arange(B, dtype=np.int64), np.zeros(B, np.int64)], axis=1)
    source = _ArraySource(tokens, groups, init, noise_keys, cfg.agreeing)
    sizes, times = run_loop(backend, cfg, source, on_finish, batch_size)
    longest = int(collected.nstep.max()) if B else 0
    stats = SolveStats(
        nstep=collected.nstep, reason=reason, residual=collected.residual, logit_delta=collected.logit_delta,
        score=score, q_halt=collected.q_halt,
        residual_trace=None if trace_steps is None else collected.residual_trace[:, :longest],
        logit_delta_trace=None if trace_steps is None else collected.logit_delta_trace[:, :longest],
        batch_size=np.asarray(sizes, np.int32), step_time=np.asarray(times, np.float64),
        low_steps=collected.low_steps if backend.stages > 1 else None)
    return {"preds": collected.preds}, stats
