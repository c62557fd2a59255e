"""Run every precision x backend on the same puzzles and initial-state seeds; collect raw results.

Polygraphy's "run, then compare": this module only runs and records (`collect` -> `Results`),
`eqr.calibration.compare` judges, `eqr.calibration.render` draws. All solving goes through the
runtime (`Solver` -> `eqr.runtime.loop`); the only direct `backend.step` calls are single steps
on recorded calibration states and the contraction probe.

Results layout (arrays; P puzzles, L tokens, D width, N steps, S calibration states per depth):
    runs[name]["curve"][f"{aggregate}@K{K}@D{depth}"]  int32 (P, L)  fixed-depth answers
    runs[name]["trajectories"][f"K{K}@D{depth}/{preds|score|valid}"]  (P, K, L), fp32 (P, K), bool (P, K):
                           every trajectory at the deepest depth, K > 1 (the official breadth metrics)
    runs[name]["fixed"]    residual_trace fp32 (P, M), score fp32 (P,), preds (P, L): breadth 1, M = max_steps, ungated
    runs[name]["gated"]    nstep int32 (P,), converged bool (P,), residual fp32 (P,), preds (P, L),
                           residual_trace fp32 (P, N): gated run under this precision's (calibrated) stopping rule
    runs[name]["one_step"][depth]  fp32 (S, 2, L, D): the step's output state on calibration states
    runs[name]["settled"]  fp32 (C, 2, L, D): state after M steps of this backend's own loop
    runs[name]["radius"]   fp64 (C,), radius_history fp64 (iters, C)
    runs[name]["speed"]    latency_s {batch: best seconds of one step}, gated_seconds (wall of the gated
                           run), file_bytes (the step graph's size; None for torch)
    cascades[name]         gated (as above plus low_steps int32 (P,)) and speed for each "low+high" cascade

results.npz keeps everything but the states: one_step and settled are saved as their relative
errors against the reference run (one_step_error/{depth} fp32 (S,), settled_error fp32 (C,)),
answers as uint8 and traces as fp16, so 256 puzzles stay under 1 MB.
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
from eqr.contract.artifact import Artifact, missing_noisy_graph
from eqr.runtime.backends.registry import unavailable_reason
from eqr.runtime.loop import solve

log = logging.getLogger(__name__)

Advance = Callable[[int], None]  # a bar's advance(n)


@dataclass
class Results:
    """Everything `collect` measured, keyed by run name ("onnxruntime-int8")."""

    meta: dict[str, Any]
    inputs: np.ndarray  # uint8 (P, L)
    labels: np.ndarray | None  # uint8 (P, L)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # run name -> why it could not run
    cascades: dict[str, dict[str, Any]] = field(default_factory=dict)  # "onnxruntime-int8+fp32" -> gated, speed


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


TRAJECTORY_PARTS = ("preds", "score", "valid")  # a run's "trajectories" entries: f"{trajectory_key}/{part}"


def trajectory_key(breadth: int, depth: int) -> str:
    return f"K{breadth}@D{depth}"


def plan_units(cfg: ReportConfig, n_pairs: int, n_cascades: int) -> int:
    """Progress bar units: one per depth curve, floor run, gated run, calibration batch, settled run, probe
    and speed probe; one per cascade."""
    return n_pairs * (len(cfg.breadth) + 6) + n_cascades


def runnable_cascades(artifact: Artifact, cfg: ReportConfig) -> list[str]:
    """The cascades to run: cfg.cascades, or (None) every one whose two precisions are both compared;
    either way only those ONNX Runtime can run."""
    from eqr.contract.artifact import CASCADES

    wanted = CASCADES if cfg.cascades is None else cfg.cascades
    return [c for c in wanted if all((cfg.cascades is not None or p in cfg.precisions)
                                     and unavailable_reason("onnxruntime", artifact, p) is None for p in c.split("+"))]


def runnable_pairs(artifact: Artifact, cfg: ReportConfig) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(backend, precision) pairs that can run, and why the others cannot: keyed by run name, or
    by the backend's name alone when it runs none of them for one reason (the torch backend
    where torch is not installed: one note, and the report compares with onnxruntime-fp32)."""
    pairs, skipped = [], {}
    for backend in cfg.backends:
        reasons = {}
        for precision in cfg.precisions:
            reason = unavailable_reason(backend, artifact, precision)
            if reason is None:
                pairs.append((backend, precision))
            else:
                reasons[run_name(backend, precision)] = reason
        if len(reasons) == len(cfg.precisions) and len(set(reasons.values())) == 1:
            skipped[backend] = next(iter(reasons.values()))
        else:
            skipped |= reasons
    order = {p: i for i, p in enumerate(cfg.precisions)}
    pairs.sort(key=lambda pair: order[pair[1]])  # precision-major, as the report lists its runs
    return pairs, skipped


