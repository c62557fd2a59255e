"""`build_graph`: the one builder of step graphs, driven by the PRECISIONS table.

Each precision's row names its builder (a key of `BUILDERS`, a Polygraphy-style loader) and
the precision it is built from; `eqr export` (export/exporter.py) and `eqr calibrate`
(calibration/quantize.py) both build through `build_graph`, so an FP16 or INT8 graph is the
same whichever command wrote it, given the same options.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqr.contract.artifact import PRECISIONS, graph_metadata
from eqr.contract.io import atomic_write_bytes
from eqr.export.config import DEFAULT_OPSET
from eqr.export.fp16 import FP32_OP_TYPES, Fp16FromOnnx
from eqr.export.int8 import DEFAULT_OP_TYPES, Int8FromOnnx

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """What the builders take besides their source; each builder reads its own fields."""

    opset: int = DEFAULT_OPSET  # fp32
    keep_fp32_ops: tuple[str, ...] = FP32_OP_TYPES  # fp16: op types kept FP32
    calib_feeds: Iterable[Any] | Callable[[], Iterable[Any]] | None = None  # int8: step-input feeds
    method: str = "minmax"  # int8: activation range estimator
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES  # int8: op types quantized
    exclude_nodes: tuple[str, ...] = ()  # int8: nodes kept FP32 although their op type is quantized
    percentile: float = 99.999  # int8: percentile of method "percentile"
    reduce_range: bool = False  # int8-cpu: 7-bit weights (x86 without VNNI; export/int8.py)


def _onnx_from_model(model: Any, options: BuildOptions) -> Callable[[], "onnx.ModelProto"]:
    from eqr.export.from_model import OnnxFromModel  # torch: only the FP32 build from the model needs it

    return OnnxFromModel(model, options.opset)


def _fp16_from_onnx(fp32: Any, options: BuildOptions) -> Callable[[], "onnx.ModelProto"]:
    return Fp16FromOnnx(fp32, options.keep_fp32_ops)


def _int8_from_onnx(fp32: Any, options: BuildOptions) -> Callable[[], "onnx.ModelProto"]:
    if options.calib_feeds is None:
        raise ValueError("an INT8 graph needs calibration feeds (BuildOptions.calib_feeds)")
    return Int8FromOnnx(fp32, options.calib_feeds, method=options.method, op_types=options.op_types,
                        exclude_nodes=options.exclude_nodes, percentile=options.percentile)


def _int8_cpu_from_onnx(fp32: Any, options: BuildOptions) -> Callable[[], "onnx.ModelProto"]:
    if options.calib_feeds is None:
        raise ValueError("an INT8 graph needs calibration feeds (BuildOptions.calib_feeds)")
    return Int8FromOnnx(fp32, options.calib_feeds, method=options.method, op_types=options.op_types,
                        exclude_nodes=options.exclude_nodes, percentile=options.percentile, target="cpu",
                        reduce_range=options.reduce_range)


# builder name (PRECISIONS[p].builder) -> (source, options) -> a loader that returns the graph
BUILDERS: dict[str, Callable[[Any, BuildOptions], Callable[[], "onnx.ModelProto"]]] = {
    "onnx_from_model": _onnx_from_model,
    "fp16_from_onnx": _fp16_from_onnx,
    "int8_from_onnx": _int8_from_onnx,
    "int8_cpu_from_onnx": _int8_cpu_from_onnx,
}


def build_graph(precision: str, source: Any, options: BuildOptions | None = None) -> "onnx.ModelProto":
    """The `precision` step graph from `source`: the model (a row built from None) or the graph of
    the row's `built_from` precision (a ModelProto or a loader returning one)."""
    row = PRECISIONS[precision]
    return BUILDERS[row.builder](source, options or BuildOptions())()


def write_graph(path: Path, graph: "onnx.ModelProto", manifest: dict[str, Any], precision: str) -> None:
    """Write a built graph atomically with its metadata: the manifest and its own precision
    (`graph_metadata`), so a copy of the file runs like its export directory."""
    from eqr.export.onnx_graph import set_metadata

    set_metadata(graph, graph_metadata(manifest, precision))
    atomic_write_bytes(path, graph.SerializeToString())
