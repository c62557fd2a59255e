"""Trajectory-aware calibration data: the step inputs the FP32 loop sees, from random start to fixed point.

`RecordingBackend` wraps any backend and keeps a host copy of each step's feeds at chosen
depths; the runtime loop (`eqr.runtime.loop`, via `Solver`) drives it, so calibration never
owns a loop. With `fixed_depth` and every row admitted at once, the t-th batched step sees
every row at depth t (only diverged rows ever leave early, and those are recorded as they go).

calib.npz (no pickles; read with np.load(allow_pickle=False)):
    tokens  int32   [N, L]     puzzle of each recorded state
    z_H     float32 [N, L, D]  step inputs (the state after `depth` steps)
    z_L     float32 [N, L, D]
    depth   int32   [N]        outer steps taken before this state (0 = the random start)
    puzzle  int32   [N]        row of the puzzle in the calibration puzzles
    start   int32   [N]        random start (breadth index) of the trajectory
    provenance  str (0-d)      JSON: model hash, data, seeds, depths, config
`eqr export --calib-data` reads the same files (`read_calib_file`): tokens, z_H and z_L are
required (depth, puzzle and start default to 0), or tokens alone, to record trajectories from;
`int8_calibration` is what eqr export hands its INT8 build.

One recorder: `record_fp32` runs the FP32 step graph in ONNX Runtime (`eqr calibrate`, `eqr
report` and `eqr export --precision int8` alike), so calibration states come from the graph the
INT8 graph is quantized from, and no torch is needed to record them (a target calibrates the
export it was given).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eqr.contract.artifact import graph_feeds
from eqr.contract.errors import EqRError
from eqr.contract.io import atomic_open, puzzle_key, read_npz
from eqr.runtime.backends.base import Backend

if TYPE_CHECKING:
    import onnx

    from eqr.export.config import ExportConfig
    from eqr.export.exporter import Calibrate
    from eqr.export.inputs import TaskInfo
    from eqr.model.network import EqRModel

log = logging.getLogger(__name__)

EXPORT_CALIB_PUZZLES = 4  # eqr export's built-in calibration: puzzles, each recorded at every depth


class RecordingBackend(Backend):
    """Delegates to `inner`; copies the feeds of the steps whose depth is in `depths` to the host."""

    def __init__(self, inner: Backend, depths: Sequence[int] = (), preds_after: Sequence[int] = (),
                 on_step: Callable[[int], None] | None = None) -> None:
        """Record the feeds of the steps at `depths` (the state after that many steps) and the
        predictions and q_halt logits output after the steps in `preds_after` (1 = after the first step).
        on_step(rows): called after every step with its batch's row count (progress)."""
        super().__init__()
        self.on_step = on_step
        self.inner = inner
        self.name = f"recording({inner.name})"  # type: ignore[misc]
        self.depths = set(int(d) for d in depths)
        self.preds_after = set(int(d) for d in preds_after)
        self.preds: dict[int, np.ndarray] = {}  # steps taken -> int32 (rows, L) predictions
        self.q_halt: dict[int, np.ndarray] = {}  # steps taken -> fp32 (rows,) q_halt logits
        self.static_shapes = inner.static_shapes
        self.stages = inner.stages
        self.noise_shape = inner.noise_shape  # noisy steps pass through
        self.steps_taken = 0
        self._owns_inner = False  # deactivate `inner` only if we activated it
        self.records: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (depth, tokens, z_H, z_L)

    def reset(self) -> None:
        self.steps_taken = 0
        self.records = []
        self.preds = {}
        self.q_halt = {}

    def activate_impl(self) -> None:
        if not self.inner.is_active:
            self.inner.activate()
            self._owns_inner = True

    def deactivate_impl(self) -> None:
        if self._owns_inner:
            self.inner.deactivate()
            self._owns_inner = False

    def step_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        if self.steps_taken in self.depths:
            host = [self.inner.download(feeds[name]) for name in ("tokens", "z_H", "z_L")]
            self.records.append((self.steps_taken, host[0].astype(np.int32), host[1].astype(np.float32),
                                 host[2].astype(np.float32)))
        self.steps_taken += 1
        outputs = self.inner.step(feeds)
        self.inference_time = self.inner.last_inference_time()
        if self.steps_taken in self.preds_after:
            self.preds[self.steps_taken] = self.inner.download(outputs["preds"]).astype(np.int32)
            self.q_halt[self.steps_taken] = self.inner.download(outputs["q_halt"]).astype(np.float32)
        if self.on_step is not None:
            self.on_step(len(self.inner.download(outputs["residual"])))
        return outputs

    def route(self, stage: np.ndarray) -> None:
        self.inner.route(stage)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def upload(self, array: np.ndarray) -> Any:
        return self.inner.upload(array)

    def download(self, array: Any) -> np.ndarray:
        return self.inner.download(array)

    def take(self, array: Any, rows: np.ndarray) -> Any:
        return self.inner.take(array, rows)

    def concat(self, arrays: Sequence[Any]) -> Any:
        return self.inner.concat(arrays)


