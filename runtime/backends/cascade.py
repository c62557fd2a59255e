"""A precision cascade as one backend: rows step at low precision until their residual reaches its
floor, then at high precision (mixed-precision iterative refinement, docs/algorithm.md).

Both precisions compute the same map, so they share its attractor: the cheap steps do the
travelling and the exact steps the landing. The loop (`eqr.runtime.loop`) decides when a row
switches and says so with `route(stage)` before each step; this backend only runs the rows of
each stage on its own inner backend. The two inner backends must share device arrays (two ONNX
Runtime sessions on one provider, say), so the state moves between them without leaving the
device: the split and the merge are the inner backends' own gather/concat.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eqr.contract.artifact import OUTPUT_NAMES
from eqr.contract.errors import EqRError
from eqr.runtime.backends.base import Backend


class CascadeBackend(Backend):
    """Stage 0 rows run on `low`, stage 1 rows on `high`; arrays are `high`'s (the same kind as `low`'s)."""

    name = "cascade"

    def __init__(self, low: Backend, high: Backend, precision: str) -> None:
        super().__init__()
        if low.name != high.name:
            raise EqRError(f"a precision cascade needs one backend for both stages, got {low.name} and {high.name}")
        self.low, self.high = low, high
        self.precision = precision  # e.g. "int8+fp32"
        self.stages = 2
        self._stage: np.ndarray | None = None

    def activate_impl(self) -> None:
        for inner in (self.low, self.high):
            if not inner.is_active:
                inner.activate()
        if self.low.static_shapes or self.high.static_shapes:
            raise EqRError(f"the {self.low.name} backend runs static shapes (CUDA-graph replay); a precision cascade "
                           "needs dynamic batches: pass --backend onnxruntime or a single precision")
        devices = {inner.describe().get("device") for inner in (self.low, self.high)}
        if len(devices) > 1:
            raise EqRError(f"the cascade's stages run on different devices ({', '.join(map(str, devices))}); "
                           "the state must stay on one device")
        self.max_batch = min((b for b in (self.low.max_batch, self.high.max_batch) if b is not None), default=None)

    def deactivate_impl(self) -> None:
        for inner in (self.low, self.high):
            inner.deactivate()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.low.name, "precision": self.precision,
                "stages": [self.low.describe(), self.high.describe()]}

    def route(self, stage: np.ndarray) -> None:
        self._stage = np.asarray(stage)

    def step_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        stage = self._stage
        if stage is None or not (stage == 0).any():
            return self.high.step(feeds)
        if (stage == 0).all():
            self.high.synchronize()  # the feeds were gathered/concatenated on high's stream, low has its own
            return self.low.step(feeds)
        low, high = np.flatnonzero(stage == 0), np.flatnonzero(stage == 1)
        low_feeds = {k: self.take(v, low) for k, v in feeds.items()}
        self.high.synchronize()
        a = self.low.step(low_feeds)
        b = self.high.step({k: self.take(v, high) for k, v in feeds.items()})
        back = np.argsort(np.concatenate([low, high]))  # merged position -> batch row
        return {name: self.take(self.concat([a[name], b[name]]), back) for name in OUTPUT_NAMES}

    # ------------------------------------------------------------------ device arrays (the high stage's)
    def upload(self, array: np.ndarray) -> Any:
        return self.high.upload(array)

    def download(self, array: Any) -> np.ndarray:
        return self.high.download(array)

    def take(self, array: Any, rows: np.ndarray) -> Any:
        return self.high.take(array, rows)

    def concat(self, arrays: Sequence[Any]) -> Any:
        return self.high.concat(arrays)
