"""Shared pieces of the runtime tests: a tiny model whose step contracts, and its ONNX export."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from conftest import tiny_config

from eqr.contract.artifact import INPUT_NAMES, OUTPUT_NAMES
from eqr.model.network import EqRModel
from eqr.model.step_graph import StepGraph
from eqr.runtime.backends.torch_backend import TorchBackend


def contractive_model(seed: int = 0, **overrides) -> EqRModel:
    """A tiny EqR whose outer step contracts, so trajectories settle like a trained model's.

    Freshly initialised tiny models are chaotic (relative residual ~1 forever). Shrinking the
    block weights and growing the input embedding makes each block close to a normalisation of
    the (large) injected input, whose Jacobian in z is small; different inputs still settle
    after different numbers of steps.
    """
    model = EqRModel(tiny_config(**overrides), seed=seed).eval()
    with torch.no_grad():
        for block in model.blocks:
            for p in block.parameters():
                p.mul_(0.3)
        model.embed.weight.mul_(3.0)
    return model


def export_onnx(model: EqRModel, path: Path) -> Path:
    """The step graph as ONNX, dynamic batch axis (what `eqr export` writes as model.step.onnx)."""
    L, D = model.config.seq_len, model.config.hidden_size
    example = (torch.ones(2, L, dtype=torch.int32), torch.zeros(2, L, D), torch.zeros(2, L, D),
               torch.zeros(2, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(StepGraph(model), example, str(path), input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), opset_version=17, dynamo=False,
                          dynamic_axes={name: {0: "B"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)})
    return path


def random_puzzles(n: int, seq_len: int = 16, vocab: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, (n, seq_len)).astype(np.int32)


class StaticTorchBackend(TorchBackend):
    """TensorRT's CUDA-graph contract on the CPU: fixed batch, done-mask freezing, in-place refills."""

    def __init__(self, model: EqRModel, batch: int = 4) -> None:
        super().__init__(model)
        self.batch = batch

    def activate_impl(self) -> None:
        super().activate_impl()
        self.static_shapes, self.max_batch = True, self.batch
        self.frozen = None

    def step_impl(self, feeds):
        assert feeds["tokens"].shape[0] == self.batch  # the batch shape never changes
        with torch.no_grad():  # the graph's own done input freezes rows (no inference tensors: put() writes in place)
            outputs = self.graph(feeds["tokens"], feeds["z_H"], feeds["z_L"], torch.as_tensor(self.frozen),
                                 feeds.get("noise"))
        return dict(zip(OUTPUT_NAMES, outputs))

    def put(self, array, rows, values):
        array[torch.as_tensor(rows)] = values
        return array

    def freeze(self, done):
        self.frozen = done.copy()


def solver_for(model: EqRModel, backend=None):
    """A Solver over `model` (the 16-token test models) on the torch backend, or on `backend`."""
    from eqr.runtime import Solver

    return Solver(backend or TorchBackend(model), 16, 16, default_tol=1e-3)