@dataclass(frozen=True)
class CalibSet:
    """Recorded step inputs (shapes in the module docstring) and their provenance."""

    tokens: np.ndarray
    z_H: np.ndarray
    z_L: np.ndarray
    depth: np.ndarray
    puzzle: np.ndarray
    start: np.ndarray
    provenance: dict[str, Any]

    def __len__(self) -> int:
        return len(self.tokens)

    def feeds(self, rows: int = 16) -> list[dict[str, np.ndarray]]:
        """The states as ONNX feeds of at most `rows` rows (for `quantize_int8`)."""
        return [graph_feeds(self.tokens[i:i + rows], self.z_H[i:i + rows], self.z_L[i:i + rows])
                for i in range(0, len(self), rows)]

    def select(self, index: np.ndarray) -> "CalibSet":
        return CalibSet(self.tokens[index], self.z_H[index], self.z_L[index], self.depth[index],
                        self.puzzle[index], self.start[index], self.provenance)

    def per_depth(self, limit: int) -> dict[int, np.ndarray]:
        """depth -> row indices of at most `limit` states at that depth."""
        return {int(d): np.flatnonzero(self.depth == d)[:limit] for d in np.unique(self.depth)}


def record_calibration(solver: Any, tokens: np.ndarray, starts: int, depths: Sequence[int], seed: int,
                       provenance: dict[str, Any] | None = None,
                       progress: Callable[[int], None] | None = None) -> CalibSet:
    """Run the FP32 loop of `solver` (an `eqr.runtime.Solver`) from `starts` random states per puzzle
    and record the step inputs at `depths` (0 = the random start) -> CalibSet.

    Initial states are the runtime's: trajectory (puzzle i, start k) is seeded by (seed, i, k),
    so reports that use the same seed run exactly these trajectories.
    """
    tokens = np.asarray(tokens)
    depths = sorted(set(int(d) for d in depths))
    recorder = RecordingBackend(solver.backend, depths)
    inner, solver.backend = solver.backend, recorder
    try:
        with recorder:
            # One step past the deepest recorded depth: the loop feeds depth d at step d + 1.
            solver.solve(tokens, breadth=starts, fixed_depth=max(depths) + 1, seed=seed, aggregate="first",
                         progress=progress)
    finally:
        solver.backend = inner
    if not recorder.records:
        raise RuntimeError("the recording backend saw no steps")
    P, K = len(tokens), starts
    rows = {"tokens": [], "z_H": [], "z_L": [], "depth": [], "puzzle": [], "start": []}
    for depth, tok, z_H, z_L in recorder.records:
        if len(tok) != P * K:
            log.warning("depth %d: %d of %d trajectories left early (diverged); not recorded", depth, len(tok), P * K)
            continue
        rows["tokens"].append(tok)
        rows["z_H"].append(z_H)
        rows["z_L"].append(z_L)
        rows["depth"].append(np.full(P * K, depth, np.int32))
        rows["puzzle"].append(np.repeat(np.arange(P, dtype=np.int32), K))  # row r = p*K + k
        rows["start"].append(np.tile(np.arange(K, dtype=np.int32), P))
    arrays = {k: np.concatenate(v) for k, v in rows.items()}
    info = {"seed": seed, "starts": starts, "depths": depths, "puzzles": P} | dict(provenance or {})
    return CalibSet(**arrays, provenance=info)


