"""The one user-facing error type: its message is a single line saying what, where and how to fix."""
from __future__ import annotations

from collections.abc import Mapping


class EqRError(Exception):
    """An error caused by user input (a path, a flag, a file). The CLI prints it as one line, exit 2."""

    exit_code = 2


class CheckpointError(EqRError):
    """A checkpoint file that is missing, malformed, unsafe or does not fit the model."""


# Optional packages -> the smallest pyproject extra that installs them (`pip install 'eqr[EXTRA]'`).
# `pip install eqr` is the runtime alone: numpy, click and onnx (reading step graphs), no engine.
# calibrate: the graph tools of `eqr calibrate` and `eqr report`, no torch (export includes it).
EXTRAS = {"torch": "export", "polygraphy": "export", "onnx_graphsurgeon": "calibrate", "matplotlib": "calibrate",
          "jinja2": "calibrate", "onnxruntime": "cpu", "tensorrt": "tensorrt", "cuda": "tensorrt",  # cuda: cuda-python
          "tritonclient": "serve", "pytriton": "serve"}


class RequestError(EqRError):
    """A request a Scheduler cannot serve (it does not fit, or the model is not ready): the
    request's own error, not a fault of the backend on its puzzles."""


class NotReady(RequestError):
    """A Scheduler that stopped serving after repeated backend faults (docs/serving.md)."""


class MissingExtra(EqRError):
    """An optional package is not installed; the message names the extra that brings it."""

    def __init__(self, message: str, extra: str) -> None:
        super().__init__(message)
        self.extra = extra

    @property
    def extra_hint(self) -> str:
        return f"needs pip install 'eqr[{self.extra}]'"


def missing_extra(error: ImportError, needed_for: str = "this",
                  instead: Mapping[str, str] | None = None) -> MissingExtra | None:
    """The one-line error for an ImportError of an optional package (None for any other ImportError).
    instead: the package's extra -> the extra to name (a command's own, which includes it: `eqr
    export` names eqr[export] for a graph tool, not eqr[calibrate])."""
    top = (error.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    extra = (instead or {}).get(EXTRAS[top], EXTRAS[top])
    hint = " (or eqr[gpu], onnxruntime-gpu, on a CUDA machine; never both)" if top == "onnxruntime" else ""
    return MissingExtra(f"{needed_for} needs {top}, which is not installed: pip install 'eqr[{extra}]'{hint}", extra)
