"""The reference backend: eqr/model/step_graph.py's `StepGraph` run by torch, on the CPU or a CUDA GPU.

State stays as torch tensors on the backend's device; fp32 is the semantics every other backend
is compared against. It is the runtime's one door to torch and the model: checkpoints, bundled
names and presets resolve to an `Artifact` here (`checkpoint_artifact`).

The fast path for GPU servers without TensorRT (the step math stays in eqr.model; this file only
runs it):
- device: "cpu", "cuda", "cuda:N", an index N, or "auto" (cuda:0 when torch sees a GPU, else the
  CPU); a CUDA device that torch cannot see is one EqRError line (`resolve_device`).
- half precision: `dtype="bf16"` or `"fp16"` (precision fp16 means fp16) runs the step under
  torch autocast: matmuls and attention in half precision (fp32 weights cast at use, as AMP does),
  while RMSNorm, the residual stream, the damped update and the state stay fp32 (autocast
  promotes `h + block(h)` to fp32, and the model's `rms_norm` then computes and returns fp32).
  On the CPU half precision is slower than fp32 (docs/performance.md); it is for GPUs.
- slots mode (`static_shapes=True`, or `cuda_graphs=True`): one fixed batch of `batch_size`
  slots; the loop freezes settled rows through the step's `done` input and refills slots in
  place (`put`) instead of compacting, as the TensorRT backend does.
- CUDA graphs (`cuda_graphs=True`, slots mode): per static batch, the step is captured once
  after warm-up runs on a side stream (`torch.cuda.graph`) over static input buffers and
  replayed afterwards; each step copies its feeds into the captured inputs (when they are not
  those already) and the state outputs into one of two alternating buffers, so step t's outputs
  stay valid until step t + 2 (the buffer rule of eqr.runtime.backends.base). A capture that
  fails falls back to eager steps with one warning. The capture object is injectable
  (`graph_capture=`), so the logic is tested on the CPU with a fake.
- path noise: a step fed `noise` (the host's addends, [B, U, L, D]) passes it to the model's
  step, eagerly (a captured graph has no noise input); `noise_shape` is the model's.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eqr.contract.artifact import NOISE_INPUT, OUTPUT_NAMES, Artifact
from eqr.contract.errors import EqRError
from eqr.model.network import EqRModel
from eqr.model.step_graph import StepGraph
from eqr.runtime.backends.base import Backend
from eqr.runtime.backends.registry import AUTO, parse_device

log = logging.getLogger(__name__)

# compute dtype names -> torch dtypes (fp32: no autocast)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_DTYPES = {"fp32": "fp32", "fp16": "fp16"}  # the contract's precisions this backend runs
STEP_INPUTS = ("tokens", "z_H", "z_L", "done")
STATE_PAIRS = (("z_H", "z_H_out"), ("z_L", "z_L_out"))
WARMUP_STEPS = 3  # eager runs on the side stream before a capture (cuBLAS handles, autotuning)


def resolve_device(spec: str | int | torch.device | None) -> torch.device:
    """A device spec (registry.parse_device's forms, or a torch.device) -> the torch.device to run on.
    "auto": cuda:0 when torch sees a GPU, else the CPU. EqRError in one line when CUDA is asked for
    but this torch has no CUDA, sees no device, or not that many."""
    text = str(spec) if isinstance(spec, torch.device) else parse_device(spec)
    if text == AUTO:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
        raise EqRError(f"device {text} asked for but CUDA is not available: {why}; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise EqRError(f"device {text} asked for but torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


class CudaGraphCapture:
    """torch.cuda graphs: warm up on a side stream, capture one call of `fn`, replay it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def capture(self, fn: Callable[[], Sequence[torch.Tensor]]) -> tuple[Callable[[], None], Sequence[torch.Tensor]]:
        """-> (replay, the outputs the replays write). Raises when the capture fails."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn()
        graph.replay()  # the capture itself computed nothing: fill the outputs once
        return graph.replay, outputs


class TorchArrays:
    """Device arrays as torch tensors on `self.device`."""

    device: torch.device

    def upload(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def download(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().cpu().numpy()

    def take(self, array: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return array.index_select(0, torch.as_tensor(rows, dtype=torch.long, device=array.device))

    def concat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays), dim=0)

    def thread_setup(self) -> Callable[[], None]:
        """torch's thread count is per thread: a new thread would use every core (~100x slower
        on a busy machine), so the worker takes the caller's."""
        threads = torch.get_num_threads()
        return lambda: torch.set_num_threads(threads)


