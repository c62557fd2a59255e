"""`Backend`: a Polygraphy-style runner for the deployable step (the I/O contract of eqr.contract.artifact).

A backend runs one outer step on a batch: `step(feeds) -> outputs`, both keyed by the ONNX names
(`STEP_FEEDS`, `OUTPUT_NAMES`); the graph's fourth input, `done`, is the backend's own: static-shape
backends feed the mask `freeze` set, the others all False. A backend with `noise_shape` also takes
`NOISE_INPUT` (path noise, float32 [B, U, L, D]); a step fed it runs the noisy step graph.
Values are the backend's own device arrays (torch tensors, ONNX Runtime OrtValues, CUDA
buffers); the loop moves data only through the array helpers below, so the full state never
visits the host inside the loop: per step it downloads O(B) scalars and the O(B*L) predictions
(and uploads the noise of a noisy step).

Buffer rule (as Polygraphy's `BaseRunner.infer`): outputs may live in buffers the backend
reuses. The state outputs of step t stay valid until step t + 2 (ping-pong), so a loop may feed
them straight back, but must not keep them longer.

Subclasses override `activate_impl`, `step_impl`, `deactivate_impl` and the array helpers; the
base class checks activation and feed names and times each step.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from eqr.contract.artifact import NOISE_INPUT, OUTPUT_NAMES, STATE_OUTPUTS, STEP_FEEDS

log = logging.getLogger(__name__)

STATE_NAMES = tuple(STATE_OUTPUTS)


class Backend(ABC):
    """Runs one outer step; a context manager (`with backend:` activates and deactivates)."""

    name: ClassVar[str] = "base"

    def __init__(self) -> None:
        self.is_active = False
        self.inference_time: float | None = None  # seconds of the last `step`
        # True when the batch shape must stay fixed (CUDA-graph replay): the loop then freezes
        # settled rows with `freeze` and refills slots with `put` instead of compacting.
        self.static_shapes = False
        # Largest batch the backend runs (an engine's profile max), known after activate();
        # with static_shapes it is THE batch size. None: no limit.
        self.max_batch: int | None = None
        # 2 for a precision cascade (runtime/backends/cascade.py): the loop calls `route` before each step.
        self.stages = 1
        # (U, L, D) of the noisy step graph's NOISE_INPUT when this backend can run noisy steps
        # (the loop then feeds it on steps with path noise); None: noise-free steps only.
        self.noise_shape: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ lifecycle
    def activate(self) -> "Backend":
        if self.is_active:
            log.warning("%s backend is already active; activate() ignored", self.name)
            return self
        self.activate_impl()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def __enter__(self) -> "Backend":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def __del__(self) -> None:
        if getattr(self, "is_active", False):
            log.warning("%s backend was never deactivated; use `with backend:` or call deactivate()", self.name)

    # ------------------------------------------------------------------ the step
    def step(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """One outer step on the batch in `feeds` -> the seven contract outputs (device arrays)."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} backend is not active; call activate() or use `with backend:`")
        if set(feeds) - {NOISE_INPUT} != set(STEP_FEEDS):
            raise ValueError(f"step feeds must be exactly {', '.join(STEP_FEEDS)} (and {NOISE_INPUT} for a noisy "
                             f"step); got {', '.join(sorted(feeds))}")
        if NOISE_INPUT in feeds and self.noise_shape is None:
            raise ValueError(f"the {self.name} backend has no noisy step graph; it cannot take a {NOISE_INPUT} feed")
        start = time.perf_counter()
        outputs = self.step_impl(feeds)
        self.inference_time = time.perf_counter() - start
        missing = set(OUTPUT_NAMES) - set(outputs)
        if missing:
            raise RuntimeError(f"{self.name} backend did not return {', '.join(sorted(missing))}")
        return outputs

    def last_inference_time(self) -> float | None:
        return self.inference_time

    def describe(self) -> dict[str, Any]:
        """JSON-able description for reports: backend name plus backend-specific details."""
        return {"backend": self.name}

    def thread_setup(self) -> Callable[[], None]:
        """Called in the caller's thread: a function that gives another thread (a scheduler's
        worker) the caller's per-thread settings. Only engines with such settings override it."""
        return lambda: None

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def step_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]: ...

    def deactivate_impl(self) -> None:
        pass

    # ------------------------------------------------------------------ device arrays
    @abstractmethod
    def upload(self, array: np.ndarray) -> Any:
        """Host array -> device array (tokens as int32, states as float32)."""

    @abstractmethod
    def download(self, array: Any) -> np.ndarray:
        """Device array -> host numpy copy (used only for O(B) and O(B*L) outputs in the loop)."""

    @abstractmethod
    def take(self, array: Any, rows: np.ndarray) -> Any:
        """Rows `rows` (int64 [R]) of a device array along axis 0, as a new device array."""

    @abstractmethod
    def concat(self, arrays: Sequence[Any]) -> Any:
        """Device arrays joined along axis 0."""

    def put(self, array: Any, rows: np.ndarray, values: Any) -> Any:
        """Write `values` into rows `rows` of `array` (static-shape backends); returns the array."""
        raise NotImplementedError(f"{self.name} backend has dynamic shapes; the loop compacts instead")

    def route(self, stage: np.ndarray) -> None:
        """Two-stage backends: row b of the next step runs stage[b] (0 low, 1 high precision)."""
        raise NotImplementedError(f"{self.name} backend has one stage")

    def synchronize(self) -> None:
        """Wait until the device work this backend queued (gathers, concats, uploads) is done.
        Backends whose array ops finish before they return need nothing."""

    def freeze(self, done: np.ndarray) -> None:
        """Static-shape backends: rows with done[b] keep their state unchanged from now on."""
        raise NotImplementedError(f"{self.name} backend has dynamic shapes; the loop compacts instead")


def backend_info(backend: Any) -> dict[str, Any]:
    """What ran the steps, from the active backend: name, precision, device and provider(s) or
    TensorRT version (file paths left out)."""
    return {k: v for k, v in backend.describe().items() if k not in ("onnx", "engine")}


def describe_run(info: dict[str, Any] | None) -> str:
    """'onnxruntime (CPUExecutionProvider)', 'tensorrt 10.3 on NVIDIA Orin', 'torch on cpu'."""
    if not info:
        return "no backend (nothing to solve)"
    name = info.get("backend", "?")
    if info.get("providers"):
        return f"{name} ({', '.join(info['providers'])})"
    if info.get("tensorrt"):
        return f"{name} {info['tensorrt']} on {info.get('gpu') or info.get('device')}"
    return f"{name} on {info.get('device', '?')}"
