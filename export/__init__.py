"""eqr.export: the deployable step as ONNX (FP32/FP16/INT8) and TensorRT engines.

    from eqr.export import ExportConfig, export_model, read_manifest
    manifest = export_model(load_model("paper-sudoku"), "sudoku-eqr", ExportConfig(precision=("fp16",)))

Library functions for other modules: `convert_fp16(onnx_path, out_path, keep_fp32_ops=...)`,
`quantize_int8(onnx_path, calib_feeds, out_path, method=..., op_types=...)`, `check_engine`.
Importing this package imports neither onnx, onnxruntime nor tensorrt; they load on use.
"""
from __future__ import annotations

import importlib
from typing import Any

from eqr.export.config import ExportConfig, parse_batch
from eqr.export.step_graph import INPUT_NAMES, OUTPUT_NAMES, StepGraph

_LAZY = {
    "export_model": "eqr.export.exporter", "read_manifest": "eqr.export.exporter",
    "ExportError": "eqr.export.exporter",
    "convert_fp16": "eqr.export.fp16", "Fp16FromOnnx": "eqr.export.fp16",
    "quantize_int8": "eqr.export.int8", "Int8FromOnnx": "eqr.export.int8",
    "OnnxFromModel": "eqr.export.onnx_graph",
    "EngineFromOnnx": "eqr.export.tensorrt", "check_engine": "eqr.export.tensorrt",
    "load_engine": "eqr.export.tensorrt", "engine_filename": "eqr.export.tensorrt",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eqr.export' has no attribute {name!r}")


__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "ExportConfig", "StepGraph", "parse_batch", *_LAZY]
