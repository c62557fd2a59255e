"""Backends registered by name; `auto` picks the best one available for an artifact.

Entries are "module:Class" strings so listing names (click.Choice) imports no optional
package: onnxruntime and TensorRT load only when their backend is created.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from eqr.contract.errors import EqRError, missing_extra

if TYPE_CHECKING:
    from eqr.contract.artifact import Artifact
    from eqr.runtime.backends.base import Backend

# Preference order for `auto`: native TensorRT, then ONNX Runtime (its best provider), then torch.
_BACKENDS: dict[str, str] = {
    "tensorrt": "eqr.runtime.backends.trt_backend:TensorRTBackend",
    "onnxruntime": "eqr.runtime.backends.ort_backend:OrtBackend",
    "torch": "eqr.runtime.backends.torch_backend:TorchBackend",
}
AUTO = "auto"


def register_backend(name: str, target: str) -> None:
    """Add a backend: `target` is "module:Class" of a `Backend` subclass with `from_artifact`."""
    _BACKENDS[name] = target


def backend_names() -> list[str]:
    return list(_BACKENDS)


def backend_class(name: str) -> type["Backend"]:
    try:
        target = _BACKENDS[name]
    except KeyError:
        raise EqRError(f"unknown backend {name!r}; choose one of: {', '.join([AUTO, *_BACKENDS])}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def unavailable_reason(name: str, artifact: "Artifact", precision: str) -> str | None:
    """None when backend `name` can run `artifact` at `precision`, else why not (one line)."""
    try:
        cls = backend_class(name)
    except ImportError as e:  # the backend's module needs a package that is not installed
        missing = missing_extra(e, f"the {name} backend")
        if missing is None:
            raise
        return str(missing)
    return cls.unavailable_reason(artifact, precision)


def create_backend(name: str, artifact: "Artifact", precision: str, **options: Any) -> "Backend":
    """The backend `name` (or the best available for `auto`) for `artifact` at `precision`."""
    if name == AUTO:
        reasons = []
        for candidate in _BACKENDS:
            reason = unavailable_reason(candidate, artifact, precision)
            if reason is None:
                name = candidate
                break
            reasons.append(f"{candidate}: {reason}")
        else:
            raise EqRError(f"no backend can run {artifact.location} at {precision} ({'; '.join(reasons)})")
    reason = unavailable_reason(name, artifact, precision)
    if reason is not None:
        raise EqRError(f"backend {name} cannot run {artifact.location} at {precision}: {reason}")
    return backend_class(name).from_artifact(artifact, precision, **options)
