"""The reference backend: eqr/model/step_graph.py's `StepGraph` run eagerly by torch.

State stays as torch tensors on the model's device; this is the semantics every other backend
is compared against. It is the runtime's one door to torch and the model: checkpoints, bundled
names and presets resolve to an `Artifact` here (`checkpoint_artifact`). fp32 only (torch CPU
half precision is ~6x slower than fp32, docs/performance.md); lower precisions run through ONNX
Runtime or TensorRT.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eqr.contract.artifact import OUTPUT_NAMES, Artifact
from eqr.contract.errors import EqRError
from eqr.model.network import EqRModel
from eqr.model.step_graph import StepGraph
from eqr.runtime.backends.base import Backend


class TorchArrays:
    """Device arrays as torch tensors on `self.device` (torch and TensorRT backends)."""

    device: torch.device

    def upload(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def download(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().cpu().numpy()

    def take(self, array: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return array.index_select(0, torch.as_tensor(rows, dtype=torch.long, device=array.device))

    def concat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays), dim=0)

    def thread_setup(self) -> Callable[[], None]:
        """torch's thread count is per thread: a new thread would use every core (~100x slower
        on a busy machine), so the worker takes the caller's."""
        threads = torch.get_num_threads()
        return lambda: torch.set_num_threads(threads)


class TorchBackend(TorchArrays, Backend):
    name = "torch"

    def __init__(self, model: EqRModel | None = None, *, loader: str | None = None,
                 device: str | torch.device = "cpu") -> None:
        """Give a model, or `loader`: anything `eqr.model.load.load_model` accepts (loaded at activate)."""
        super().__init__()
        if model is None and loader is None:
            raise ValueError("TorchBackend needs a model or a loader (checkpoint path or name)")
        self.model = model
        self.loader = loader
        self.device = torch.device(device)
        self.graph: StepGraph | None = None

    @classmethod
    def unavailable_reason(cls, artifact: "Artifact", precision: str) -> str | None:
        if precision != "fp32":
            return "the torch backend runs fp32 only; use onnxruntime or tensorrt for fp16/int8"
        if weights_of(artifact) is None:
            return "needs the model's weights (a checkpoint, bundled name or preset), not only ONNX/engine files"
        return None

    @classmethod
    def from_artifact(cls, artifact: "Artifact", precision: str, device: str = "cpu", **_: Any) -> "TorchBackend":
        return cls(loader=weights_of(artifact), device=device)

    def activate_impl(self) -> None:
        if self.model is None:
            from eqr.model.load import load_model

            self.model = load_model(self.loader)
        self.graph = StepGraph(self.model.to(self.device).eval())

    def deactivate_impl(self) -> None:
        self.graph = None
        if self.loader is not None:
            self.model = None  # loaded here, so released here

    @torch.inference_mode()
    def step_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        outputs = self.graph(feeds["tokens"], feeds["z_H"], feeds["z_L"])
        return dict(zip(OUTPUT_NAMES, outputs))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "precision": "fp32"}


def checkpoint_artifact(location: str) -> Artifact:
    """A checkpoint path, bundled name or preset as an `Artifact` (one-line EqRError for unknown names)."""
    from eqr.contract.config import PRESETS
    from eqr.model.checkpoint import read_checkpoint
    from eqr.model.load import resolve

    kind, resolved = resolve(location)
    task = None
    if kind == "preset":
        config = PRESETS[resolved][0]
    else:
        ckpt = read_checkpoint(resolved)
        config = ckpt.config
        task = ckpt.metadata.get("task") if isinstance(ckpt.metadata, dict) else None
    return Artifact(kind="checkpoint", location=location, seq_len=config.seq_len, hidden_size=config.hidden_size,
                    vocab_size=config.vocab_size, init_std=(config.H_init_std, config.L_init_std), config=config,
                    task=task if isinstance(task, dict) else None, checkpoint=location)


def weights_of(artifact: Artifact) -> str | None:
    """The checkpoint an artifact runs from: its own, or the one an export came from while it is
    still here unchanged (then the torch backend can run an export too)."""
    if artifact.checkpoint is not None:
        return artifact.checkpoint
    source = artifact.source
    if not source or source.get("kind") in (None, "init") or not source.get("location"):
        return None
    from eqr.contract.io import sha256_file
    from eqr.model.load import resolve

    try:
        _, resolved = resolve(source["location"])
    except EqRError:
        return None
    if source.get("sha256") and Path(resolved).is_file() and sha256_file(resolved) != source["sha256"]:
        return None  # the file changed since the export: it is not these weights any more
    return str(source["location"])
