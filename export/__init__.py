"""eqr.export: the deployable step as ONNX (FP32/FP16/INT8) and TensorRT engines.

    from eqr.export import ExportConfig, export_model
    manifest = export_model(load_model("paper-sudoku"), "sudoku-eqr", ExportConfig(precision=("fp16",)))

What an export directory holds (file names, manifest, I/O names, tolerance rule) is
`eqr.contract.artifact`. Library functions for other modules: `build_graph(precision, source,
BuildOptions(...))`, the one builder of FP32/FP16/INT8 step graphs (eqr.export.build), and
`check_engine`. Importing this package imports neither torch, onnx, onnxruntime nor tensorrt;
they load on use.
"""
from __future__ import annotations

import importlib
from typing import Any

from eqr.export.config import ExportConfig, parse_batch

_LAZY = {
    "export_model": "eqr.export.exporter", "ExportError": "eqr.export.exporter",
    "build_graph": "eqr.export.build", "BuildOptions": "eqr.export.build", "Fp16FromOnnx": "eqr.export.fp16",
    "quantize_int8": "eqr.export.int8", "Int8FromOnnx": "eqr.export.int8",
    "OnnxFromModel": "eqr.export.from_model",
    "EngineFromOnnx": "eqr.export.tensorrt", "check_engine": "eqr.export.tensorrt",
    "load_engine": "eqr.export.tensorrt",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eqr.export' has no attribute {name!r}")


__all__ = ["ExportConfig", "parse_batch", *_LAZY]
