"""Native TensorRT backend (TRT 10/11 Python API): device-resident ping-pong state buffers,
`execute_async_v3` on its own CUDA stream, and CUDA-graph replay when the batch shape is static.

Device memory is torch CUDA tensors (torch is a core dependency; on Jetson use NVIDIA's torch
wheel). TensorRT itself is imported lazily: `import eqr` never needs it, and the tests skip
this backend without a GPU.

Two modes:
- cuda_graphs=True (static shapes): one fixed batch of `batch_size` slots. Two graphs are
  captured, A (state buffer 0 -> 1) and B (1 -> 0), each also applying a done mask so frozen
  rows keep their state; the loop freezes settled rows and refills slots instead of compacting.
- cuda_graphs=False (dynamic shapes): `set_input_shape` per call, so compaction shrinks the work;
  state output buffers ping-pong per batch size.
TensorRT does not allow inputs and outputs to alias, hence the two buffers (spec deployment.md).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from eqr.artifact import INPUT_NAMES, OUTPUT_NAMES
from eqr.errors import EqRError
from eqr.runtime.backends.base import STATE_NAMES, STATE_OUTPUTS, Backend
from eqr.runtime.backends.torch_backend import TorchArrays

if TYPE_CHECKING:
    from eqr.runtime.artifact import Artifact

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise EqRError("tensorrt is not installed; `pip install 'eqr[tensorrt]'` "
                       "(on Jetson it ships with JetPack's system Python)") from None
    return tensorrt


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool}
    if dtype not in table:
        raise EqRError(f"engine tensor dtype {dtype} is not supported by the eqr runtime; rebuild the engine")
    return table[dtype]


class TensorRTBackend(TorchArrays, Backend):
    name = "tensorrt"

    def __init__(self, engine_path: str | Path, *, precision: str = "fp32", batch_size: int | None = None,
                 cuda_graphs: bool = True, device: int = 0) -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        self.precision = precision
        self.requested_batch = batch_size
        self.cuda_graphs = cuda_graphs
        self.static_shapes = cuda_graphs
        self.device = torch.device("cuda", device)
        self.batch_size: int | None = None  # static slot count, fixed at activate()
        self._pairs: dict[str, list[torch.Tensor]] = {}  # state -> ping-pong buffers (current shape)
        self._outs: dict[str, torch.Tensor] = {}  # non-state outputs (current shape)

    @classmethod
    def unavailable_reason(cls, artifact: "Artifact", precision: str) -> str | None:
        if precision not in artifact.engines:
            return (f"no {precision} TensorRT engine in the artifact; build one on the target GPU with "
                    f"`eqr export MODEL --precision {precision} --engine always`")
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "tensorrt is not installed (pip install 'eqr[tensorrt]')"
        if not torch.cuda.is_available():
            return "no CUDA device visible to torch"
        return None

    @classmethod
    def from_artifact(cls, artifact: "Artifact", precision: str, batch_size: int | None = None,
                      cuda_graphs: bool = True, device: int = 0, **_: Any) -> "TensorRTBackend":
        return cls(artifact.engines[precision], precision=precision, batch_size=batch_size,
                   cuda_graphs=cuda_graphs, device=device)

    # ------------------------------------------------------------------ lifecycle
    def activate_impl(self) -> None:
        trt = import_tensorrt()
        from eqr.export.tensorrt import check_engine

        check_engine(self.engine_path)  # sidecar: same TensorRT, same GPU, unchanged ONNX; else "rebuild"
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EqRError(f"{self.engine_path}: TensorRT {trt.__version__} cannot load this engine (built for another "
                           "TensorRT version or GPU); rebuild it with `eqr export --engine` on this machine")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted((*INPUT_NAMES, *OUTPUT_NAMES)):
            raise EqRError(f"{self.engine_path}: I/O tensors {names} are not the eqr step contract; rebuild the engine")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = [int(s[0]) for s in self.engine.get_tensor_profile_shape("tokens", 0)]  # min, opt, max batch
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.max_batch = self.profile[2]
        if self.cuda_graphs:
            self.batch_size = self.max_batch = min(self.requested_batch or self.profile[1], self.profile[2])
            self._capture_graphs()

    def deactivate_impl(self) -> None:
        self._graphs = None
        self._pairs.clear()
        self._outs.clear()
        self.context = None
        self.engine = None
        self.runtime = None

    def describe(self) -> dict[str, Any]:
        info = {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "engine": str(self.engine_path), "cuda_graphs": self.cuda_graphs, "batch_size": self.batch_size}
        if self.engine is not None:  # what actually runs: the TensorRT library and the GPU
            info |= {"tensorrt": import_tensorrt().__version__, "gpu": torch.cuda.get_device_name(self.device)}
        return info

    # ------------------------------------------------------------------ buffers
    def _buffers_for(self, B: int, L: int) -> None:
        """(Re)allocate ping-pong state buffers and output buffers for batch size B."""
        pair = self._pairs.get("z_H")
        if pair is not None and pair[0].shape[0] == B:
            return
        D = self._hidden
        for state in STATE_NAMES:
            dtype = self.dtypes[STATE_OUTPUTS[state]]
            self._pairs[state] = [torch.empty((B, L, D), dtype=dtype, device=self.device) for _ in range(2)]
        V = self._vocab
        shapes = {"logits": (B, L, V), "preds": (B, L), "residual": (B,), "logit_delta": (B,), "q_halt": (B,)}
        self._outs = {n: torch.empty(s, dtype=self.dtypes[n], device=self.device) for n, s in shapes.items()}

    @property
    def _hidden(self) -> int:
        return int(self.engine.get_tensor_shape("z_H")[2])

    @property
    def _vocab(self) -> int:
        return int(self.engine.get_tensor_shape("logits")[2])

    def _bind(self, tokens: torch.Tensor, source: int) -> dict[str, torch.Tensor]:
        """Point the context at tokens, state buffer `source` (in) and 1 - source (out)."""
        B = tokens.shape[0]
        for name in INPUT_NAMES:
            self.context.set_input_shape(name, tuple(self._pairs["z_H"][0].shape) if name != "tokens" else (B, tokens.shape[1]))
        outputs = dict(self._outs)
        self.context.set_tensor_address("tokens", tokens.data_ptr())
        for state in STATE_NAMES:
            self.context.set_tensor_address(state, self._pairs[state][source].data_ptr())
            out = self._pairs[state][1 - source]
            self.context.set_tensor_address(STATE_OUTPUTS[state], out.data_ptr())
            outputs[STATE_OUTPUTS[state]] = out
        for name, buffer in self._outs.items():
            self.context.set_tensor_address(name, buffer.data_ptr())
        return outputs

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.engine_path}")

    def _capture_graphs(self) -> None:
        """Static batch: capture graph A (buffer 0 -> 1) and B (1 -> 0), each with the done-mask freeze."""
        B, L = self.batch_size, int(self.engine.get_tensor_shape("tokens")[1])
        if L < 0:
            raise EqRError(f"{self.engine_path}: sequence length must be static for CUDA-graph replay")
        self._buffers_for(B, L)
        self._tokens = torch.zeros((B, L), dtype=torch.int32, device=self.device)
        self._done = torch.zeros((B, 1, 1), dtype=torch.bool, device=self.device)
        self._graphs: list[tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = []
        for source in (0, 1):
            outputs = self._bind(self._tokens, source)
            with torch.cuda.stream(self.stream):
                self._enqueue()  # warm-up outside capture: TensorRT allocates lazily on the first run
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue()
                for state in STATE_NAMES:
                    held, new = self._pairs[state][source], self._pairs[state][1 - source]
                    torch.where(self._done, held, new, out=new)  # frozen rows keep their state
            self._graphs.append((graph, outputs))

    # ------------------------------------------------------------------ the step
    def step_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # uploads/gathers happened on torch's current stream
        source = self._source_of(feeds)
        if self.cuda_graphs:
            graph, outputs = self._graphs[source]
            with torch.cuda.stream(self.stream):
                graph.replay()
        else:
            outputs = self._bind(feeds["tokens"], source)
            with torch.cuda.stream(self.stream):
                self._enqueue()
        current.wait_stream(self.stream)
        self.stream.synchronize()  # honest per-step timing; the host reads the residual next anyway
        return outputs

    def _source_of(self, feeds: Mapping[str, Any]) -> int:
        """Index of the ping-pong buffer holding the input state, copying foreign feeds into buffer 0."""
        z_H = feeds["z_H"]
        if not self.cuda_graphs:
            self._buffers_for(z_H.shape[0], z_H.shape[1])
        elif feeds["tokens"].data_ptr() != self._tokens.data_ptr():
            self._tokens.copy_(feeds["tokens"])
        for source in (0, 1):
            if all(feeds[s].data_ptr() == self._pairs[s][source].data_ptr() for s in STATE_NAMES):
                return source
        for state in STATE_NAMES:
            self._pairs[state][0].copy_(feeds[state])
        return 0

    # ------------------------------------------------------------------ device arrays
    def upload(self, array: np.ndarray) -> torch.Tensor:
        tensor = super().upload(array)
        return tensor.to(self.dtypes["z_H"]) if tensor.is_floating_point() else tensor

    def put(self, array: torch.Tensor, rows: np.ndarray, values: torch.Tensor) -> torch.Tensor:
        array[torch.as_tensor(rows, dtype=torch.long, device=array.device)] = values.to(array.dtype)
        return array

    def freeze(self, done: np.ndarray) -> None:
        self._done.copy_(torch.from_numpy(done.astype(bool)).view(-1, 1, 1))  # (B,) -> (B, 1, 1)
