"""`ExportConfig`: every choice of one export, one field per `eqr export` flag."""
from __future__ import annotations

from dataclasses import dataclass

from eqr.contract.artifact import PRECISIONS, with_cpu_variants
from eqr.contract.config import JsonConfig
from eqr.contract.errors import EqRError

ENGINE_MODES = ("auto", "always", "never")
DLA_PRECISIONS = ("fp16", "int8")  # what a DLA core computes in; an fp32 engine stays a GPU engine
# Opset 17 is where the TorchScript exporter's graph gets ONNX Runtime's RMSNorm fusion; ONNX
# Runtime's static quantizer (INT8 Q/DQ) supports opsets up to 20.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 20, 17


@dataclass(frozen=True)
class ExportConfig(JsonConfig):
    """What `eqr export` builds. Field names match the flags (`--calib-data` -> calib_data)."""

    precision: tuple[str, ...] = ("fp32",)  # graphs to write; fp32 (model.step.onnx) is always written
    batch: tuple[int, int, int] = (1, 64, 256)  # TensorRT optimization profile min/opt/max batch
    opset: int = DEFAULT_OPSET
    engine: str = "auto"  # auto: build when TensorRT and a GPU exist; always: fail without; never
    calib_data: str | None = None  # .npz of calibration inputs for INT8 (read by eqr.calibration.record)
    force: bool = False  # write into an existing output directory
    seed: int = 0  # initial states and task inputs of the checks and the calibration run
    check_batch: int = 4  # trajectories (puzzles x random starts) in the export checks
    check_steps: int = 32  # outer steps per checked (and calibration) trajectory
    workspace_mib: int = 4096  # TensorRT builder workspace limit
    threads: int = 0  # CPU threads for the checks (torch and ONNX Runtime); 0: the idle cores
    dla_core: int | None = None  # build the fp16/int8 engines for this DLA core (GPU fallback; static batch)
    noise: bool = False  # also write each precision's noisy step graph (path noise at inference; export/noisy.py)

    def __post_init__(self) -> None:
        unknown = [p for p in self.precision if p not in PRECISIONS]
        if unknown or not self.precision:
            raise EqRError(f"--precision must be among {', '.join(PRECISIONS)}, got {', '.join(unknown) or 'nothing'}")
        if self.engine not in ENGINE_MODES:
            raise EqRError(f"--engine must be one of {', '.join(ENGINE_MODES)}, got {self.engine!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise EqRError(f"--opset {self.opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} "
                           f"(>= {MIN_OPSET} for the exporter, <= {MAX_OPSET} for INT8 Q/DQ quantization)")
        if self.check_batch < 1 or self.check_steps < 1:
            raise EqRError(f"--check-batch and --check-steps must be >= 1, got {self.check_batch}, {self.check_steps}")
        if self.threads < 0:
            raise EqRError(f"--threads must be >= 0 (0 picks the idle cores), got {self.threads}")
        check_engine_options(self.precision, self.batch, self.workspace_mib, self.dla_core)
        if self.dla_core is not None and self.engine == "never":
            raise EqRError("--dla-core builds engines; it cannot go with --engine never")

    @property
    def precisions(self) -> tuple[str, ...]:
        """Graphs in build order: fp32 first (the others derive from it), each named precision's CPU
        variant with it (int8 builds int8-cpu too), no duplicates."""
        return with_cpu_variants(("fp32", *self.precision))


def check_engine_options(precisions: tuple[str, ...], batch: tuple[int, int, int], workspace_mib: int,
                         dla_core: int | None) -> None:
    """The TensorRT build flags `eqr export` and `eqr engine` share; EqRError naming the flag."""
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise EqRError(f"--batch {lo}:{opt}:{hi} must satisfy 1 <= MIN <= OPT <= MAX")
    if workspace_mib < 1:
        raise EqRError(f"--workspace-mib must be >= 1, got {workspace_mib}")
    if dla_core is None:
        return
    # DLA runs FP16 and INT8 with static shapes only (docs/jetson.md)
    if dla_core < 0:
        raise EqRError(f"--dla-core must be a DLA core index >= 0, got {dla_core}")
    if lo != hi:
        raise EqRError(f"--dla-core: DLA needs static shapes; give one batch size (--batch {opt}), not {lo}:{opt}:{hi}")
    if not set(DLA_PRECISIONS) & set(precisions):
        raise EqRError("--dla-core: DLA runs fp16 and int8 engines only; add --precision fp16 or --precision int8")


def parse_batch(text: str) -> tuple[int, int, int]:
    """'1:64:256' -> (1, 64, 256); a single 'N' means N:N:N (a static profile)."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise EqRError(f"--batch {text!r} is not MIN:OPT:MAX (e.g. 1:64:256) or a single batch size")
    return values[0], values[1], values[2]