def collect(artifact: Artifact, puzzles: PuzzleSet, cfg: ReportConfig, calib: CalibSet | None,
            progress: Advance | None = None) -> Results:
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
            if cfg.noise > 0 and solver.backend.noise_shape is None:
                results.skipped[name] = missing_noisy_graph(artifact, precision)
                continue
            solver.rule["noise"] = cfg.noise  # every solve of the report, unless one says otherwise
            run = collect_run(solver, puzzles.inputs, cfg, calib, tick)
            run |= {"precision": precision, "backend": backend, "tol": solver.default_tol,
                    "rule": gated_config(solver, cfg).to_dict(), "describe": solver.backend.describe()}
        if precision == "int8" and calib is not None and precision in artifact.onnx:
            from eqr.calibration.quantize import activation_errors

            sample = calib.select(np.concatenate(list(calib.per_depth(cfg.calib_samples).values())))
            run["activation_errors"] = activation_errors(artifact.onnx[precision], sample)
        run["seconds"] = time.perf_counter() - start
        results.runs[name] = run
    for cascade in runnable_cascades(artifact, cfg):
        if cfg.noise > 0:  # a cascade has no noisy step graph
            results.skipped[run_name("onnxruntime", cascade)] = f"--noise: the {cascade} cascade runs noise-free steps only"
            tick(1)
            continue
        with Solver.load(artifact, backend="onnxruntime", precision=cascade) as solver:
            results.cascades[run_name("onnxruntime", cascade)] = collect_cascade(solver, puzzles.inputs, cfg) | {
                "precision": cascade, "backend": "onnxruntime", "describe": solver.backend.describe()}
        tick(1)
    return results


def collect_cascade(solver: Any, inputs: np.ndarray, cfg: ReportConfig) -> dict[str, Any]:
    """A cascade's gated run (the high precision's rule) and its wall time."""
    gated_cfg = gated_config(solver, cfg)
    solver.run(inputs[:2], gated_cfg.replace(max_steps=2, stats="final"))  # warm-up, untimed
    started = time.perf_counter()
    gated = solver.run(inputs, gated_cfg, breadth=1, seed=cfg.seed)
    seconds = time.perf_counter() - started
    files = [solver.backend.low, solver.backend.high]
    return {"rule": gated_cfg.to_dict(),
            "gated": {"nstep": gated.stats.nstep, "converged": gated.converged, "residual": gated.residual,
                      "preds": gated.preds, "residual_trace": gated.stats.residual_trace,
                      "low_steps": gated.stats.low_steps},
            "speed": {"latency_s": {}, "gated_seconds": seconds,
                      "file_bytes": sum(_file_bytes(b) or 0 for b in files)}}


def speed_probe(backend: Any, seq_len: int, hidden_size: int, vocab_size: int, batches: tuple[int, ...],
                seed: int) -> dict[int, float]:
    """batch -> best seconds of one step on random states (best of 3 after a warm-up)."""
    rng = np.random.default_rng(seed)
    latency = {}
    for B in batches:
        feeds = {"tokens": backend.upload(rng.integers(1, vocab_size, (B, seq_len)).astype(np.int32)),
                 "z_H": backend.upload(rng.standard_normal((B, seq_len, hidden_size), dtype=np.float32)),
                 "z_L": backend.upload(rng.standard_normal((B, seq_len, hidden_size), dtype=np.float32))}
        backend.step(feeds)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            backend.step(feeds)
            times.append(time.perf_counter() - started)
        latency[B] = min(times)
    return latency


