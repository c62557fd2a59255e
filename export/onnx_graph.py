"""Step-graph tools that need no torch: constant folding and clean-up, the I/O contract check,
metadata, lint, and ONNX Runtime sessions. `eqr calibrate` builds its FP16/INT8 graphs with them
on a target without torch; the torch -> ONNX export of the model is export/from_model.py.

onnx, onnx-graphsurgeon, onnxruntime and polygraphy are imported inside the functions that need
them (the folding Polygraphy does only when asked to fold).
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqr.contract.artifact import NOISE_INPUT, io_contract
from eqr.contract.trt_engine import quiet_polygraphy

if TYPE_CHECKING:
    import onnx
    import onnxruntime

log = logging.getLogger(__name__)

STANDARD_DOMAINS = ("", "ai.onnx")  # TensorRT's ONNX parser knows no ONNX Runtime contrib ops


def fold_and_sort(model: "onnx.ModelProto", fold: bool = True) -> "onnx.ModelProto":
    """Constant folding (Polygraphy; `fold=False` skips it), shared duplicate initializers,
    no-op Casts bypassed, dead nodes removed and a topological sort (graphsurgeon)."""
    import onnx
    import onnx_graphsurgeon as gs

    if fold:
        from polygraphy.backend.onnx import fold_constants

        with quiet_polygraphy():
            # No size threshold: folding the per-use weight transposes is the point (duplicates
            # are shared afterwards), so Polygraphy's "large folded tensors" advice does not apply.
            model = fold_constants(model, num_passes=2, error_ok=False, size_threshold=1 << 40)
    _dedupe_initializers(model)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    _drop_noop_casts(graph)
    graph.cleanup().toposort()
    result = gs.export_onnx(graph)
    del result.opset_import[:]
    result.opset_import.extend(model.opset_import)  # keep the exporter's opset exactly
    result.ir_version = model.ir_version
    return result


def _dedupe_initializers(model: "onnx.ModelProto") -> None:
    """Share identical initializers. The step applies one weight-tied block stack dozens of
    times; constant folding writes a transposed copy of each weight per application (a
    4.9M-parameter model became a 407 MB graph)."""
    import hashlib

    from onnx import numpy_helper

    canonical: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    kept = []
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(values.tobytes()).hexdigest())
        if key in canonical:
            rename[tensor.name] = canonical[key]
        else:
            canonical[key] = tensor.name
            kept.append(tensor)
    if not rename:
        return
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _drop_noop_casts(graph) -> None:
    """Bypass Casts to the type their input already has (the exporter's `x.float()` on fp32)."""
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.op == "Cast" and node.inputs[0].dtype is not None and node.outputs[0].name not in outputs \
                and node.inputs[0].dtype == node.outputs[0].dtype:
            source, result = node.inputs[0], node.outputs[0]
            for user in list(result.outputs):
                for i, tensor in enumerate(user.inputs):
                    if tensor is result:
                        user.inputs[i] = source
            node.outputs.clear()


def check_io_contract(model: "onnx.ModelProto", config_seq_len: int, hidden: int, vocab: int, where: str,
                      updates: int | None = None) -> None:
    """Raise ValueError unless the graph's inputs/outputs are exactly the fixed I/O contract
    (`updates` U: the noisy graph's, with its noise input)."""
    expected = io_contract(config_seq_len, hidden, vocab, updates)
    actual = {"inputs": [_value_info(v) for v in model.graph.input],
              "outputs": [_value_info(v) for v in model.graph.output]}
    if actual != expected:
        raise ValueError(f"{where}: I/O differs from the contract: {json.dumps(actual)} vs {json.dumps(expected)}")


def _value_info(value: Any) -> dict[str, Any]:
    import onnx

    tensor_type = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    shape = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
    return {"name": value.name, "dtype": dtype, "shape": shape}


def nonstandard_ops(model: "onnx.ModelProto") -> list[str]:
    """Op types outside the standard ONNX domain (e.g. com.microsoft contrib ops)."""
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


def set_metadata(model: "onnx.ModelProto", entries: dict[str, str]) -> None:
    del model.metadata_props[:]
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def session(model: "onnx.ModelProto | bytes | str", threads: int = 0) -> "onnxruntime.InferenceSession":
    """A CPU ONNX Runtime session (no spinning: the CPU is shared with torch and other jobs).

    threads 0: torch's thread count where torch is in use (eqr export's checks set it for the
    cores left idle), else ONNX Runtime's default; this module never imports torch itself."""
    import onnxruntime as ort

    torch = sys.modules.get("torch")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or (torch.get_num_threads() if torch is not None else 0)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def lint(model_bytes: bytes, seq_len: int, hidden: int, vocab: int, updates: int | None = None) -> dict[str, Any]:
    """`polygraphy check lint` on the graph -> {"passed": bool, "failing": [...], "messages": [...]}.

    Run in-process through `polygraphy.tools.main`, the public entry point of Polygraphy's
    command line (what the `polygraphy` script calls), with the CLI's own arguments: a
    subprocess would spend most of its time importing onnxruntime again. Its log goes to
    stderr, never stdout. `updates` U: a noisy graph, whose noise input is [1, U, L, D].
    """
    from polygraphy.tools import main as polygraphy_main

    with tempfile.TemporaryDirectory(prefix="eqr-lint-") as tmp:
        path, report_path = Path(tmp) / "model.onnx", Path(tmp) / "lint.json"
        path.write_bytes(model_bytes)
        # Lint runs the graph once: give it valid token ids and a concrete batch of one.
        shapes = [f"tokens:[1,{seq_len}]", f"z_H:[1,{seq_len},{hidden}]", f"z_L:[1,{seq_len},{hidden}]", "done:[1]"]
        if updates is not None:
            shapes.append(f"{NOISE_INPUT}:[1,{updates},{seq_len},{hidden}]")
        args = ["check", "lint", str(path), "-o", str(report_path), "--val-range", f"tokens:[0,{vocab - 1}]",
                "--input-shapes", *shapes]
        with quiet_polygraphy(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # polygraphy's entry-point lookup
            status = polygraphy_main(args)
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    failing = report.get("summary", {}).get("failing", [])
    passed = status == 0 and not failing
    messages = [e.get("message", "") for e in report.get("lint_entries", []) if e.get("level") == "exception"]
    if not passed and not messages:
        messages = [f"polygraphy check lint exited with status {status} and no report"]
    return {"passed": passed, "failing": failing[:20], "messages": messages[:5]}
