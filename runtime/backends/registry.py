"""Backends registered by name; `auto` picks the best one available for an artifact.

Entries are "module:Class" strings so listing names (click.Choice) imports no optional
package: onnxruntime and TensorRT load only when their backend is created.

The `device` option (`Solver.load(..., device="cuda:1")`, `eqr solve --device`) is parsed here,
without torch: "auto", "cpu", "cuda", "cuda:N" or an index N. The torch backend takes any of
them (and says in one line when CUDA is asked for but absent); the tensorrt backend a CUDA index;
onnxruntime none (its execution provider decides), so `auto` with a device skips it.
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
# backend -> the device kinds its `device` option takes (a backend not listed takes none)
DEVICE_KINDS: dict[str, tuple[str, ...]] = {"torch": ("cpu", "cuda"), "tensorrt": ("cuda",)}


def parse_device(value: str | int | None) -> str:
    """A device spec -> "auto", "cpu", "cuda" or "cuda:N"; EqRError (one line) for anything else."""
    if value is None:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EqRError(f"device must be auto, cpu, cuda, cuda:N or an index N, got {value!r}")
    text = str(value).strip().lower()
    if text.isdigit():
        return f"cuda:{int(text)}"
    if text in (AUTO, "cpu", "cuda"):
        return text
    kind, _, index = text.partition(":")
    if kind == "cuda" and index.isdigit():
        return f"cuda:{int(index)}"
    raise EqRError(f"device must be auto, cpu, cuda, cuda:N or an index N, got {value!r}")


def device_option(name: str, device: str) -> Any:
    """The parsed `device` as backend `name` takes it (tensorrt: an int index); EqRError where it
    does not apply."""
    kinds = DEVICE_KINDS.get(name, ())
    if device == AUTO:
        return 0 if name == "tensorrt" else AUTO
    kind, _, index = device.partition(":")
    if kind not in kinds:
        takes = f"takes --device {' or '.join(kinds)}" if kinds else "picks its own device (--provider)"
        raise EqRError(f"--device {device} does not apply to the {name} backend, which {takes}")
    if name == "tensorrt":
        return int(index or 0)
    return device


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
    """The backend `name` (or the best available for `auto`) for `artifact` at `precision`.
    options["device"], when given, is parsed (`parse_device`) and passed on as the backend takes
    it; with `auto` and a device other than auto, only backends that take that device are tried."""
    device = parse_device(options.pop("device")) if "device" in options else None
    if name == AUTO:
        reasons = []
        for candidate in _BACKENDS:
            if device not in (None, AUTO) and device.partition(":")[0] not in DEVICE_KINDS.get(candidate, ()):
                reasons.append(f"{candidate}: does not run on --device {device}")
                continue
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
    if device is not None and (device != AUTO or name in DEVICE_KINDS):
        options["device"] = device_option(name, device)
    return backend_class(name).from_artifact(artifact, precision, **options)
