"""`CalibConfig` (what `eqr calibrate` records and builds) and `ReportConfig` (what `eqr report`
runs and how it judges). Frozen, saved as JSON beside their outputs; fields map 1:1 to flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from eqr.contract.artifact import BASE_PRECISIONS, CASCADES, PRECISIONS
from eqr.contract.config import JsonConfig
from eqr.contract.errors import EqRError
from eqr.export.int8 import CALIBRATION_METHODS, DEFAULT_OP_TYPES
from eqr.runtime.metrics import DEFAULT_TOP_K

# Geometric depths from the random start to (near) the fixed point.
DEFAULT_DEPTHS = (1, 2, 4, 8, 16, 32)
# Default accuracy budget: FP16 within 0.5 points of FP32, INT8 within 2.
DEFAULT_MAX_DROP = {"fp32": 0.5, "fp16": 0.5, "int8": 2.0, "int8-cpu": 2.0}  # fp32: other backends vs the reference
# Relative finite-difference step of the contraction estimate: far above each precision's
# round-off (an INT8 step is piecewise constant below its quantization scale).
DEFAULT_FD_EPS = {"fp32": 1e-3, "fp16": 1e-2, "int8": 5e-2, "int8-cpu": 5e-2}


@dataclass(frozen=True)
class CalibConfig(JsonConfig):
    """Trajectory-aware calibration: P puzzles x K random starts, states recorded at `depths`."""

    puzzles: int = 16  # puzzles of the model's task (generated unless --data is given)
    starts: int = 4  # random initial states per puzzle (seeded by (seed, puzzle, start))
    depths: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)  # step inputs recorded after this many steps
    seed: int = 0  # puzzles (when generated) and initial states
    method: str = "minmax"  # INT8 activation range estimator
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES  # ops whose weights and input activations are INT8
    exclude_nodes: tuple[str, ...] = ()  # node names kept in FP32 even if their op type is quantized
    percentile: float = 99.999  # for method "percentile"
    keep_fp32_ops: tuple[str, ...] | None = None  # FP16: op types kept in FP32 (None: export's list)
    reduce_range: bool = False  # int8-cpu: 7-bit weights, for x86 CPUs without VNNI (export/int8.py)
    precisions: tuple[str, ...] = ("fp16", "int8")  # graphs to build (int8 brings int8-cpu along)
    force: bool = False  # replace existing precision files / calib.npz
    rule_puzzles: int = 256  # labelled puzzles the stopping rules are fitted (half) and measured (half) on; 0: none
    rule_steps: int = 32  # fixed depth of the recorded trajectories the rules are replayed on
    rule_margin: float = 1.0  # accuracy points a rule may lose against the best fixed depth
    rule_breadth: int = 1  # trajectories per rule puzzle: a rule is judged on the answer `converged` picks of them

    def __post_init__(self) -> None:
        _freeze_tuples(self)
        if self.method not in CALIBRATION_METHODS:
            raise EqRError(f"--method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}")
        if self.puzzles < 1 or self.starts < 1:
            raise EqRError(f"--puzzles and --starts must be >= 1, got {self.puzzles}, {self.starts}")
        if not self.depths or min(self.depths) < 0:
            raise EqRError(f"--depths must be non-negative step counts, got {self.depths}")
        unknown = [p for p in self.precisions if p not in ("fp16", "int8", "int8-cpu")]
        if unknown:
            raise EqRError(f"--precision builds fp16, int8 and/or int8-cpu, got {', '.join(unknown)}")
        if not self.op_types:
            raise EqRError("--op-types must name at least one op type (e.g. MatMul)")
        if not 0 < self.percentile <= 100:
            raise EqRError(f"--percentile must be in (0, 100], got {self.percentile}")
        if self.rule_puzzles < 0 or self.rule_puzzles == 1 or self.rule_steps < 2 or self.rule_margin < 0:
            raise EqRError("--rule-puzzles must be 0 or >= 2, --rule-steps >= 2 and --rule-margin >= 0, got "
                           f"{self.rule_puzzles}, {self.rule_steps}, {self.rule_margin}")
        if self.rule_breadth < 1:
            raise EqRError(f"--rule-breadth must be >= 1, got {self.rule_breadth}")

    @property
    def max_depth(self) -> int:
        return max(self.depths)


@dataclass(frozen=True)
class ReportConfig(JsonConfig):
    """What `eqr report` runs (every precision x backend on the same puzzles and seeds) and judges."""

    precisions: tuple[str, ...] = BASE_PRECISIONS
    backends: tuple[str, ...] = ("onnxruntime", "torch")  # torch runs fp32 only; pairs it cannot run are skipped
    depths: tuple[int, ...] = DEFAULT_DEPTHS  # fixed-depth accuracy curve
    breadth: tuple[int, ...] = (1, 8)  # K trajectories per puzzle (vote and converged aggregation)
    puzzles: int = 64  # --generate N
    seed: int = 0  # puzzles (when generated) and initial states: identical for every run
    max_steps: int = 64  # cap of the gated (tolerance) runs; length of the ungated floor run
    max_drop: float | None = None  # points below FP32; None: DEFAULT_MAX_DROP per precision
    min_agreement: float = 0.95  # fraction of puzzles whose answer equals FP32's
    reference: str = "torch-fp32"  # run the others are compared with (falls back to onnxruntime-fp32)
    calib_samples: int = 64  # calibration states per depth used for the per-step state error
    power_iters: int = 12  # power-iteration steps of the spectral-radius estimate
    contraction_samples: int = 8  # settled states the spectral radius is estimated on
    fd_eps: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FD_EPS))
    cascades: tuple[str, ...] | None = None  # low+high cascades to run (gated only); None: every one buildable
    latency_batches: tuple[int, ...] = (1, 16, 64)  # batches the step latency is timed at
    top_k: int = DEFAULT_TOP_K  # trajectories of the official convergence top-k metrics (breadth > 1)
    noise: float = 0.0  # path-noise sigma of every solve (SolveConfig.noise); runs without a noisy graph are skipped

    def __post_init__(self) -> None:
        _freeze_tuples(self)
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise EqRError(f"--precision must be among {', '.join(PRECISIONS)}, got {', '.join(unknown) or 'none'}")
        if not self.depths or min(self.depths) < 1:
            raise EqRError(f"--depths must be step counts >= 1, got {self.depths}")
        if not self.breadth or min(self.breadth) < 1:
            raise EqRError(f"--breadth must be >= 1, got {self.breadth}")
        if self.puzzles < 1 or self.max_steps < 1 or self.power_iters < 1:
            raise EqRError("--generate, --max-steps and power_iters must be >= 1")
        if not 0 <= self.min_agreement <= 1:
            raise EqRError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")
        if self.cascades is not None and set(self.cascades) - set(CASCADES):
            raise EqRError(f"cascades must be among {', '.join(CASCADES)}, got {', '.join(self.cascades)}")
        if self.max_drop is not None and self.max_drop < 0:
            raise EqRError(f"--max-drop must be >= 0 points, got {self.max_drop}")
        if self.top_k < 1:
            raise EqRError(f"--top-k must be >= 1, got {self.top_k}")
        if not 0 <= self.noise < float("inf"):
            raise EqRError(f"--noise must be >= 0 (sigma of the path noise; 0: none), got {self.noise}")

    def drop_limit(self, precision: str) -> float:
        """Accuracy points `precision` (a cascade: its low stage) may lose against FP32 before the report fails."""
        if self.max_drop is not None:
            return self.max_drop
        return DEFAULT_MAX_DROP.get(precision.split("+")[0], 0.0)


def _freeze_tuples(obj: Any) -> None:
    """JSON round trips turn tuples into lists; store tuples so configs compare equal."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list):
            object.__setattr__(obj, f.name, tuple(value))


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); one-line EqRError otherwise."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise EqRError(f"{what} {text!r} is not a comma-separated list of integers (e.g. 1,2,4,8)")
    return values