class _Captured:
    """One static batch's graph: its input buffers, replay, outputs and two state-output buffers."""

    def __init__(self, inputs: dict[str, torch.Tensor], replay: Callable[[], None],
                 outputs: Sequence[torch.Tensor]) -> None:
        self.inputs, self.replay = inputs, replay
        self.outputs = dict(zip(OUTPUT_NAMES, outputs))
        self.states = [{out: torch.empty_like(self.outputs[out]) for _, out in STATE_PAIRS} for _ in range(2)]
        self.turn = 0


class TorchBackend(TorchArrays, Backend):
    name = "torch"

    def __init__(self, model: EqRModel | None = None, *, loader: str | None = None,
                 device: str | int | torch.device | None = "cpu", precision: str = "fp32", dtype: str | None = None,
                 batch_size: int | None = None, static_shapes: bool = False, cuda_graphs: bool = False,
                 graph_capture: Any = None) -> None:
        """Give a model, or `loader`: anything `eqr.model.load.load_model` accepts (loaded at activate).
        dtype: "fp32", "bf16" or "fp16" compute (default: the precision's, fp16 for fp16).
        static_shapes (implied by cuda_graphs): slots mode at `batch_size`. graph_capture: an
        object with `capture(fn) -> (replay, outputs)` (default: CudaGraphCapture on a CUDA device)."""
        super().__init__()
        if model is None and loader is None:
            raise ValueError("TorchBackend needs a model or a loader (checkpoint path or name)")
        if precision not in PRECISION_DTYPES:
            raise EqRError(f"the torch backend runs {' and '.join(PRECISION_DTYPES)} (bf16 with dtype='bf16'), "
                           f"not {precision}")
        self.dtype_name = (dtype or PRECISION_DTYPES[precision]).lower()
        if self.dtype_name not in DTYPES:
            raise EqRError(f"torch backend dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.model = model
        self.loader = loader
        self.device = resolve_device(device)
        self.precision = precision
        self.cuda_graphs = cuda_graphs
        self.static_shapes = bool(static_shapes or cuda_graphs)
        self.batch_size = batch_size
        if self.static_shapes and not batch_size:
            raise EqRError("the torch backend's slots mode (static shapes, CUDA graphs) needs a batch size")
        self.graph_capture = graph_capture
        self.graph: StepGraph | None = None
        if model is not None:
            self.noise_shape = _noise_shape(model.config)
        self._done: torch.Tensor | None = None  # slots mode: rows frozen by `freeze`
        self._graphs: dict[int, _Captured | None] = {}  # static batch -> its graph (None: capture failed)
        self.graph_failure: str | None = None

    @classmethod
    def unavailable_reason(cls, artifact: "Artifact", precision: str) -> str | None:
        if precision not in PRECISION_DTYPES:
            return "the torch backend runs fp32 and fp16 (and bf16 via dtype); use onnxruntime or tensorrt for int8"
        if precision != "fp32" and not torch.cuda.is_available():  # chosen by name (auto, reports): GPUs only
            return (f"{precision} runs on a CUDA device (on the CPU half precision is slower than fp32); "
                    f"use --backend onnxruntime --precision {precision}")
        if weights_of(artifact) is None:
            return "needs the model's weights (a checkpoint, bundled name or preset), not only ONNX/engine files"
        return None

    @classmethod
    def from_artifact(cls, artifact: "Artifact", precision: str, device: str | int | None = "cpu",
                      dtype: str | None = None, batch_size: int | None = None, static_shapes: bool = False,
                      cuda_graphs: bool = False, graph_capture: Any = None, **_: Any) -> "TorchBackend":
        backend = cls(loader=weights_of(artifact), device=device, precision=precision, dtype=dtype,
                      batch_size=batch_size, static_shapes=static_shapes, cuda_graphs=cuda_graphs,
                      graph_capture=graph_capture)
        if artifact.config is not None:
            backend.noise_shape = _noise_shape(artifact.config)
        return backend

    @property
    def half(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return None if self.dtype_name == "fp32" else DTYPES[self.dtype_name]

    def activate_impl(self) -> None:
        if self.model is None:
            from eqr.model.load import load_model

            self.model = load_model(self.loader)
        model = self.model
        if self.half is not None and model.dtype != torch.float32:
            model = _float32_twin(model)  # autocast over an fp32 residual stream: the norms stay fp32
        self.graph = StepGraph(model.to(self.device).eval())
        self.noise_shape = _noise_shape(model.config)  # the model takes the noise addends directly
        if self.static_shapes:
            self.max_batch = int(self.batch_size)
            self._done = torch.zeros(self.max_batch, dtype=torch.bool, device=self.device)
        self._graphs = {}
        if self.cuda_graphs and self.graph_capture is None:
            if self.device.type == "cuda":
                self.graph_capture = CudaGraphCapture(self.device)
            else:
                self._give_up_graphs(f"CUDA graphs need a CUDA device, not {self.device}")

    def deactivate_impl(self) -> None:
        self.graph = None
        self._graphs = {}
        self._done = None
        if self.loader is not None:
            self.model = None  # loaded here, so released here

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.half is None:
            return contextlib.nullcontext()
        # no cast cache: a cached cast inside a CUDA-graph capture would outlive it (torch's advice)
        return torch.autocast(self.device.type, dtype=self.half, cache_enabled=False)

    def _run(self, tokens: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor,
             done: torch.Tensor | None, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        with self._autocast():
            return self.graph(tokens, z_H, z_L, done, noise)

    @torch.inference_mode()
    def step_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        done, noise = None, feeds.get(NOISE_INPUT)
        if self.static_shapes:
            B = feeds["tokens"].shape[0]
            if B != self.max_batch:
                raise ValueError(f"slots mode runs {self.max_batch} rows, got {B}")
            done = self._done
            if self.cuda_graphs and noise is None:  # noisy steps run eagerly (the graph has no noise input)
                captured = self._captured(B)
                if captured is not None:
                    return self._replay(captured, feeds)
        outputs = self._run(feeds["tokens"], feeds["z_H"], feeds["z_L"], done, noise)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest step times (the loop reads them)
        return dict(zip(OUTPUT_NAMES, outputs))

    def _captured(self, B: int) -> _Captured | None:
        """The graph of static batch B, captured on first use (None: capture failed, eager)."""
        if B not in self._graphs:
            self._graphs[B] = None
            if self.cuda_graphs:
                L, D = self.graph.model.config.seq_len, self.graph.model.config.hidden_size
                inputs = {"tokens": torch.zeros(B, L, dtype=torch.int32, device=self.device),
                          "z_H": torch.zeros(B, L, D, device=self.device),
                          "z_L": torch.zeros(B, L, D, device=self.device),
                          "done": torch.zeros(B, dtype=torch.bool, device=self.device)}
                try:
                    replay, outputs = self.graph_capture.capture(lambda: self._run(*(inputs[n] for n in STEP_INPUTS)))
                    self._graphs[B] = _Captured(inputs, replay, outputs)
                except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
                    if self.device.type == "cuda":
                        with contextlib.suppress(Exception):
                            torch.cuda.synchronize(self.device)
                    self._give_up_graphs(f"{type(e).__name__}: {e}".splitlines()[0])
        return self._graphs[B]

    def _give_up_graphs(self, why: str) -> None:
        self.cuda_graphs = False
        self.graph_failure = why
        log.warning("torch backend: CUDA-graph capture failed (%s); running eager steps instead", why)

    def _replay(self, captured: _Captured, feeds: Mapping[str, Any]) -> dict[str, Any]:
        for name in STEP_INPUTS:
            value = self._done if name == "done" else feeds[name]
            if value.data_ptr() != captured.inputs[name].data_ptr():
                captured.inputs[name].copy_(value)
        captured.replay()
        states = captured.states[captured.turn]
        captured.turn = 1 - captured.turn
        for _, out in STATE_PAIRS:
            states[out].copy_(captured.outputs[out])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {name: states.get(name, captured.outputs[name]) for name in OUTPUT_NAMES}

    @torch.inference_mode()
    def put(self, array: torch.Tensor, rows: np.ndarray, values: torch.Tensor) -> torch.Tensor:
        if not self.static_shapes:
            return super().put(array, rows, values)
        array.index_copy_(0, torch.as_tensor(rows, dtype=torch.long, device=array.device), values.to(array.dtype))
        return array

    def freeze(self, done: np.ndarray) -> None:
        if not self.static_shapes:
            return super().freeze(done)
        if done.shape != (self.max_batch,):
            raise ValueError(f"freeze: mask of shape {done.shape} for {self.max_batch} slots")
        self._done.copy_(torch.from_numpy(np.ascontiguousarray(done, np.bool_)))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, Any]:
        info = {"backend": self.name, "device": str(self.device), "precision": self.precision}
        if self.dtype_name != PRECISION_DTYPES[self.precision]:
            info["dtype"] = self.dtype_name
        if self.static_shapes:
            info |= {"static_shapes": True, "batch_size": self.max_batch or self.batch_size,
                     "cuda_graphs": self.cuda_graphs}
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info


def _noise_shape(config: Any) -> tuple[int, int, int]:
    """(U, L, D) of the noise addends the model's step takes."""
    return config.updates_per_step, config.seq_len, config.hidden_size


def _float32_twin(model: EqRModel) -> EqRModel:
    """The same weights with an fp32 forward dtype (a bf16-configured checkpoint), so autocast keeps
    the norms and the state in fp32."""
    twin = EqRModel(replace(model.config, forward_dtype="float32"))
    twin.load_state_dict(model.state_dict())
    twin.source, twin.metadata = model.source, model.metadata
    return twin.eval()


def checkpoint_artifact(location: str) -> Artifact:
    """A checkpoint path, bundled name or preset as an `Artifact` (one-line EqRError for unknown names)."""
    from eqr.contract.config import PRESETS
    from eqr.model.checkpoint import read_checkpoint
    from eqr.model.load import resolve

    kind, resolved = resolve(location)
    task = None
    if kind == "preset":
        config = PRESETS[resolved][0]
    else:
        ckpt = read_checkpoint(resolved)
        config = ckpt.config
        task = ckpt.metadata.get("task") if isinstance(ckpt.metadata, dict) else None
    return Artifact(kind="checkpoint", location=location, seq_len=config.seq_len, hidden_size=config.hidden_size,
                    vocab_size=config.vocab_size, init_std=(config.H_init_std, config.L_init_std), config=config,
                    task=task if isinstance(task, dict) else None, checkpoint=location)


def weights_of(artifact: Artifact) -> str | None:
    """The checkpoint an artifact runs from: its own, or the one an export came from while it is
    still here unchanged (then the torch backend can run an export too)."""
    if artifact.checkpoint is not None:
        return artifact.checkpoint
    source = artifact.source
    if not source or source.get("kind") in (None, "init") or not source.get("location"):
        return None
    from eqr.contract.io import sha256_file
    from eqr.model.load import resolve

    try:
        _, resolved = resolve(source["location"])
    except EqRError:
        return None
    if source.get("sha256") and Path(resolved).is_file() and sha256_file(resolved) != source["sha256"]:
        return None  # the file changed since the export: it is not these weights any more
    return str(source["location"])
