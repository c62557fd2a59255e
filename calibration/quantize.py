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
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from eqr.contract.artifact import MANIFEST_FILE, PRECISIONS, graph_metadata, read_manifest
from eqr.contract.errors import EqRError
from eqr.contract.io import atomic_write_bytes, sha256_file
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- files


def fp32_onnx(export_dir: str | os.PathLike[str]) -> Path:
    entry = (read_manifest(export_dir).get("precisions") or {}).get("fp32")
    if not entry:
        raise EqRError(f"{Path(export_dir) / MANIFEST_FILE}: no precisions.fp32 entry; re-run `eqr export --force`")
    path = Path(export_dir) / entry.get("onnx", PRECISIONS["fp32"].onnx)
    if not path.is_file():
        raise EqRError(f"{path}: the FP32 step graph is missing; re-run `eqr export`")
    return path


def embed_manifest(path: str | os.PathLike[str], manifest: dict[str, Any], precision: str) -> None:
    """Give a built graph its own metadata (the manifest and its precision) in place of the
    FP32 graph's, which the FP16 converter and the INT8 quantizer carry over."""
    import onnx

    from eqr.export.onnx_graph import set_metadata

    model = onnx.load(str(path))
    set_metadata(model, graph_metadata(manifest, precision))
    atomic_write_bytes(path, model.SerializeToString())


def _target(export_dir: str | os.PathLike[str], precision: str, force: bool) -> Path:
    path = Path(export_dir) / PRECISIONS[precision].onnx
    if path.exists() and not force:
        raise EqRError(f"{path} exists; pass --force to rebuild it")
    return path


# --------------------------------------------------------------------------- builds


def build_fp16(export_dir: str | os.PathLike[str], keep_fp32_ops: Iterable[str] | None = None,
               force: bool = False) -> dict[str, Any]:
    """Write model.step.fp16.onnx beside the FP32 graph; returns its manifest entry."""
    import onnx

    from eqr.export.build import BuildOptions, build_graph
    from eqr.export.fp16 import FP32_OP_TYPES

    kept = tuple(FP32_OP_TYPES if keep_fp32_ops is None else keep_fp32_ops)
    out = _target(export_dir, "fp16", force)
    graph = build_graph("fp16", onnx.load(str(fp32_onnx(export_dir))), BuildOptions(keep_fp32_ops=kept))
    atomic_write_bytes(out, graph.SerializeToString())
    return {"onnx": out.name, "sha256": sha256_file(out), "keep_fp32_ops": list(kept)}


def build_int8(export_dir: str | os.PathLike[str], calib: "CalibSet", policy: QuantPolicy,
               force: bool = False) -> dict[str, Any]:
    """Write model.step.int8.onnx calibrated on `calib`; returns its manifest entry.

    For entropy/percentile the entry also records `scale_change` against MinMax on the same data.
    """
    import onnx

    source, target = fp32_onnx(export_dir), _target(export_dir, "int8", force)
    _quantize(source, calib, target, policy)
    model = onnx.load(str(target))
    entry: dict[str, Any] = {"onnx": target.name, "sha256": sha256_file(target), "policy": policy.to_dict(),
                             "quantized_ops": _quantized_ops(model), "calibration_states": len(calib)}
    if policy.method != "minmax":
        with tempfile.TemporaryDirectory(prefix="eqr-minmax-") as tmp:
            reference = Path(tmp) / "minmax.onnx"
            _quantize(source, calib, reference, QuantPolicy("minmax", policy.op_types, policy.exclude_nodes))
            change = scale_change(activation_scales(onnx.load(str(reference))), activation_scales(model))
        entry["scale_change_vs_minmax"] = change
        if change["changed_fraction"] == 0:
            log.warning("calibration method %s produced exactly the MinMax scales", policy.method)
    return entry


def _quantize(source: Path, calib: "CalibSet", target: Path, policy: QuantPolicy) -> None:
    """FP32 graph -> symmetric S8S8 QDQ graph at `target`, activation ranges from `calib` by `policy.method`."""
    import onnx

    from eqr.export.build import BuildOptions, build_graph

    options = BuildOptions(calib_feeds=lambda: calib.feeds(ROWS_PER_FEED), method=policy.method,
                           op_types=policy.op_types, exclude_nodes=policy.exclude_nodes, percentile=policy.percentile)
    atomic_write_bytes(target, build_graph("int8", onnx.load(str(source)), options).SerializeToString())


def _quantized_ops(model: "onnx.ModelProto") -> dict[str, int]:
    from eqr.export.int8 import quantized_ops

    return quantized_ops(model)


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
