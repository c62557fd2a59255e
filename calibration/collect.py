"""Run every precision x backend on the same puzzles and initial-state seeds; collect raw results.

Polygraphy's "run, then compare": this module only runs and records (`collect` -> `Results`),
`eqr.calibration.compare` judges, `eqr.calibration.render` draws. All solving goes through the
runtime (`Solver` -> `eqr.runtime.solve`); the only direct `backend.step` calls are single steps
on recorded calibration states and the contraction probe.

Results layout (arrays; P puzzles, L tokens, D width, N steps, S calibration states per depth):
    runs[name]["curve"][f"{aggregate}@K{K}@D{depth}"]  int32 (P, L)  fixed-depth answers
    runs[name]["fixed"]    residual_trace fp32 (P, M), score fp32 (P,), preds (P, L): breadth 1, M = max_steps, ungated
    runs[name]["gated"]    nstep int32 (P,), converged bool (P,), residual fp32 (P,), preds (P, L),
                           residual_trace fp32 (P, N): gated run under this precision's (calibrated) stopping rule
    runs[name]["one_step"][depth]  fp32 (S, 2, L, D): the step's output state on calibration states
    runs[name]["settled"]  fp32 (C, 2, L, D): state after M steps of this backend's own loop
    runs[name]["radius"]   fp64 (C,), radius_history fp64 (iters, C)
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eqr.calibration.config import ReportConfig
from eqr.calibration.contraction import spectral_radius
from eqr.calibration.data import PuzzleSet
from eqr.calibration.record import CalibSet, RecordingBackend, record_calibration
from eqr.runtime.artifact import Artifact
from eqr.runtime.backends.registry import unavailable_reason
from eqr.runtime.solve import solve

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class Results:
    """Everything `collect` measured, keyed by run name ("onnxruntime-int8")."""

    meta: dict[str, Any]
    inputs: np.ndarray  # uint8 (P, L)
    labels: np.ndarray | None  # uint8 (P, L)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # run name -> why it could not run


def run_name(backend: str, precision: str) -> str:
    return f"{backend}-{precision}"


def curve_keys(cfg: ReportConfig) -> list[tuple[str, int, int]]:
    """(aggregate, breadth, depth) of every fixed-depth run: breadth 1 is one trajectory; K > 1 is
    aggregated by the paper's converged top-1 and by majority vote."""
    keys = []
    for K in cfg.breadth:
        for aggregate in (("first",) if K == 1 else ("converged", "vote")):
            keys += [(aggregate, K, d) for d in cfg.depths]
    return keys


def curve_key(aggregate: str, breadth: int, depth: int) -> str:
    return f"{aggregate}@K{breadth}@D{depth}"


def plan_units(cfg: ReportConfig, n_pairs: int) -> int:
    """Progress units: one per depth curve, floor run, gated run, calibration batch, settled run and probe."""
    return n_pairs * (len(cfg.breadth) + 5)


