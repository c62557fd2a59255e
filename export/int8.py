"""INT8 step graphs: explicit symmetric Q/DQ for a strongly typed TensorRT build, and a CPU
variant for ONNX Runtime's integer kernels (`TARGETS`).

ONNX Runtime's static quantizer in QDQ format, INT8 weights (symmetric, per output channel)
and INT8 activations (symmetric), MatMul/Gemm with constant weights only by default: quantizing
every op was both slower and far less accurate, and the activation-by-activation products of
attention (QK^T, PV) have no weight to quantize per channel. `quant_pre_process` runs first.

A strongly typed build runs every layer in the type the graph gives it, so an INT8 graph that is
FP32 outside its Q/DQ pairs would run FP32 there: the graph outside the Q/DQ pairs and the
layers they feed is converted to FP16 (export/fp16.py, with its FP32 norms, heads and done
select), so the INT8 engine is FP16 everywhere the FP16 engine is, plus INT8 matmuls. The
activation ranges come from calibration feeds: (tokens, z_H, z_L) recorded along FP32
trajectories at every depth (`eqr.calibration.record`), built in or read from `--calib-data`,
or whatever `eqr calibrate` passes in.

The CPU graph (target "cpu", precision int8-cpu, model.step.int8.cpu.onnx) quantizes the same
ops from the same ranges' data but stays FP32 outside its Q/DQ pairs, with the scheme ONNX
Runtime's CPU provider fuses into integer kernels (its quantization guide): activations U8
asymmetric, weights S8 symmetric per output channel (U8S8). ONNX Runtime folds each
DQ(weight) -> MatMul <- DQ(Q(activation)) into MatMulIntegerToFloat (per-channel weights) or
QLinearMatMul; with FP16 Casts between them (the TensorRT graph) it cannot, and the MatMul runs
in float on dequantized weights. `reduce_range` (7-bit weights) is its advice for x86 CPUs
without VNNI, where the U8S8 kernel (VPMADDUBSW) can saturate; VNNI CPUs and ARM take 8 bits.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import numpy as np

from eqr.contract.io import atomic_write_bytes
from eqr.export.fp16 import name_nodes, to_fp16

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Default INT8 policy: only the matrix products (weights per channel + their input activations);
# residual adds, damping, norms, the state path and every output stay in higher precision.
DEFAULT_OP_TYPES = ("MatMul", "Gemm")
# Entropy (KL) search: histogram bins vs the 128 levels of one INT8 sign half. 2048 bins
# (TensorRT's choice) took ~1 s per tensor in ONNX Runtime's calibrator.
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 512, 128
PERCENTILE_BINS = 2048
QDQ_OPTIONS = {
    "ActivationSymmetric": True,  # TensorRT wants S8S8 with zero points of 0
    "WeightSymmetric": True,
    "QuantizeBias": False,  # INT32 bias Q/DQ is not an explicit-quantization type TensorRT takes
    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # MatMul weights are [in, out]: one scale per out
}


# Where an INT8 graph runs -> how it is quantized. "tensorrt": S8S8 with zero points of 0 and FP16
# outside the Q/DQ pairs (model.step.int8.onnx); "cpu": U8S8, FP32 outside (model.step.int8.cpu.onnx).
TARGETS = ("tensorrt", "cpu")
CPU_QDQ_OPTIONS = {
    "ActivationSymmetric": False,  # U8 asymmetric activations: ONNX Runtime's CPU kernels take U8S8
    "WeightSymmetric": True,
    "QuantizeBias": False,
    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
}


def calibrator_options(method: str, percentile: float = 99.999, symmetric: bool = True) -> dict[str, Any]:
    """Options of ONNX Runtime's range calibrators: (a)symmetric ranges and real histogram settings."""
    options: dict[str, Any] = {"symmetric": symmetric}
    if method == "entropy":
        options |= {"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS}
    if method == "percentile":
        options |= {"num_bins": PERCENTILE_BINS, "percentile": percentile}
    return options


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over an iterable of feed dicts, one pass."""

    def __init__(self, feeds: Iterable[Feed]) -> None:
        self._feeds: Iterator[Feed] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        return None if feed is None else {k: np.ascontiguousarray(v) for k, v in feed.items()}


def quantize_int8(onnx_path: str | os.PathLike[str], calib_feeds: Iterable[Feed], out_path: str | os.PathLike[str],
                  method: str = "minmax", op_types: Iterable[str] = DEFAULT_OP_TYPES,
                  nodes_to_exclude: Iterable[str] = (), percentile: float = 99.999, target: str = "tensorrt",
                  reduce_range: bool = False) -> Path:
    """Write the Q/DQ INT8 version of the FP32 graph at `onnx_path` to `out_path` (atomically).

    `target` (one of TARGETS) picks the scheme: TensorRT's S8S8 with FP16 outside the pairs, or
    the CPU's U8S8 with FP32 outside (`reduce_range`: 7-bit weights, for x86 without VNNI).
    `calib_feeds` yields {"tokens", "z_H", "z_L"} numpy feeds; `method` estimates the activation
    ranges. The ranges are computed here, with the calibrator's histogram settings, and handed
    to `quantize_static` as a calibration cache: `quantize_static` drops `num_bins`, which made
    its entropy calibrator return exactly the MinMax ranges (docs/formats.md#precision-graphs).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if target not in TARGETS:
        raise ValueError(f"unknown INT8 target {target!r}; choose one of {', '.join(TARGETS)}")
    cpu = target == "cpu"
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                        "percentile": CalibrationMethod.Percentile}[method]
    op_types = list(op_types)
    with tempfile.TemporaryDirectory(prefix="eqr-int8-") as tmp:
        prepared, quantized, cache = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json"
        if cpu:  # ONNX Runtime's CPU provider fuses DQ -> Gemm into QGemm only without a float bias
            source = Path(tmp) / "matmuls.onnx"
            source.write_bytes(split_gemm_bias(onnx.load(str(onnx_path))).SerializeToString())
            onnx_path = source
        try:
            quant_pre_process(str(onnx_path), str(prepared))
        except Exception as e:  # symbolic shape inference fails on some graphs (dynamo exports)
            log.info("quant_pre_process with symbolic shapes failed (%s); retrying without", e)
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        chatter = io.StringIO()  # the histogram calibrators print progress; keep stdout for --json
        with contextlib.redirect_stdout(chatter):
            calibrator = create_calibrator(prepared, op_types, str(Path(tmp) / "augmented.onnx"), calibrate_method,
                                           extra_options=calibrator_options(method, percentile, symmetric=not cpu))
            calibrator.collect_data(_FeedReader(calib_feeds))
            save_tensors_data(calibrator.compute_data(), cache)
        log.debug("onnxruntime calibrator: %s", chatter.getvalue().strip())
        del calibrator
        excluded = list(nodes_to_exclude) + activation_matmuls(prepared)
        quantize_static(str(prepared), str(quantized), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=op_types, per_channel=True, reduce_range=cpu and reduce_range,
                        activation_type=QuantType.QUInt8 if cpu else QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded, calibrate_method=calibrate_method,
                        extra_options=CPU_QDQ_OPTIONS if cpu else QDQ_OPTIONS, calibration_cache_path=str(cache))
        model = confine_qdq(onnx.load(str(quantized)), op_types)
        if not cpu:
            model = to_fp16(model, keep_nodes=qdq_nodes)
        atomic_write_bytes(out_path, model.SerializeToString())
    return Path(out_path)


def split_gemm_bias(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Every Gemm with a constant B and a bias C as Gemm (no C) + Add: the same product, in the
    form ONNX Runtime's CPU provider fuses into QGemm with float output (its QDQ Gemm pattern
    takes a bias only as INT32, which TensorRT's graph does not quantize; and MatMul + Add is
    fused back into a float Gemm before the QDQ fusions run)."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "Gemm" or node.input[1] not in constants or len(node.input) < 3 or not node.input[2]:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        beta = attrs.pop("beta", 1.0)
        name = node.name or f"gemm_{len(nodes)}"
        product = f"{node.output[0]}_product"
        nodes.append(helper.make_node("Gemm", list(node.input[:2]), [product], name=name, **attrs))
        bias = node.input[2]
        if beta != 1.0:
            nodes.append(helper.make_node("Mul", [bias, _scalar(graph, f"{name}_beta", beta)], [f"{name}_scaled_bias"],
                                          name=f"{name}_beta"))
            bias = f"{name}_scaled_bias"
        nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{name}_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _scalar(graph: Any, name: str, value: float) -> str:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
    return name


def activation_matmuls(path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes of the graph at `path` whose B is not a constant (attention's
    products of two activations), which stay unquantized; unnamed nodes get names first (the
    graph is rewritten in place), since the quantizer excludes nodes by name."""
    import onnx

    model = onnx.load(str(path))
    if any(not n.name for n in model.graph.node):
        name_nodes(model)
        onnx.save(model, str(path))
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] not in constants]


def qdq_nodes(model: "onnx.ModelProto") -> set[str]:
    """The Q/DQ nodes and the layers reading a dequantized tensor: they stay FP32 in the INT8
    graph (TensorRT fuses DQ -> MatMul into an INT8 kernel; a Cast between them would not fuse)."""
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    dequantized = {o for n in qdq if n.op_type == "DequantizeLinear" for o in n.output}
    readers = {n.name for n in model.graph.node if dequantized & set(n.input)}
    return {n.name for n in qdq} | readers


def confine_qdq(model: "onnx.ModelProto", op_types: Iterable[str]) -> "onnx.ModelProto":
    """Let only the quantized ops read dequantized activations; everything else reads FP32.

    ONNX Runtime's QDQ quantizer rewires *every* consumer of a quantized activation to its
    DequantizeLinear, and when that activation is a graph output (z_H_out feeds the lm head),
    the output itself becomes the dequantized copy. That would round the residual stream and
    the returned state to INT8; TensorRT only needs Q/DQ in front of the quantized layers.
    """
    import onnx_graphsurgeon as gs

    from eqr.export.onnx_graph import fold_and_sort

    graph = gs.import_onnx(model)
    keep = set(op_types)
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear"]:
        q = dq.inputs[0].inputs[0] if dq.inputs[0].inputs else None
        if q is None or q.op != "QuantizeLinear" or isinstance(q.inputs[0], gs.Constant):
            continue  # a weight: its DQ feeds only its layer
        source, dequantized = q.inputs[0], dq.outputs[0]
        for user in list(dequantized.outputs):
            if user.op not in keep:
                for i, tensor in enumerate(user.inputs):
                    if tensor is dequantized:
                        user.inputs[i] = source
        if dequantized in graph.outputs:  # hand the output name back to the FP32 tensor
            index = graph.outputs.index(dequantized)
            name = dequantized.name
            dequantized.name, source.name = f"{name}_dequantized", name
            source.dtype, source.shape = dequantized.dtype, dequantized.shape
            graph.outputs[index] = source
    graph.cleanup().toposort()
    result = gs.export_onnx(graph)
    used = {n.domain for n in result.graph.node}
    kept_opsets = [o for o in model.opset_import if o.domain in used | {"", "ai.onnx"}]
    del result.opset_import[:]
    result.opset_import.extend(kept_opsets)  # quant_pre_process lists every ORT domain; keep the used ones
    result.ir_version = model.ir_version
    return fold_and_sort(result, fold=False)  # folding would turn Q/DQ weights back into FP32


class Int8FromOnnx:
    """Loader: FP32 graph (ModelProto or loader) + calibration feeds -> INT8 Q/DQ ModelProto."""

    def __init__(self, fp32, calib_feeds, method: str = "minmax", op_types: Iterable[str] = DEFAULT_OP_TYPES,
                 exclude_nodes: Iterable[str] = (), percentile: float = 99.999, target: str = "tensorrt",
                 reduce_range: bool = False) -> None:
        self.fp32 = fp32
        self.target = target
        self.reduce_range = reduce_range
        self.calib_feeds = calib_feeds  # an iterable of feeds, or a callable returning one
        self.method = method
        self.op_types = tuple(op_types)
        self.exclude_nodes = tuple(exclude_nodes)
        self.percentile = percentile

    def __call__(self) -> "onnx.ModelProto":
        import onnx

        model = self.fp32() if callable(self.fp32) else self.fp32
        feeds = self.calib_feeds() if callable(self.calib_feeds) else self.calib_feeds
        with tempfile.TemporaryDirectory(prefix="eqr-int8-") as tmp:
            source, written = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            source.write_bytes(model.SerializeToString())
            quantize_int8(source, feeds, written, method=self.method, op_types=self.op_types,
                          nodes_to_exclude=self.exclude_nodes, percentile=self.percentile, target=self.target,
                          reduce_range=self.reduce_range)
            return onnx.load(str(written))


def quantized_ops(model: "onnx.ModelProto") -> dict[str, int]:
    """How many of each op type read a dequantized input (what the Q/DQ pairs cover)."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized & set(node.input):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ONNX Runtime's CPU integer kernels a DQ -> MatMul/Gemm pattern becomes (optimized graph op types)
INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul")


def optimized_op_counts(graph: "onnx.ModelProto | bytes | str | os.PathLike[str]",
                        level: str = "ORT_ENABLE_ALL") -> dict[str, int]:
    """Op type -> count in the graph ONNX Runtime's CPU provider actually runs (its optimized model,
    `SessionOptions.optimized_model_filepath`): whether the weight MatMuls became integer ops."""
    import onnx
    import onnxruntime as ort

    data = graph.SerializeToString() if hasattr(graph, "SerializeToString") else (
        graph if isinstance(graph, bytes) else Path(graph).read_bytes())
    with tempfile.TemporaryDirectory(prefix="eqr-opt-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    counts: dict[str, int] = {}
    for node in optimized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def weight_matmuls_on_integer_kernels(graph: Any) -> dict[str, int]:
    """{"integer": weight products on integer kernels, "float": MatMul/Gemm still in float (attention's
    activation x activation products among them), "cast": Casts} of the optimized CPU graph."""
    counts = optimized_op_counts(graph)
    return {"integer": sum(counts.get(op, 0) for op in INTEGER_OPS),
            "float": sum(counts.get(op, 0) for op in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")),
            "cast": counts.get("Cast", 0)}
