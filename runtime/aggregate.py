"""Choosing one answer per puzzle from its K trajectories; rules registered by name.

Every rule has the same signature: preds int (P, K, L), score fp32 (P, K) (mean logit_delta
over the last steps, lower = more converged), valid bool (P, K) (False for diverged
trajectories, which never win) -> chosen breadth index int64 (P,). A puzzle whose trajectories
all diverged gets index 0 (its result is flagged diverged by the caller).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from eqr.contract.errors import EqRError

AggregateFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
_AGGREGATORS: dict[str, AggregateFn] = {}


def register_aggregator(name: str) -> Callable[[AggregateFn], AggregateFn]:
    def add(fn: AggregateFn) -> AggregateFn:
        _AGGREGATORS[name] = fn
        return fn

    return add


def aggregator_names() -> list[str]:
    return list(_AGGREGATORS)


def get_aggregator(name: str) -> AggregateFn:
    try:
        return _AGGREGATORS[name]
    except KeyError:
        raise EqRError(f"unknown aggregate rule {name!r}; choose one of: {', '.join(_AGGREGATORS)}") from None


@register_aggregator("converged")
def converged_top1(preds: np.ndarray, score: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The paper's top-1 selection (docs/algorithm.md#breadth-and-aggregation): the lowest score;
    ties go to the earliest."""
    masked = np.where(valid & np.isfinite(score), score, np.inf)
    chosen = masked.argmin(axis=1)
    fallback = first_valid(preds, score, valid)  # no finite score (e.g. cancelled at step 0)
    return np.where(np.isfinite(masked).any(axis=1), chosen, fallback)


@register_aggregator("vote")
def majority(preds: np.ndarray, score: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The most frequent full answer among valid trajectories; ties go to the earliest
    (docs/algorithm.md#breadth-and-aggregation)."""
    chosen = np.zeros(len(preds), np.int64)
    for p in range(len(preds)):
        alive = np.flatnonzero(valid[p])  # the voters; a diverged trajectory's answer gets no vote
        if alive.size:
            _, first, votes = np.unique(preds[p, alive], axis=0, return_index=True, return_counts=True)
            chosen[p] = alive[first[votes == votes.max()].min()]  # a tie: the answer given earliest
    return chosen


@register_aggregator("first")
def first_valid(preds: np.ndarray, score: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The first trajectory that did not diverge."""
    return np.where(valid.any(axis=1), valid.argmax(axis=1), 0).astype(np.int64)


def vote_share(preds: np.ndarray, valid: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """fp32 (P,): fraction of a puzzle's valid trajectories whose answer equals the chosen one."""
    winner = np.take_along_axis(preds, chosen[:, None, None], axis=1)  # (P, 1, L)
    same = (preds == winner).all(axis=2) & valid  # (P, K)
    count = valid.sum(axis=1)
    return np.where(count > 0, same.sum(axis=1) / np.maximum(count, 1), 0.0).astype(np.float32)