def _file_bytes(backend: Any) -> int | None:
    path = getattr(backend, "onnx_path", None) or getattr(backend, "engine_path", None)
    return path.stat().st_size if path is not None and path.is_file() else None


def collect_run(solver: Any, inputs: np.ndarray, cfg: ReportConfig, calib: CalibSet | None,
                tick: Advance) -> dict[str, Any]:
    """Everything measured on one solver (one backend at one precision)."""
    run: dict[str, Any] = {"curve": {}}
    run["trajectories"] = {}
    for K in cfg.breadth:
        curve, trajectories = depth_runs(solver, inputs, K, cfg.depths, cfg.seed)
        run["curve"] |= curve
        if K > 1:
            key = trajectory_key(K, max(cfg.depths))
            run["trajectories"] |= {f"{key}/{part}": array for part, array in zip(TRAJECTORY_PARTS, trajectories)}
        tick(1)
    # Ungated to max_steps: the residual falls to this precision's floor and stays there.
    fixed = solver.solve(inputs, fixed_depth=cfg.max_steps, breadth=1, seed=cfg.seed, stats="trace")
    run["fixed"] = {"preds": fixed.preds, "score": fixed.stats.score, "residual_trace": fixed.stats.residual_trace}
    tick(1)
    started = time.perf_counter()
    gated = solver.run(inputs, gated_config(solver, cfg), breadth=1, seed=cfg.seed)
    gated_seconds = time.perf_counter() - started
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
    seq_len, hidden = inputs.shape[1], solver.hidden_size
    vocab = solver.artifact.vocab_size if solver.artifact is not None else int(inputs.max()) + 1
    run["speed"] = {"latency_s": speed_probe(solver.backend, seq_len, hidden, vocab, cfg.latency_batches, cfg.seed),
                    "gated_seconds": gated_seconds, "file_bytes": _file_bytes(solver.backend)}
    tick(1)
    return run


def gated_config(solver: Any, cfg: ReportConfig) -> Any:
    """The precision's own (calibrated) stopping rule, capped at the report's max_steps, traced."""
    return solver.config(max_steps=min(solver.config().max_steps, cfg.max_steps), stats="trace")


def depth_curve(solver: Any, inputs: np.ndarray, breadth: int, depths: tuple[int, ...],
                seed: int) -> dict[str, np.ndarray]:
    """Aggregated answers (P, L) at every depth from ONE fixed-depth run to max(depths) (`depth_runs`)."""
    return depth_runs(solver, inputs, breadth, depths, seed)[0]


