"""The model -> its FP32 step graph (torch): the one step-graph builder that needs torch.

Polygraphy-style lazy loader: constructing one is free; calling it does the work. Everything
after the export of the model itself (folding, FP16, INT8, checks) is export/onnx_graph.py,
export/fp16.py and export/int8.py, which import no torch, so `eqr calibrate` builds the FP16 and
INT8 graphs of an existing export on a target without torch.
"""
from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import torch

from eqr.contract.artifact import BATCH_DIM, INPUT_NAMES, NOISE_INPUT, OUTPUT_NAMES
from eqr.export.onnx_graph import fold_and_sort
from eqr.model.network import EqRModel
from eqr.model.step_graph import StepGraph

if TYPE_CHECKING:
    import onnx


class OnnxFromModel:
    """Loader: the noise-free `StepGraph` of `model` as an FP32 ONNX ModelProto, dynamic batch;
    `noisy`: the noisy step graph, with the NOISE_INPUT [B, U, L, D] input last.

    Uses the TorchScript exporter (`dynamo=False`): its graph is the one ONNX Runtime fuses
    RMSNorm in (docs/formats.md#precision-graphs), and it keeps the weights inside the proto.
    """

    def __init__(self, model: EqRModel, opset: int, noisy: bool = False) -> None:
        self.model = model
        self.opset = opset
        self.noisy = noisy

    def __call__(self) -> "onnx.ModelProto":
        import onnx

        config = self.model.config
        example_batch = 2  # any B > 1, so nothing specialises on a batch of one
        tokens = torch.ones(example_batch, config.seq_len, dtype=torch.int32)
        state = self.model.initial_state(example_batch, generator=torch.Generator().manual_seed(0))
        graph = StepGraph(self.model).eval()
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            done = torch.zeros(example_batch, dtype=torch.bool)
            args = (tokens, state.z_H.float(), state.z_L.float(), done)
            names = INPUT_NAMES
            if self.noisy:
                U, L, D = config.updates_per_step, config.seq_len, config.hidden_size
                args, names = (*args, torch.zeros(example_batch, U, L, D)), (*INPUT_NAMES, NOISE_INPUT)
            torch.onnx.export(graph, args, buffer, dynamo=False,
                              opset_version=self.opset, input_names=list(names),
                              output_names=list(OUTPUT_NAMES), do_constant_folding=True,
                              dynamic_axes={name: {0: BATCH_DIM} for name in names + OUTPUT_NAMES})
        return fold_and_sort(onnx.load_from_string(buffer.getvalue()))
