"""Precision graphs for an export dir: the INT8 quantization policy, its methods, FP16.

The INT8 graph is explicit symmetric Q/DQ (ONNX Runtime's static quantizer in QDQ format via
`eqr.export.build.build_graph`, the builder `eqr export` uses too: INT8 weights per output channel, INT8 activations, opset <= 20).
Which ops are quantized is a policy (`QuantPolicy`): by default only MatMul/Gemm weights and
their input activations; residual adds, damping, norms, the state path and the outputs stay
FP32 (quantizing every op was slower and 6-16% off after 100 steps on a toy block).

ONNX Runtime ignores bin settings of the entropy/percentile calibrators unless passed the
right way (entropy once gave exactly the MinMax scales; docs/formats.md#precision-graphs), so every non-MinMax
build is checked against a MinMax build of the same data: `scale_change` says how much the
method really moved the activation scales.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from eqr.contract.artifact import PRECISIONS
from eqr.export.int8 import DEFAULT_OP_TYPES

if TYPE_CHECKING:
    import onnx

    from eqr.calibration.record import CalibSet

log = logging.getLogger(__name__)

ROWS_PER_FEED = 16  # calibration rows per ONNX Runtime call


@dataclass(frozen=True)
class QuantPolicy:
    """Which ops are INT8 and how their activation ranges are estimated."""

    method: str = "minmax"  # one of CALIBRATION_METHODS
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()  # kept FP32 although their op type is quantized
    percentile: float = 99.999
    reduce_range: bool = False  # int8-cpu only: 7-bit weights (x86 without VNNI)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- builds


def build_fp16(fp32: "onnx.ModelProto", keep_fp32_ops: Iterable[str] | None = None) -> tuple["onnx.ModelProto", dict[str, Any]]:
    """The FP16 graph of an export's FP32 graph -> (graph, its manifest entry); nothing written."""
    from eqr.export.build import BuildOptions, build_graph
    from eqr.export.fp16 import FP32_OP_TYPES

    kept = tuple(FP32_OP_TYPES if keep_fp32_ops is None else keep_fp32_ops)
    graph = build_graph("fp16", fp32, BuildOptions(keep_fp32_ops=kept))
    return graph, {"onnx": PRECISIONS["fp16"].onnx, "keep_fp32_ops": list(kept)}


def build_int8(fp32: "onnx.ModelProto", calib: "CalibSet", policy: QuantPolicy,
               precision: str = "int8") -> tuple["onnx.ModelProto", dict[str, Any]]:
    """The INT8 graph (`precision` int8: TensorRT's; int8-cpu: ONNX Runtime CPU's integer kernels)
    calibrated on `calib` -> (graph, its manifest entry); nothing written.

    For entropy/percentile the entry also records `scale_change` against MinMax on the same data;
    int8-cpu records `integer_ops`, what ONNX Runtime's CPU provider made of its products.
    """
    from eqr.export.int8 import quantized_ops, weight_matmuls_on_integer_kernels

    graph = _quantize(fp32, calib, policy, precision)
    entry: dict[str, Any] = {"onnx": PRECISIONS[precision].onnx, "policy": policy.to_dict(),
                             "quantized_ops": quantized_ops(graph), "calibration_states": len(calib)}
    if precision == "int8-cpu":
        entry["integer_ops"] = weight_matmuls_on_integer_kernels(graph)
    if policy.method != "minmax":
        reference = _quantize(fp32, calib, QuantPolicy("minmax", policy.op_types, policy.exclude_nodes,
                                                       reduce_range=policy.reduce_range), precision)
        change = scale_change(activation_scales(reference), activation_scales(graph))
        entry["scale_change_vs_minmax"] = change
        if change["changed_fraction"] == 0:
            log.warning("calibration method %s produced exactly the MinMax scales", policy.method)
    return graph, entry


