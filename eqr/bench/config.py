"""`BenchConfig` (one `eqr bench` run, every field a flag) and the constants the measurements share."""
from __future__ import annotations

from dataclasses import dataclass

from eqr.contract.errors import EqRError

# The bundled models where puzzle difficulty varies, preferred in this order (sudoku-6x6: hard
# puzzles need depth and breadth); then any bundled model, then FALLBACK_MODEL.
DEFAULT_MODELS = ("sudoku-6x6", "maze-small")
FALLBACK_MODEL = "cpu-sudoku-4x4"  # a preset (fresh weights) used until bundled models exist
PAPER_MODEL = "paper-sudoku"
PAPER_HIDDEN = 512  # step_efficiency's goal is defined at this width (the paper's model)
EFFICIENCY_BATCHES = (1, 16, 64)
MEMORY_BATCHES = (64, 256)
SIDE_BY_SIDE_ROUNDS = 4  # reference and runtime alternate over this many slices of the puzzle set
MAX_FIXED_DEPTH = 64  # adaptive_steps extends the reference's fixed depths up to this
GEMM_SIZE = 1024
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# measured on one side-by-side run: with --backend torch they need no ONNX export
SIDE_BY_SIDE = ("reference_vs_runtime", "adaptive_steps", "host_overhead")
# Goals (docs/performance.md): (comparison, threshold).
GOALS: dict[str, tuple[str, float]] = {
    "reference_vs_runtime": (">=", 3.0), "adaptive_steps": ("<=", 0.35), "continuous_vs_static": (">=", 1.5),
    "host_overhead": ("<=", 0.05), "step_efficiency": (">=", 0.75), "serving_vs_inprocess": (">=", 0.8),
    "int8_speedup": (">=", 2.0),  # at batch 64; batch 1's goal is eqr.bench.int8.BATCH_1_GOAL
    "frontier_vs_official": (">=", 2.0),  # at breadth 8; by breadth: eqr.bench.official.GOAL_BY_BREADTH
}


@dataclass(frozen=True)
class BenchConfig:
    """One `eqr bench` run; every field is a flag."""

    model: str  # bundled name, checkpoint or preset
    measurements: tuple[str, ...]  # names in eqr.bench.table.MEASURE, in run order
    puzzles: int = 128  # the mixed set of every measurement (eqr.bench.setting.mixed_puzzles)
    breadth: int = 4  # K trajectories per puzzle (both sides)
    depth: int = 16  # D: the official protocol's fixed depth
    batch_size: int = 64  # working batch (trajectories) of the runtime, the scheduler and static batches
    stream: int = 256  # puzzles in the continuous_vs_static stream (breadth 1)
    backend: str = "onnxruntime"  # the runtime side's backend
    device: str = "cpu"  # --backend torch: the device of the runtime side and of the reference (cuda on a GPU)
    # The runtime's stopping rule: None takes the export's calibrated rule (`eqr calibrate`), else
    # the bench fits one on `rule_puzzles` labelled puzzles (eqr.calibration.stopping).
    max_steps: int | None = None
    tol: float | None = None
    patience: int | None = None
    window: int | None = None  # 0: off
    rule_puzzles: int = 256  # as eqr calibrate's; fewer let rules that lose a point at breadth 8 through
    threads: int = 1  # torch, ONNX Runtime and the GEMM peaks all use this many threads
    seed: int = 0
    reference_noise: float | None = None  # path noise of the reference; None: the model's sigma (official)
    noise: float = 0.0  # path noise of the runtime side (SolveConfig.noise; > 0 exports the noisy graph)
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")  # exported; step_efficiency times each
    cascade: str = "int8+fp32"  # cascade_vs_fp32's cascade
    export_dir: str | None = None  # reuse an export of the model instead of exporting to a temp dir
    paper: bool = False  # reference_vs_runtime only, on paper-sudoku with random weights

    def __post_init__(self) -> None:
        for name in ("puzzles", "breadth", "depth", "batch_size", "stream", "threads", "rule_puzzles"):
            if getattr(self, name) < 1:
                flag = "batch" if name == "batch_size" else name.replace("_", "-")
                raise EqRError(f"--{flag} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EqRError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.device != "cpu" and self.backend != "torch":
            raise EqRError(f"--device {self.device} goes with --backend torch (the {self.backend} side picks its own)")
        if not 0 <= self.noise < float("inf"):
            raise EqRError(f"--noise must be >= 0 (sigma of the runtime's path noise; 0: none), got {self.noise}")
        if self.batch_size < self.breadth:
            raise EqRError(f"--batch {self.batch_size} must hold one puzzle's --breadth {self.breadth} rows")

    def rule_overrides(self) -> dict[str, object]:
        """The stopping-rule fields given as flags (they override the calibrated rule)."""
        given = {"max_steps": self.max_steps, "tol": self.tol, "patience": self.patience, "noise": self.noise or None}
        overrides = {k: v for k, v in given.items() if v is not None}
        if self.window is not None:
            overrides["window"] = self.window or None
        return overrides