def runnable_pairs(artifact: Artifact, cfg: ReportConfig) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(backend, precision) pairs that can run, and why the others cannot."""
    pairs, skipped = [], {}
    for precision in cfg.precisions:
        for backend in cfg.backends:
            reason = unavailable_reason(backend, artifact, precision)
            if reason is None:
                pairs.append((backend, precision))
            else:
                skipped[run_name(backend, precision)] = reason
    return pairs, skipped


def collect(artifact: Artifact, puzzles: PuzzleSet, cfg: ReportConfig, calib: CalibSet | None,
            progress: Progress | None = None) -> Results:
    """Run every runnable precision x backend of `artifact` on `puzzles` (same seeds everywhere)."""
    from eqr.runtime import Solver

    pairs, skipped = runnable_pairs(artifact, cfg)
    results = Results({"artifact": artifact.location, "config": cfg.to_dict(), "task": artifact.task,
                       "tol": dict(artifact.tol), "calibration": None if calib is None else calib.provenance},
                      puzzles.inputs, puzzles.labels, skipped=skipped)
    tick = progress or (lambda n: None)
    for backend, precision in pairs:
        name = run_name(backend, precision)
        log.info("collecting %s", name)
        start = time.perf_counter()
        with Solver.load(artifact, backend=backend, precision=precision) as solver:
            run = collect_run(solver, puzzles.inputs, cfg, calib, tick)
            run |= {"precision": precision, "backend": backend, "tol": solver.default_tol,
                    "rule": gated_config(solver, cfg).to_dict(), "describe": solver.backend.describe()}
        if precision == "int8" and calib is not None and precision in artifact.onnx:
            from eqr.calibration.quantize import activation_errors

            sample = calib.select(np.concatenate(list(calib.per_depth(cfg.calib_samples).values())))
            run["activation_errors"] = activation_errors(artifact.onnx[precision], sample)
        run["seconds"] = time.perf_counter() - start
        results.runs[name] = run
    return results


def collect_run(solver: Any, inputs: np.ndarray, cfg: ReportConfig, calib: CalibSet | None,
                tick: Progress) -> dict[str, Any]:
    """Everything measured on one solver (one backend at one precision)."""
    run: dict[str, Any] = {"curve": {}}
    for K in cfg.breadth:
        run["curve"] |= depth_curve(solver, inputs, K, cfg.depths, cfg.seed)
        tick(1)
    # Ungated to max_steps: the residual falls to this precision's floor and stays there.
    fixed = solver.solve(inputs, fixed_depth=cfg.max_steps, breadth=1, seed=cfg.seed, stats="trace")
    run["fixed"] = {"preds": fixed.preds, "score": fixed.stats.score, "residual_trace": fixed.stats.residual_trace}
    tick(1)
    gated = solver.run(inputs, gated_config(solver, cfg), breadth=1, seed=cfg.seed)
    run["gated"] = {"nstep": gated.stats.nstep, "converged": gated.converged, "residual": gated.residual,
                    "preds": gated.preds, "residual_trace": gated.stats.residual_trace}
    tick(1)
    run["one_step"] = one_step_outputs(solver.backend, calib, cfg.calib_samples) if calib is not None else {}
    tick(1)
    settled = settled_states(solver, inputs[:cfg.contraction_samples], cfg.max_steps, cfg.seed)
    run["settled"] = settled["z"]
    tick(1)
    eps = cfg.fd_eps.get(solver.precision, 1e-2)
    probe = spectral_radius(solver.backend, settled["tokens"], settled["z"][:, 0], settled["z"][:, 1],
                            cfg.power_iters, eps, seed=cfg.seed)
    run["radius"], run["radius_history"] = probe["radius"], probe["history"]
    tick(1)
    return run


def gated_config(solver: Any, cfg: ReportConfig) -> Any:
    """The precision's own (calibrated) stopping rule, capped at the report's max_steps, traced."""
    return solver.config(max_steps=min(solver.config().max_steps, cfg.max_steps), stats="trace")


def depth_curve(solver: Any, inputs: np.ndarray, breadth: int, depths: tuple[int, ...],
                seed: int) -> dict[str, np.ndarray]:
    """Aggregated answers (P, L) at every depth from ONE fixed-depth run to max(depths).

    A recorder keeps each trajectory's predictions after every depth in `depths`; the
    `converged` score at depth d is the loop's own rule (mean logit_delta over its last
    `score_window` steps) read from the logit_delta trace. Equivalent to a separate
    `fixed_depth=d` run per depth, at the cost of the deepest one only.
    """
    from eqr.runtime.aggregate import get_aggregator
    from eqr.runtime.solver import initial_states

    P, K, L = len(inputs), breadth, inputs.shape[1]
    puzzles, starts = np.repeat(np.arange(P), K), np.tile(np.arange(K), P)  # row r = p*K + k
    cfg = solver.config(fixed_depth=max(depths), stats="trace")
    recorder = RecordingBackend(solver.backend, preds_after=depths)

    def init(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return initial_states(L, solver.hidden_size, solver.init_std, seed, puzzles[rows], starts[rows])

    with recorder:
        _, stats = solve(recorder, np.repeat(inputs, K, axis=0).astype(np.int32), init, cfg, groups=puzzles)
    valid = ~stats.diverged.reshape(P, K)
    aggregates = ("first",) if K == 1 else ("converged", "vote")
    curve = {}
    for depth in depths:
        preds = recorder.preds.get(depth)
        if preds is None or len(preds) != P * K:  # rows diverged before this depth: solve it on its own
            result = solver.solve(inputs, fixed_depth=depth, breadth=K, seed=seed, aggregate=aggregates[0])
            log.warning("depth %d: some trajectories diverged; answers from a separate run", depth)
            curve |= {curve_key(a, K, depth): result.preds for a in aggregates}
            continue
        window = stats.logit_delta_trace[:, max(0, depth - cfg.score_window):depth]  # (P*K, W)
        score = np.nanmean(window, axis=1).reshape(P, K).astype(np.float32)
        by_puzzle = preds.reshape(P, K, L)  # (P*K, L) -> (P, K, L)
        for aggregate in aggregates:
            chosen = get_aggregator(aggregate)(by_puzzle, score, valid)
            curve[curve_key(aggregate, K, depth)] = by_puzzle[np.arange(P), chosen]
    return curve


def one_step_outputs(backend: Any, calib: CalibSet, per_depth: int) -> dict[int, np.ndarray]:
    """depth -> fp32 (S, 2, L, D): one step of `backend` on the first `per_depth` calibration states."""
    outputs = {}
    for depth, rows in calib.per_depth(per_depth).items():
        feeds = {"tokens": backend.upload(calib.tokens[rows]), "z_H": backend.upload(calib.z_H[rows]),
                 "z_L": backend.upload(calib.z_L[rows])}
        out = backend.step(feeds)
        outputs[depth] = np.stack([backend.download(out["z_H_out"]), backend.download(out["z_L_out"])],
                                  axis=1).astype(np.float32)  # 2 x (S, L, D) -> (S, 2, L, D)
    return outputs


def settled_states(solver: Any, inputs: np.ndarray, depth: int, seed: int) -> dict[str, np.ndarray]:
    """The state after `depth` steps of the solver's own loop (breadth 1, run seeds)."""
    recorded = record_calibration(solver, inputs, starts=1, depths=[depth], seed=seed)
    z = np.stack([recorded.z_H, recorded.z_L], axis=1)  # (C, 2, L, D)
    return {"tokens": recorded.tokens, "z": z}


# --------------------------------------------------------------------------- saving


def save_results(path: Any, results: Results) -> None:
    """results.npz: every array under "run/section/key", the rest as JSON (no pickles)."""
    import json

    from eqr.io import atomic_open

    arrays: dict[str, np.ndarray] = {"inputs": results.inputs}
    if results.labels is not None:
        arrays["labels"] = results.labels
    scalars: dict[str, Any] = {}
    for name, run in results.runs.items():
        for key, value in run.items():
            if isinstance(value, dict) and key not in ("describe", "rule"):
                for sub, array in value.items():
                    arrays[f"{name}/{key}/{sub}"] = np.asarray(array)
            elif isinstance(value, np.ndarray):
                arrays[f"{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    meta = {"meta": results.meta, "skipped": results.skipped, "scalars": scalars}
    with atomic_open(path) as f:
        np.savez_compressed(f, __meta__=np.array(json.dumps(meta, default=str)), **arrays)
