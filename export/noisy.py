"""The noisy step graphs (`eqr export --noisy`): the step with a `noise` input, per precision.

A precision row's `noisy_onnx` (eqr.contract.artifact.PRECISIONS) names the file: FP32 is exported
from the model with the extra input (`OnnxFromModel(noisy=True)`), FP16 converted from that graph
as the noise-free FP16 graph is from its FP32 one. The noise-free graphs are not touched, so an
export without --noisy and its answers stay exactly what they were.

Checks, like the noise-free graphs': the I/O contract with the noise input, standard ops only,
`polygraphy check lint`, and parity with `EqRModel.step` in torch given the same noise addends
(FP32 must match within the export's per-step limit; FP16 reports its error), with noise drawn
at the official sigma and with zero noise.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eqr.contract.artifact import OUTPUT_NAMES, PRECISIONS, graph_feeds
from eqr.contract.progress import Progress
from eqr.export import parity
from eqr.export.config import ExportConfig
from eqr.export.inputs import TaskInfo, initial_states, task_inputs
from eqr.model.network import EqRModel
from eqr.model.step_graph import StepGraph

CHECK_SIGMA = 0.01  # the official evaluation's path noise: the sigma the parity check draws at
_WARM_STEPS = 2  # noise-free steps before the checked one, so the states are not only random starts


def build_noisy_graphs(model: EqRModel, config: ExportConfig, task: TaskInfo, progress: Progress,
                       ) -> dict[str, tuple[Any, dict[str, Any]]]:
    """{precision: (noisy graph, its manifest entry)} for every exported precision that has one."""
    from eqr.export.fp16 import Fp16FromOnnx
    from eqr.export.from_model import OnnxFromModel

    mc = model.config
    feeds, torch_out = _check_inputs(model, config, task)
    built: dict[str, tuple[Any, dict[str, Any]]] = {}
    for precision in config.precisions:
        row = PRECISIONS[precision]
        if row.noisy_onnx is None:
            continue
        progress.stage(f"{precision}: build {row.noisy_onnx}")
        if precision == "fp32":
            graph = OnnxFromModel(model, config.opset, noisy=True)()
        else:  # fp16, from the noisy fp32 graph (always built first: config.precisions starts with fp32)
            graph = Fp16FromOnnx(built["fp32"][0])()
        check_noisy_contract(graph, precision, mc)
        lint_noisy(graph, precision, mc)
        errors = noisy_errors(graph, feeds, torch_out)
        if precision == "fp32" and max(errors.values()) > parity.FP32_STEP_ATOL:
            from eqr.export.exporter import ExportError

            raise ExportError(f"{row.noisy_onnx}: ONNX Runtime differs from model.step with the same noise by "
                              f"{max(errors.values()):.3g} (> {parity.FP32_STEP_ATOL:g} of the output scale); "
                              "the export is wrong, please report it")
        progress.done(f"{precision}: noisy graph: I/O contract, ops and lint ok; step error vs torch with the same "
                      f"noise {errors['noise']:.3g} (sigma {CHECK_SIGMA:g}), {errors['zero']:.3g} with zero noise")
        built[precision] = graph, {"onnx": row.noisy_onnx, "updates": mc.updates_per_step,
                                   "parity": {"sigma": CHECK_SIGMA, "max_scaled": errors}}
    return built


def _check_inputs(model: EqRModel, config: ExportConfig,
                  task: TaskInfo) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
    """Feeds of the noisy check ({"noise": ..., "zero": ...}) and torch's outputs on them."""
    mc = model.config
    g = torch.Generator().manual_seed(config.seed)
    tokens = task_inputs(task, model, config.check_batch, config.seed)
    state = initial_states(model, config.check_batch, g)
    graph = StepGraph(model).eval()
    z_H, z_L = state.z_H.float(), state.z_L.float()
    with torch.no_grad():
        for _ in range(_WARM_STEPS):
            z_H, z_L = graph(tokens, z_H, z_L)[:2]
    shape = (config.check_batch, mc.updates_per_step, mc.seq_len, mc.hidden_size)  # [B, U, L, D]
    rng = np.random.default_rng(config.seed)
    noises = {"noise": (CHECK_SIGMA * rng.standard_normal(shape)).astype(np.float32), "zero": np.zeros(shape, np.float32)}
    feeds, outputs = {}, {}
    for case, noise in noises.items():
        feeds[case] = graph_feeds(tokens.numpy(), z_H.numpy(), z_L.numpy(), noise=noise)
        with torch.no_grad():
            values = graph(tokens, z_H, z_L, None, torch.from_numpy(noise))
        outputs[case] = {name: v.numpy() for name, v in zip(OUTPUT_NAMES, values)}
    return feeds, outputs


def noisy_errors(graph: Any, feeds: dict[str, dict[str, np.ndarray]],
                 expected: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """Per case, the largest error of a float output in units of max(1, its RMS) (the FP32 gate's)."""
    from eqr.export.onnx_graph import session

    runner = session(graph)
    errors = {}
    for case, feed in feeds.items():
        got = dict(zip(OUTPUT_NAMES, runner.run(list(OUTPUT_NAMES), feed)))
        errors[case] = max(float(np.abs(got[n] - expected[case][n]).max() /
                                 max(1.0, float(np.sqrt(np.mean(np.square(expected[case][n]))))))
                           for n in parity.FLOAT_OUTPUTS)
    return errors


def check_noisy_contract(graph: Any, precision: str, mc: Any) -> None:
    """The I/O contract with the noise input and standard ops only; ExportError otherwise."""
    from eqr.export.exporter import ExportError
    from eqr.export.onnx_graph import check_io_contract, nonstandard_ops

    where = PRECISIONS[precision].noisy_onnx
    try:
        check_io_contract(graph, mc.seq_len, mc.hidden_size, mc.vocab_size, where, updates=mc.updates_per_step)
    except ValueError as e:
        raise ExportError(str(e)) from None
    foreign = nonstandard_ops(graph)
    if foreign:
        raise ExportError(f"{where}: uses non-standard ops TensorRT cannot parse: {', '.join(foreign)}")


def lint_noisy(graph: Any, precision: str, mc: Any) -> None:
    """`polygraphy check lint` (TensorRT's parser's view) must be clean; ExportError otherwise."""
    from eqr.export.exporter import ExportError
    from eqr.export.onnx_graph import lint

    report = lint(graph.SerializeToString(), mc.seq_len, mc.hidden_size, mc.vocab_size, updates=mc.updates_per_step)
    if not report["passed"]:
        raise ExportError(f"{PRECISIONS[precision].noisy_onnx}: polygraphy check lint failed: "
                          f"{'; '.join(report['messages'] or report['failing'])}")