def depth_runs(solver: Any, inputs: np.ndarray, breadth: int, depths: tuple[int, ...],
               seed: int) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Aggregated answers (P, L) at every depth from ONE fixed-depth run to max(depths), and the
    deepest depth's trajectories: preds (P, K, L), score (P, K), valid (P, K).

    A recorder keeps each trajectory's predictions after every depth in `depths`; the
    `converged` score at depth d is the loop's own rule (mean logit_delta over its last
    `score_window` steps) read from the logit_delta trace. Equivalent to a separate
    `fixed_depth=d` run per depth, at the cost of the deepest one only.
    """
    from eqr.runtime.aggregate import get_aggregator
    from eqr.runtime.metrics import trajectories_of
    from eqr.runtime.solver import initial_states

    P, K, L = len(inputs), breadth, inputs.shape[1]
    puzzles, starts = np.repeat(np.arange(P), K), np.tile(np.arange(K), P)  # row r = p*K + k
    cfg = solver.config(fixed_depth=max(depths), stats="trace")
    recorder = RecordingBackend(solver.backend, preds_after=depths)

    def init(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return initial_states(L, solver.hidden_size, solver.init_std, seed, puzzles[rows], starts[rows])

    with recorder:
        noise_keys = np.stack([np.full(P * K, seed), puzzles, starts], axis=1)  # (P*K, 3): Solver.run's streams
        _, stats = solve(recorder, np.repeat(inputs, K, axis=0).astype(np.int32), init, cfg, groups=puzzles,
                         noise_keys=noise_keys)
    valid = ~stats.diverged.reshape(P, K)
    aggregates = ("first",) if K == 1 else ("converged", "vote")
    curve = {}
    for depth in depths:
        preds = recorder.preds.get(depth)
        if preds is None or len(preds) != P * K:  # rows diverged before this depth: solve it on its own
            result = solver.solve(inputs, fixed_depth=depth, breadth=K, seed=seed, aggregate=aggregates[0],
                                  keep_trajectories=True)
            log.warning("depth %d: some trajectories diverged; answers from a separate run", depth)
            curve |= {curve_key(a, K, depth): result.preds for a in aggregates}
            if depth == max(depths):
                deepest = trajectories_of(result)
            continue
        window = stats.logit_delta_trace[:, max(0, depth - cfg.score_window):depth]  # (P*K, W)
        score = np.nanmean(window, axis=1).reshape(P, K).astype(np.float32)
        by_puzzle = preds.reshape(P, K, L)  # (P*K, L) -> (P, K, L)
        for aggregate in aggregates:
            chosen = get_aggregator(aggregate)(by_puzzle, score, valid)
            curve[curve_key(aggregate, K, depth)] = by_puzzle[np.arange(P), chosen]
        if depth == max(depths):
            deepest = (by_puzzle, score, valid)
    return curve, deepest


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


def save_results(path: Any, results: Results, reference: str | None = None) -> None:
    """results.npz: every array under "run/section/key", the rest as JSON (no pickles). States are
    saved as relative errors against `reference` (a run name), answers as uint8, traces as fp16."""
    import json

    from eqr.contract.io import atomic_open

    arrays: dict[str, np.ndarray] = {"inputs": results.inputs}
    if results.labels is not None:
        arrays["labels"] = results.labels
    scalars: dict[str, Any] = {}
    ref = results.runs.get(reference) if reference else None
    for name, run in {**results.runs, **results.cascades}.items():
        for key, value in run.items():
            if key in ("one_step", "settled"):
                if ref is not None:
                    arrays |= _state_errors(name, key, value, ref[key])
            elif isinstance(value, dict) and key not in ("describe", "rule", "speed"):
                for sub, array in value.items():
                    if array is not None:
                        arrays[f"{name}/{key}/{sub}"] = _compact(np.asarray(array))
            elif isinstance(value, np.ndarray):
                arrays[f"{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    meta = {"meta": results.meta, "skipped": results.skipped, "scalars": scalars, "state_reference": reference}
    with atomic_open(path) as f:
        np.savez_compressed(f, __meta__=np.array(json.dumps(meta, default=str)), **arrays)


def relative_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row ||a - b|| / ||b|| over all but the first axis."""
    diff = (a.astype(np.float64) - b).reshape(len(a), -1)
    ref = b.astype(np.float64).reshape(len(b), -1)
    return np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)


def _state_errors(name: str, key: str, value: Any, ref: Any) -> dict[str, np.ndarray]:
    if key == "settled":
        return {f"{name}/settled_error": relative_error(value, ref).astype(np.float32)}
    return {f"{name}/one_step_error/{depth}": relative_error(out, ref[depth]).astype(np.float32)
            for depth, out in value.items() if depth in ref}


def _compact(array: np.ndarray) -> np.ndarray:
    """Answers (small non-negative ints) as uint8, float traces as fp16; the rest unchanged."""
    if array.dtype.kind in "iu" and array.ndim >= 2 and array.size and 0 <= array.min() and array.max() < 256:
        return array.astype(np.uint8)
    if array.dtype == np.float32 and array.ndim == 2:
        return array.astype(np.float16)
    return array
