"""The official evaluator's breadth metrics from every trajectory's final answer
(docs/algorithm.md#the-official-metrics).

Pure numpy, shared by `eqr solve --summary` and `eqr report`. Inputs (P puzzles,
K breadth, L tokens; trajectory p*K + k of a solve is [p, k]):

    preds   int  (P, K, L)  each trajectory's final predictions
    score   fp32 (P, K)     SolveStats.score: mean logit_delta over the last `score_window` steps
    valid   bool (P, K)     False for a diverged (or never launched) trajectory: it counts as wrong and is never chosen
    labels  int  (P, L)     the solutions

`official_metrics` returns one flat dict keyed by the official evaluator's metric names, its
fractions in [0, 1] as there, so a number compares directly with the official evaluator's output.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from eqr.contract.errors import EqRError
from eqr.runtime.aggregate import majority
from eqr.tasks.base import PAD_ID

if TYPE_CHECKING:
    from eqr.runtime.solver import SolveResult

DEFAULT_TOP_K = 4  # the official evaluation configs' convergence_top_k
PASS_K = (1, 2, 4, 8, 16, 32, 64, 128)  # the official pass@k ladder; only k < n is reported there


def pass_at_k(n: int, correct: np.ndarray, k: int) -> np.ndarray:
    """fp64, shaped like `correct`: the unbiased 1 - C(n - c, k) / C(n, k) for c correct of n samples."""
    if not 1 <= k <= n:
        raise EqRError(f"pass@k needs 1 <= k <= n, got k {k}, n {n}")
    table = np.ones(n + 1)  # table[c]; c > n - k: every k-subset holds a correct one
    for c in range(n - k + 1):
        table[c] = 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))  # C(n-c, k)/C(n, k) as a product
    return table[np.asarray(correct, np.int64)]


def pass_k_values(n: int) -> list[int]:
    """The k of pass@k for n samples: the official 1, 2, 4, ... below n, then n itself (= any correct)."""
    return [k for k in PASS_K if k < n] + [n]


def trajectory_correct(preds: np.ndarray, valid: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """bool (P, K): the whole answer equals the label and the trajectory did not diverge."""
    return (preds == labels[:, None, :]).all(axis=2) & valid


def official_metrics(preds: np.ndarray, score: np.ndarray, valid: np.ndarray, labels: np.ndarray,
                     top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """different_init/*, majority_vote/* and (K > 1) convergence_top_k/* for P puzzles of K trajectories."""
    preds, score, valid, labels = _checked(preds, score, valid, labels, top_k)
    correct = trajectory_correct(preds, valid, labels)  # (P, K)
    metrics = different_init(correct) | majority_vote(preds, score, valid, labels)
    if preds.shape[1] > 1:
        metrics |= convergence_top_k(correct, score, valid, top_k)
    return metrics


def different_init(correct: np.ndarray) -> dict[str, Any]:
    """Per-puzzle counts c of correct trajectories: avg pass rate, any correct and pass@k."""
    P, K = correct.shape
    c = correct.sum(axis=1)  # (P,)
    metrics: dict[str, Any] = {"different_init/n": K, "different_init/total_samples": P,
                               "different_init/avg_pass_rate": float((c / K).mean()),
                               "different_init/any_correct": float((c > 0).mean())}
    return metrics | {f"different_init/pass@{k}": float(pass_at_k(K, c, k).mean()) for k in pass_k_values(K)}


def majority_vote(preds: np.ndarray, score: np.ndarray, valid: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The `vote` aggregator's answer (ties to the earliest trajectory): exact and per-token accuracy,
    tokens counted where the label is not PAD; a puzzle whose every trajectory diverged is wrong."""
    P = len(preds)
    chosen = majority(preds, score, valid)
    winner = preds[np.arange(P), chosen]  # (P, L)
    alive = valid.any(axis=1)[:, None]  # (P, 1)
    counted = labels != PAD_ID
    hits = (winner == labels) & alive
    return {"majority_vote/exact_accuracy": float(hits.all(axis=1).mean()),
            "majority_vote/accuracy": float((hits & counted).sum() / max(int(counted.sum()), 1)),
            "majority_vote/num_samples": P}


def convergence_order(score: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """int64 (P, K): breadth indices from the most converged (lowest score) on; ties keep the earlier
    trajectory first, diverged or non-finite scores go last."""
    key = np.where(valid & np.isfinite(score), score, np.inf)
    return np.argsort(key, axis=1, kind="stable")


def convergence_top_k(correct: np.ndarray, score: np.ndarray, valid: np.ndarray, top_k: int) -> dict[str, Any]:
    """The k = min(top_k, K) lowest-score trajectories of each puzzle: their mean exact accuracy, any
    correct, pass@j within them, the cumulative accuracy of the top 1..k and their mean score."""
    P, K = correct.shape
    k = min(top_k, K)
    order = convergence_order(score, valid)[:, :k]  # (P, k)
    ranked = np.take_along_axis(correct, order, axis=1)  # (P, k): correct, most converged first
    hits = ranked.sum(axis=1)  # (P,)
    prefix = np.cumsum(ranked, axis=1).sum(axis=0)  # (k,): correct among the top i, summed over puzzles
    metrics: dict[str, Any] = {
        "convergence_top_k/k": k, "convergence_top_k/total_samples": P,
        "convergence_top_k/exact_accuracy": float(hits.sum() / (P * k)),
        "convergence_top_k/any_correct": float((hits > 0).mean()),
        "convergence_top_k/avg_convergence_score": _mean_top_score(score, valid, order)}
    metrics |= {f"convergence_top_k/pass@{j}": float(pass_at_k(k, hits, j).mean()) for j in pass_k_values(k)}
    return metrics | {f"convergence_top_k/cumulative_exact_acc_top{i}": float(prefix[i - 1] / (P * i))
                      for i in range(1, k + 1)}


def _mean_top_score(score: np.ndarray, valid: np.ndarray, order: np.ndarray) -> float | None:
    """Mean over puzzles of the mean finite score of the chosen trajectories (None if none is finite)."""
    chosen = np.take_along_axis(np.where(valid, score, np.nan), order, axis=1).astype(np.float64)  # (P, k)
    finite = np.isfinite(chosen)
    per_puzzle = np.where(finite, chosen, 0.0).sum(axis=1) / np.maximum(finite.sum(axis=1), 1)  # (P,)
    has = finite.any(axis=1)
    return float(per_puzzle[has].mean()) if has.any() else None


def headline(metrics: dict[str, Any]) -> str:
    """'majority 95.0%, converged top-1 96.0%, top-4 94.0%, pass@8 98.0%' (K > 1) for summary lines."""
    K, k = metrics["different_init/n"], metrics.get("convergence_top_k/k")
    words = [f"majority {100 * metrics['majority_vote/exact_accuracy']:.1f}%"]
    if k is not None:
        words += [f"converged top-1 {100 * metrics['convergence_top_k/cumulative_exact_acc_top1']:.1f}%",
                  f"top-{k} {100 * metrics['convergence_top_k/exact_accuracy']:.1f}%"]
    return ", ".join(words + [f"pass@{K} {100 * metrics[f'different_init/pass@{K}']:.1f}%"])


def trajectories_of(result: "SolveResult") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """preds (P, K, L), score (P, K), valid (P, K) of a solve run with keep_trajectories=True."""
    if result.trajectory_preds is None:
        raise EqRError("the solve kept no per-trajectory answers; run it with keep_trajectories=True")
    P, K, _ = result.trajectory_preds.shape
    score = result.stats.score.reshape(P, K)  # (P*K,) -> (P, K)
    valid = result.stats.voters.reshape(P, K)  # (P*K,) -> (P, K); never-launched ones (agree) are out too
    return result.trajectory_preds, score, valid


def result_metrics(result: "SolveResult", labels: np.ndarray, top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """`official_metrics` of a solve run with keep_trajectories=True against labels (P, L)."""
    return official_metrics(*trajectories_of(result), labels, top_k)


def _checked(preds: np.ndarray, score: np.ndarray, valid: np.ndarray, labels: np.ndarray,
             top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    preds, score, valid, labels = (np.asarray(a) for a in (preds, score, valid, labels))
    if preds.ndim != 3 or not preds.shape[0] or not preds.shape[1]:
        raise EqRError(f"preds must be (P, K, L) with P, K >= 1, got shape {preds.shape}")
    P, K, L = preds.shape
    if score.shape != (P, K) or valid.shape != (P, K) or labels.shape != (P, L):
        raise EqRError(f"score and valid must be ({P}, {K}) and labels ({P}, {L}) for preds {preds.shape}, got "
                       f"{score.shape}, {valid.shape}, {labels.shape}")
    if top_k < 1:
        raise EqRError(f"top-k must be >= 1, got {top_k}")
    return preds, score.astype(np.float64), valid.astype(bool), labels