def record_fp32(fp32_onnx: str | os.PathLike[str], sizes: tuple[int, int, tuple[float, float]], tokens: np.ndarray,
                starts: int, depths: Sequence[int], seed: int, provenance: dict[str, Any] | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[CalibSet, dict[str, Any]]:
    """Record calibration states on the FP32 step graph at `fp32_onnx`, run by ONNX Runtime
    (`record_calibration`) -> (CalibSet, what ran it: `backend_info`). sizes: (seq_len,
    hidden_size, (z_H, z_L) init std), the export's."""
    from eqr.runtime.backends.base import backend_info
    from eqr.runtime.backends.ort_backend import OrtBackend
    from eqr.runtime.solver import Solver

    seq_len, hidden_size, init_std = sizes
    with Solver(OrtBackend(fp32_onnx, precision="fp32"), seq_len, hidden_size, init_std) as solver:
        calib = record_calibration(solver, tokens, starts, depths, seed, provenance, progress=progress)
        return calib, backend_info(solver.backend)


def save_calib(path: str | os.PathLike[str], calib: CalibSet, force: bool = False) -> Path:
    """Write calib.npz atomically; refuses to replace an existing file unless `force`."""
    path = Path(path)
    if path.exists() and not force:
        raise EqRError(f"{path} exists; pass --force to replace it")
    with atomic_open(path) as f:
        np.savez_compressed(f, tokens=calib.tokens, z_H=calib.z_H, z_L=calib.z_L, depth=calib.depth,
                            puzzle=calib.puzzle, start=calib.start,
                            provenance=np.array(json.dumps(calib.provenance, sort_keys=True)))
    return path


def read_calib_file(path: str | os.PathLike[str], seq_len: int | None = None, hidden_size: int | None = None,
                    vocab_size: int | None = None, what: str = "") -> CalibSet | np.ndarray:
    """Read and check a calibration file (one-line EqRError naming the file and the fix):
    a calib.npz with states -> CalibSet; a puzzles-only .npz ('tokens' or 'inputs' [N, L]) -> the
    int32 token array, for the caller to record trajectories from. `what` prefixes messages
    (e.g. "--calib-data")."""
    path = Path(path)
    where = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise EqRError(f"{where}: no such file; pass puzzles as an .npz with 'tokens' [N, L], or record states "
                       "with `eqr calibrate EXPORT_DIR` (EXPORT_DIR/calib.npz)")
    arrays = read_npz(path, where)
    key = puzzle_key(arrays)
    if key is None:
        raise EqRError(f"{where}: has {sorted(arrays)}, needs a 'tokens' (or 'inputs') array [N, {seq_len or 'L'}]")
    tokens = _checked_tokens(arrays[key], f"{where}: '{key}'", seq_len, vocab_size)
    if ("z_H" in arrays) != ("z_L" in arrays):
        raise EqRError(f"{where}: give both 'z_H' and 'z_L' or neither")
    if "z_H" not in arrays:
        return tokens
    N, L = tokens.shape
    D = hidden_size or (arrays["z_H"].shape[-1] if arrays["z_H"].ndim == 3 else 0)
    for name in ("z_H", "z_L"):
        value = arrays[name]
        if value.shape != (N, L, D) or not np.issubdtype(value.dtype, np.floating):
            raise EqRError(f"{where}: '{name}' has shape {list(value.shape)} ({value.dtype}), expected float "
                           f"[{N}, {L}, {D}]: the states do not match this model or their tokens; record them "
                           "for this model with `eqr calibrate EXPORT_DIR`")
        if not np.isfinite(value).all():
            raise EqRError(f"{where}: '{name}' holds NaN or Inf")
    zeros = np.zeros(N, np.int32)
    for name in ("depth", "puzzle", "start"):
        if arrays.get(name, zeros).shape != (N,):
            raise EqRError(f"{where}: '{name}' has shape {list(arrays[name].shape)}, expected [{N}]")
    provenance = json.loads(str(arrays["provenance"])) if "provenance" in arrays else {}
    return CalibSet(tokens, arrays["z_H"].astype(np.float32), arrays["z_L"].astype(np.float32),
                    *(arrays.get(name, zeros).astype(np.int32) for name in ("depth", "puzzle", "start")),
                    provenance=provenance)


def load_calib(path: str | os.PathLike[str], seq_len: int | None = None, hidden_size: int | None = None) -> CalibSet:
    """Read a calib.npz that holds recorded states (see `read_calib_file`)."""
    calib = read_calib_file(path, seq_len, hidden_size)
    if not isinstance(calib, CalibSet):
        raise EqRError(f"{path}: holds puzzles but no recorded states (z_H, z_L); record them with "
                       "`eqr calibrate EXPORT_DIR`")
    return calib


def _checked_tokens(tokens: np.ndarray, where: str, seq_len: int | None, vocab_size: int | None) -> np.ndarray:
    L = seq_len or (tokens.shape[1] if tokens.ndim == 2 else "L")
    if tokens.ndim != 2 or tokens.shape[1] != L or len(tokens) == 0:
        raise EqRError(f"{where} has shape {list(tokens.shape)}, expected [N, {L}] with N >= 1")
    if not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or (vocab_size and tokens.max() >= vocab_size):
        ids = f"0..{vocab_size - 1}" if vocab_size else "(non-negative)"
        raise EqRError(f"{where} must hold integer token ids {ids}")
    return tokens.astype(np.int32)


def int8_calibration(model: "EqRModel", config: "ExportConfig") -> "Calibrate":
    """The INT8 calibration of `eqr export`: --calib-data, read and checked now (before any export
    work), then at build time its recorded states as given, or the step inputs at every depth of
    noise-free FP32 trajectories of its puzzles (or of built-in task puzzles), recorded by
    `record_fp32` on the export's FP32 graph, as `eqr calibrate` records them."""
    c = model.config
    data = read_calib_file(config.calib_data, c.seq_len, c.hidden_size, c.vocab_size, "--calib-data") \
        if config.calib_data else None

    def calibrate(fp32: "onnx.ModelProto", task: "TaskInfo", progress: Any) -> tuple[list[dict[str, np.ndarray]],
                                                                                    dict[str, Any]]:
        import tempfile

        from eqr.export.inputs import task_inputs

        if isinstance(data, CalibSet):
            progress.done(f"int8: calibrating on the {len(data)} recorded states of {config.calib_data}")
            return data.feeds(), {"source": config.calib_data, "rows": len(data), "method": "minmax"}
        # puzzles and starts unseen by the export's parity checks
        tokens = data if data is not None else task_inputs(task, model, EXPORT_CALIB_PUZZLES, config.seed + 1).numpy()
        with tempfile.TemporaryDirectory(prefix="eqr-calib-") as tmp, \
                progress.bar("int8 calibration trajectories", len(tokens)) as advance:
            path = Path(tmp) / "model.step.onnx"
            path.write_bytes(fp32.SerializeToString())
            calib, recorded_on = record_fp32(path, (c.seq_len, c.hidden_size, (c.H_init_std, c.L_init_std)), tokens,
                                             starts=1, depths=range(config.check_steps), seed=config.seed + 1,
                                             progress=advance)
        what = (f"the {len(tokens)} puzzles of {config.calib_data}" if data is not None
                else f"{len(tokens)} built-in {task.name or 'random-token'} puzzles")
        hint = "" if data is not None else ("; for real data pass --calib-data PUZZLES.npz ('tokens' [N, L]) or run "
                                            "`eqr calibrate EXPORT_DIR` after the export")
        progress.done(f"int8: calibrated on {what}, one random start each, states at depths "
                      f"0..{config.check_steps - 1} ({len(calib)} states, FP32 graph in ONNX Runtime){hint}")
        info = {"source": config.calib_data or "built-in (task inputs, random initial states)",
                "trajectories": int(len(tokens)), "depths": config.check_steps, "rows": len(calib), "method": "minmax",
                "recorded_on": recorded_on}
        return calib.feeds(), info

    return calibrate
