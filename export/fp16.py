"""FP16 step graph: FP16 compute, FP32 state I/O, the known overflow spots kept in FP32.

Kept FP32 (docs/formats.md#precision-graphs): every reduction with the ops that feed and finish it (the
RMSNorm sum of squares, its eps and rsqrt; the residual norms), softmax, argmax, and the
output heads (logits, preds, residual, logit_delta, q_halt: they read the FP16 state cast up,
so the convergence scores are not rounded to FP16), and the `done` select of the state outputs
(a frozen row's FP32 state passes through unrounded). Conversion uses ONNX Runtime's own
converter (the only one whose graphs ONNX Runtime loaded), then a topological re-sort, which
`keep_io_types` needs.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from eqr.contract.artifact import STATE_OUTPUTS

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

FP32_OP_TYPES = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceMax",
                 "Softmax", "LogSoftmax", "ArgMax", "Range", "CumSum", "TopK")
# Elementwise ops that build a norm around a reduction (square before; eps, sqrt, 1/x, scale after).
_NORM_FEEDERS = ("Mul", "Pow")
_NORM_FINISHERS = ("Add", "Sqrt", "Div", "Reciprocal", "Mul", "Clip", "Max")


def fp32_nodes(model: "onnx.ModelProto", keep_fp32_ops: Iterable[str] = FP32_OP_TYPES) -> list[str]:
    """Names of the nodes to keep in FP32: `keep_fp32_ops`, norm chains and the head subgraph."""
    nodes = list(model.graph.node)
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in nodes:
        for name in n.input:
            consumers[name].append(n)
    keep = {n.name for n in nodes if n.op_type in set(keep_fp32_ops)}
    for reduce in (n for n in nodes if n.op_type.startswith("Reduce")):
        keep |= _norm_chain(reduce, producer, consumers)
    keep |= _head_nodes(model, producer)
    keep |= {n.name for n in nodes if n.op_type == "Where" and {"z_H", "z_L"} & set(n.input)}  # done rows: bit-exact
    return sorted(keep)


def _norm_chain(reduce, producer, consumers) -> set[str]:
    """The square feeding a reduction and the eps/sqrt/divide/scale ops finishing the norm."""
    chain = {reduce.name}
    feeder = producer.get(reduce.input[0])
    norm_input = None
    if feeder is not None and feeder.op_type in _NORM_FEEDERS:
        chain.add(feeder.name)
        norm_input = feeder.input[0]
    frontier = [reduce]
    for _ in range(4):  # x * rsqrt(mean(x^2) + eps) is at most four ops past the reduction
        next_frontier = []
        for node in frontier:
            for user in consumers.get(node.output[0], []):
                if user.op_type in _NORM_FINISHERS and user.name not in chain:
                    chain.add(user.name)
                    if not (user.op_type == "Mul" and norm_input in user.input):  # the final scale ends it
                        next_frontier.append(user)
        frontier = next_frontier
    return chain


def _head_nodes(model: "onnx.ModelProto", producer) -> set[str]:
    """Nodes that feed only non-state outputs (logits, preds, residual, logit_delta, q_halt)."""
    def cone(outputs: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        stack = [producer[o] for o in outputs if o in producer]
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            stack += [producer[i] for i in node.input if i in producer]
        return seen

    outputs = [o.name for o in model.graph.output]
    return cone(o for o in outputs if o not in STATE_OUTPUTS.values()) - cone(STATE_OUTPUTS.values())


def name_nodes(model: "onnx.ModelProto") -> None:
    """Give every node a unique name (the converter's block list works by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_eqr_{i}"
        seen.add(node.name)


def to_fp16(model: "onnx.ModelProto", keep_fp32_ops: Iterable[str] = FP32_OP_TYPES,
            keep_nodes: Callable[["onnx.ModelProto"], Iterable[str]] | None = None) -> "onnx.ModelProto":
    """The FP16 version of an FP32 step graph, I/O types unchanged. keep_nodes(model) names more
    nodes to keep in FP32 (the INT8 graph's Q/DQ pairs and the layers they feed)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from eqr.export.onnx_graph import fold_and_sort

    model = onnx.ModelProto.FromString(model.SerializeToString())  # never modify the caller's graph
    name_nodes(model)
    blocked = sorted(set(fp32_nodes(model, keep_fp32_ops)) | set(keep_nodes(model) if keep_nodes else ()))
    log.info("fp16: %d of %d nodes kept in fp32", len(blocked), len(model.graph.node))
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked,
                                         op_block_list=list(keep_fp32_ops), disable_shape_infer=False)
    return fold_and_sort(drop_cast_round_trips(converted), fold=False)  # nothing new to fold


def drop_cast_round_trips(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Remove FP32 -> FP16 -> FP32 Cast pairs between two FP32 nodes (or an FP32 node and an output).

    The converter casts every blocked node's output to FP16 and back again for a blocked
    consumer: x^2 feeding the RMSNorm mean would overflow above |x| = 256 on that round trip.
    """
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    for back in [n for n in graph.nodes if n.op == "Cast" and n.attrs.get("to") == onnx.TensorProto.FLOAT]:
        down = back.inputs[0].inputs[0] if back.inputs[0].inputs else None
        if down is None or down.op != "Cast" or down.attrs.get("to") != onnx.TensorProto.FLOAT16:
            continue
        source = down.inputs[0]
        if source.dtype is not None and np.dtype(source.dtype) != np.float32:
            continue
        result = back.outputs[0]
        if result in graph.outputs:  # an FP32 node feeding an output (the done select): it becomes the output
            index, name = graph.outputs.index(result), result.name
            result.name, source.name = f"{name}_rounded", name
            graph.outputs[index] = source
            continue
        for user in list(result.outputs):
            for i, tensor in enumerate(user.inputs):
                if tensor is result:
                    user.inputs[i] = source
    graph.cleanup()
    return gs.export_onnx(graph)


class Fp16FromOnnx:
    """Loader: calls an FP32 graph loader (or takes a ModelProto) and returns the FP16 graph."""

    def __init__(self, fp32, keep_fp32_ops: Iterable[str] = FP32_OP_TYPES) -> None:
        self.fp32 = fp32
        self.keep_fp32_ops = tuple(keep_fp32_ops)

    def __call__(self) -> "onnx.ModelProto":
        model = self.fp32() if callable(self.fp32) else self.fp32
        return to_fp16(model, self.keep_fp32_ops)