def _quantize(fp32: "onnx.ModelProto", calib: "CalibSet", policy: QuantPolicy,
              precision: str = "int8") -> "onnx.ModelProto":
    """FP32 graph -> QDQ graph (int8: S8S8; int8-cpu: U8S8), activation ranges from `calib` by `policy.method`."""
    from eqr.export.build import BuildOptions, build_graph

    options = BuildOptions(calib_feeds=lambda: calib.feeds(ROWS_PER_FEED), method=policy.method,
                           op_types=policy.op_types, exclude_nodes=policy.exclude_nodes, percentile=policy.percentile,
                           reduce_range=policy.reduce_range)
    return build_graph(precision, fp32, options)


# --------------------------------------------------------------------------- scales


def activation_scales(model: "onnx.ModelProto") -> dict[str, float]:
    """Quantized activation tensor name -> its scale (QuantizeLinear nodes on non-constant inputs)."""
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    constants |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                  if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    scales = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants and node.input[1] in constants:
            scales[node.input[0]] = float(np.asarray(constants[node.input[1]]).reshape(-1)[0])
    return scales


def scale_change(reference: dict[str, float], scales: dict[str, float]) -> dict[str, Any]:
    """How far `scales` moved from `reference` on the tensors both quantize."""
    common = sorted(set(reference) & set(scales))
    ratios = np.array([scales[k] / reference[k] for k in common if reference[k] > 0], np.float64)
    if ratios.size == 0:
        return {"tensors": 0, "changed_fraction": 0.0, "median_ratio": 1.0, "min_ratio": 1.0, "max_ratio": 1.0}
    changed = np.abs(ratios - 1.0) > 1e-6
    return {"tensors": int(ratios.size), "changed_fraction": float(changed.mean()),
            "median_ratio": float(np.median(ratios)), "min_ratio": float(ratios.min()),
            "max_ratio": float(ratios.max())}


# --------------------------------------------------------------------------- diagnosis


def activation_errors(int8_path: str | os.PathLike[str], calib: "CalibSet", limit: int = 10) -> list[dict[str, Any]]:
    """Which quantized activations lose most: relative error ||DQ(Q(x)) - x|| / ||x|| per Q/DQ pair
    on the calibration states, with the nodes that read it, worst first (at most `limit`)."""
    import onnx

    from eqr.export.onnx_graph import session

    model = onnx.load(str(int8_path))
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name or node.op_type)
    pairs = []  # (source activation, its dequantized copy)
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in _graph_values(model):
            continue
        for dq in model.graph.node:
            if dq.op_type == "DequantizeLinear" and dq.input[0] == q.output[0]:
                pairs.append((q.input[0], dq.output[0]))
    if not pairs:
        return []
    known = {o.name for o in model.graph.output}
    for name in {n for pair in pairs for n in pair} - known:
        model.graph.output.add().name = name  # untyped outputs are fine for ONNX Runtime
    sess = session(model.SerializeToString())
    wanted = [n for pair in pairs for n in pair]
    err = np.zeros(len(pairs))
    ref = np.zeros(len(pairs))
    for feed in calib.feeds(ROWS_PER_FEED):
        values = dict(zip(wanted, sess.run(wanted, feed)))
        for i, (src, dq) in enumerate(pairs):
            err[i] += float(np.square(values[dq].astype(np.float64) - values[src]).sum())
            ref[i] += float(np.square(values[src].astype(np.float64)).sum())
    rel = np.sqrt(err / np.maximum(ref, 1e-30))
    order = np.argsort(-rel)[:limit]
    return [{"tensor": pairs[i][0], "relative_error": float(rel[i]), "read_by": consumers.get(pairs[i][1], [])}
            for i in order]


def _graph_values(model: "onnx.ModelProto") -> set[str]:
    """Names of tensors computed at run time (graph inputs and node outputs, not constants)."""
    computed = {i.name for i in model.graph.input} | {o for n in model.graph.node if n.op_type != "Constant"
                                                       for o in n.output}
    return computed - {t.name for t in model.graph.initializer}
