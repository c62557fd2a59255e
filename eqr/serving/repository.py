"""`write_repository`: an eqr export -> a self-contained Triton model repository (docs/serving.md).

    REPO/NAME/config.pbtxt      backend python, decoupled, max_batch_size 0, instance_group,
                                the eqr settings as parameters (edit them there, no rebuild)
    REPO/NAME/1/model.py        eqr/serving/triton_model.py
    REPO/NAME/1/export/         a copy of the export directory (manifest + step graphs)

The repository runs wherever Triton's Python backend finds eqr installed: the `serve` extra's
server on CPU, or NVIDIA's Triton containers (GPU servers, Jetson) with the TensorRT backend.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eqr.contract.artifact import missing_noisy_graph
from eqr.contract.errors import EqRError
from eqr.runtime.scheduler import DEFAULT_BATCH, DEFAULT_BREADTH, DEFAULT_MAX_QUEUE, DEFAULT_STREAM_EVERY
from eqr.serving.protocol import INPUTS, OUTPUTS

MODEL_FILE = Path(__file__).with_name("triton_model.py")
EXPORT_FOLDER = "export"  # inside the version folder
VERSION = "1"
SERVE_BACKENDS = ("auto", "onnxruntime", "tensorrt")
TASK_PARAMETER = "task"  # config.pbtxt: the served puzzle task, "NAME:SIZE" (read by eqr.serving.remote)


@dataclass(frozen=True)
class ServeConfig:
    """What config.pbtxt records about one served model; each field is an `eqr triton` flag."""

    name: str = "eqr"  # Triton model name (the URL's /v2/models/NAME)
    backend: str = "auto"  # eqr backend inside model.py
    precision: str = "fp32"
    batch: int = DEFAULT_BATCH  # trajectories in the scheduler's working batch
    breadth: int = DEFAULT_BREADTH  # default trajectories per puzzle (a request's `breadth` input overrides it)
    max_steps: int | None = None  # outer-step cap; None: the precision's calibrated rule's (a request may only lower it)
    agree: int | None = None  # stop a puzzle once this many trajectories agree, launching them in waves; None: off
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting beyond the working batch before "busy" errors
    instances: int = 1  # model instances (each its own stub process, scheduler and backend)
    stream_every: int = DEFAULT_STREAM_EVERY  # outer steps between provisional responses of a streaming request
    threads: int = 0  # CPU threads for onnxruntime per instance (0: its default)
    noise: float = 0.0  # default path-noise sigma (a request's `noise` input overrides it); > 0: the noisy graph

    def parameters(self) -> dict[str, str]:
        """The config.pbtxt parameters (string values; "" for None and 0 threads)."""
        return {"backend": self.backend, "precision": self.precision, "batch": str(self.batch),
                "breadth": str(self.breadth), "max_steps": str(self.max_steps or ""), "agree": str(self.agree or ""),
                "max_queue": str(self.max_queue), "stream_every": str(self.stream_every),
                "threads": str(self.threads or ""), "noise": str(self.noise)}

    @classmethod
    def from_parameters(cls, params: dict[str, str], name: str) -> "ServeConfig":
        """What `parameters` wrote (as the model reads config.pbtxt); absent or "" keeps the default.
        A parameter is text where its default is text, else a number."""
        defaults = cls()
        known = defaults.parameters()
        def value(k: str, v: str) -> Any:
            default = getattr(defaults, k)
            return v if isinstance(default, str) else float(v) if isinstance(default, float) else int(v)

        return cls(name=name, **{k: value(k, v) for k, v in params.items() if k in known and v != ""})

    def check(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise EqRError(f"--name {self.name!r}: use letters, digits, '-' and '_' only")
        if self.backend not in SERVE_BACKENDS:
            raise EqRError(f"--backend must be one of {', '.join(SERVE_BACKENDS)}, got {self.backend!r}")
        for flag, value in (("--batch", self.batch), ("--breadth", self.breadth), ("--max-steps", self.max_steps),
                            ("--max-queue", self.max_queue), ("--instances", self.instances),
                            ("--stream-every", self.stream_every), ("--agree", self.agree)):
            if value is not None and value < 1:
                raise EqRError(f"{flag} must be >= 1, got {value}")
        if self.breadth > self.batch:
            raise EqRError(f"--breadth {self.breadth} does not fit in --batch {self.batch}; raise --batch")
        if not 0 <= self.noise < float("inf"):
            raise EqRError(f"--noise must be >= 0 (sigma of the path noise; 0: none), got {self.noise}")


def write_repository(export_dir: str | os.PathLike[str], out: str | os.PathLike[str], cfg: ServeConfig,
                     force: bool = False) -> Path:
    """Write REPO/NAME (see module docstring) and return its path; EqRError for bad input."""
    from eqr.runtime.resolve import load_artifact, resolve_task

    cfg.check()
    artifact = load_artifact(export_dir)
    if artifact.kind != "export":
        raise EqRError(f"{export_dir}: not an export directory; make one with `eqr export MODEL --out DIR`")
    task = resolve_task(artifact, None)  # the text interface needs the task: fail here, not at load time
    if cfg.precision not in artifact.onnx and cfg.precision not in artifact.engines:
        have = sorted(set(artifact.onnx) | set(artifact.engines))
        raise EqRError(f"{export_dir} has no {cfg.precision} step (it has {', '.join(have)}); "
                       f"re-export with --precision {cfg.precision}")
    if cfg.noise > 0 and cfg.precision not in artifact.noisy and cfg.precision not in artifact.noisy_engines:
        raise EqRError(missing_noisy_graph(artifact, cfg.precision))
    model_dir = Path(out) / cfg.name
    if model_dir.exists() and not force:
        raise EqRError(f"{model_dir} exists; pass --force to replace it")
    Path(out).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.", dir=out))  # built aside, then swapped in
    try:
        version = staging / VERSION
        shutil.copytree(export_dir, version / EXPORT_FOLDER)
        shutil.copyfile(MODEL_FILE, version / "model.py")
        (staging / "config.pbtxt").write_text(config_pbtxt(cfg, artifact.seq_len, f"{task.name}:{task.size}"))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model_dir


def config_pbtxt(cfg: ServeConfig, seq_len: int, task: str) -> str:
    """The model configuration: decoupled Python backend, the fixed interface of docs/serving.md.
    task ("NAME:SIZE") rides along as a parameter, so a client reads the puzzle format off the server."""
    def tensors(table: tuple, optional: bool) -> str:
        rows = []
        for name, _, dtype, dims in table:
            shape = ", ".join(str(seq_len) if d == "L" else d for d in dims)
            rows.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {shape} ]'
                        + (" optional: true" if optional else "") + " }")
        return ",\n".join(rows)

    kind = "KIND_GPU" if cfg.backend == "tensorrt" else "KIND_CPU"
    parameters = "\n".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                           for k, v in (cfg.parameters() | {TASK_PARAMETER: task}).items())
    return f"""# Written by `eqr triton` (docs/serving.md). The eqr settings are the parameters below.
name: "{cfg.name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
{tensors(INPUTS, optional=True)}
]
output [
{tensors(OUTPUTS, optional=False)}
]
instance_group [ {{ count: {cfg.instances} kind: {kind} }} ]
{parameters}
"""
