"""The official depth x breadth evaluation (torch eager, exactly D steps, noise on), as a baseline.

This loop is a benchmark baseline, not product code: the style rule that only
`runtime/loop.py` loops over outer steps applies to the product, and this loop exists to be
compared against it (docs/performance.md).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class ReferenceRun:
    """The official depth x breadth evaluation, with what every depth would have given
    (docs/algorithm.md#the-official-evaluation-protocol-and-the-runtime).

    preds        uint8 (N, P*K, L)  argmax after every outer step, row p*K + k
    logit_delta  fp32  (N, P*K)     mean over positions of ||logits_t - logits_{t-1}||_2 (t = 1 uses
                                    the logits of the initial z_H, as the runtime's step graph does)
    seconds      wall time of the whole loop
    """

    preds: np.ndarray
    logit_delta: np.ndarray
    seconds: float
    breadth: int

    def answers(self, depth: int, aggregate: str, score_window: int = 3) -> np.ndarray:
        """int (P, L): the aggregated answer had the protocol stopped at `depth` (<= N)."""
        from eqr.runtime.aggregate import get_aggregator

        K = self.breadth
        preds = self.preds[depth - 1].astype(np.int32)  # (P*K, L)
        P = len(preds) // K
        score = self.logit_delta[max(0, depth - score_window):depth].mean(axis=0)  # (P*K,)
        by_puzzle = preds.reshape(P, K, -1)  # (P*K, L) -> (P, K, L)
        chosen = get_aggregator(aggregate)(by_puzzle, score.reshape(P, K), np.ones((P, K), bool))
        return np.take_along_axis(by_puzzle, chosen[:, None, None], axis=1)[:, 0]


@torch.inference_mode()
def reference_solve(model: Any, tokens: np.ndarray, depth: int, breadth: int, batch_size: int, seed: int,
                    noise: float, progress: Callable[[int], None] | None = None) -> ReferenceRun:
    """The official protocol with torch eager on the model's device: rows = each puzzle K times, random
    init, exactly D steps, noise on."""
    device = next(model.parameters()).device
    rows = torch.as_tensor(tokens).long().repeat_interleave(breadth, dim=0).to(device)  # (P*K, L)
    R, L = rows.shape
    preds = np.empty((depth, R, L), np.uint8)
    logit_delta = np.empty((depth, R), np.float32)
    generator = torch.Generator(device=device).manual_seed(seed)
    chunk = max(breadth, batch_size - batch_size % breadth)  # whole puzzles per batch
    started = time.perf_counter()
    for start in range(0, R, chunk):
        batch = rows[start:start + chunk]
        state = model.initial_state(len(batch), generator, device=device)
        previous = model.lm_head(state.z_H).float()  # (b, L, V)
        for t in range(depth):
            state, logits, _ = model.step(state, batch, noise=noise, generator=generator)
            logits = logits.float()
            preds[t, start:start + len(batch)] = logits.argmax(-1).cpu().numpy()
            logit_delta[t, start:start + len(batch)] = (logits - previous).norm(dim=-1).mean(-1).cpu().numpy()
            previous = logits
        if progress is not None:
            progress(len(batch))
    return ReferenceRun(preds, logit_delta, time.perf_counter() - started, breadth)


