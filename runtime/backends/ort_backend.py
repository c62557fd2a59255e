"""ONNX Runtime backend: the exported step run through IOBinding with ping-pong state buffers.

z_H/z_L live in two preallocated OrtValues per state on the session's device; each step binds
the one that was not just read as its output, so the state never round-trips through numpy.
Only preds, residual, logit_delta and q_halt are bound to host memory. Compaction and refills
run tiny Gather/Concat graphs on the same provider, so they stay on the device too. A step fed
`noise` (path noise) runs the precision's noisy step graph instead, a second session built on the
first such step (the export's `model.step.noisy.onnx`; none: `noise_shape` is None).

On the CPU provider a step larger than `row_block` rows runs as consecutive blocks of rows bound
by pointer into the same input and output buffers: the same graph and outputs bit for bit, with a
smaller working set per run (the paper-size step at batch 64: 6% faster in blocks of 24 rows on an
idle machine, more beside other work; docs/performance.md#the-fp32-step-and-the-cache).

Providers: CPU here; CUDA and TensorRT providers when the installed onnxruntime has them and
`providers` is left to choose (`eqr solve --backend auto`). With `require_provider`, the first of
`providers` must be the one that runs (`eqr solve --provider cuda`): ONNX Runtime itself falls
back to the CPU silently when a GPU provider is missing or fails to initialise.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eqr.contract.artifact import INPUT_NAMES, NOISE_INPUT, OUTPUT_NAMES, STEP_FEEDS, cpu_precision
from eqr.contract.errors import EqRError, missing_extra
from eqr.runtime.backends.base import STATE_NAMES, STATE_OUTPUTS, Backend

if TYPE_CHECKING:
    from eqr.contract.artifact import Artifact

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
HOST_OUTPUTS = ("preds", "residual", "logit_delta", "q_halt")  # read by the loop every step
_ONNX_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
                  "tensor(int64)": np.int64, "tensor(bool)": np.bool_}
# A CPU step runs in blocks of rows whose latent state (z_H, one row: L * D float32) fits this
# many bytes together: 25 rows at the paper size (L 81, D 512; 24 and 32 rows measured best of
# 8-32), no blocks for the bundled models at batch 64 (docs/performance.md#the-fp32-step-and-the-cache).
ROW_BLOCK_STATE_BYTES = 4 << 20


def cpu_row_block(seq_len: int, hidden: int) -> int:
    """Rows per block of a CPU step for a model of this sequence length and width."""
    return max(1, ROW_BLOCK_STATE_BYTES // (4 * seq_len * hidden))


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise (missing_extra(e, "the onnxruntime backend") or e) from None
    return onnxruntime


def first_provider(requested: Sequence[str] | None) -> str:
    """The provider a session created with `requested` (None: PREFERRED_PROVIDERS) runs on first."""
    available = import_onnxruntime().get_available_providers()
    wanted = [p for p in requested or () if p in available] or [p for p in PREFERRED_PROVIDERS if p in available]
    return wanted[0] if wanted else "CPUExecutionProvider"


def _build_hint(artifact: "Artifact", precision: str) -> str:
    """The fix for a missing graph: run one that is there, or build this one."""
    if artifact.onnx and artifact.kind != "export":
        return f"pass --precision {next(iter(artifact.onnx))}"
    if precision == "fp32":
        return "export it with `eqr export`"
    return (f"build it with `eqr calibrate {artifact.location} --precision {precision}`, or pass --precision "
            f"{next(iter(artifact.onnx), 'fp32')}")


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, *, providers: Sequence[str] | None = None,
                 threads: int | None = None, precision: str = "fp32",
                 profile: tuple[tuple[int, int, int], int, int] | None = None, require_provider: bool = False,
                 noisy_path: str | Path | None = None, noise_shape: tuple[int, int, int] | None = None,
                 row_block: int | None = None) -> None:
        """profile: ((min, opt, max) batch, L, D) for ONNX Runtime's TensorRT provider, which
        otherwise rebuilds its engine for every new batch size that compaction produces.
        noisy_path: the precision's noisy step graph, with `noise_shape` (U, L, D) of its noise
        input; its session is built on the first noisy step.
        row_block: rows per block of a CPU step (None: `cpu_row_block` of the graph's L and D; 0: whole)."""
        super().__init__()
        self.row_block = row_block
        self._block = 0  # rows per block of this session's steps, set at activate() (0: whole steps)
        self.onnx_path = Path(onnx_path)
        self.noisy_path = Path(noisy_path) if noisy_path is not None else None
        self.noise_shape = noise_shape if self.noisy_path is not None else None
        self._noisy: tuple[Any, Any] | None = None  # (session, io binding) of the noisy graph, once used
        self._providers: list[str] = []  # the providers chosen at activate(), in order
        self.profile = profile
        self.requested_providers = list(providers) if providers else None
        self.require_provider = require_provider and bool(providers)
        self.threads = threads
        self.precision = precision
        self.session: Any = None
        self.device = "cpu"
        self._pairs: dict[str, list[Any]] = {}  # state name -> its two ping-pong OrtValues
        self._ops: dict[tuple[str, int, int, int], Any] = {}  # (op, onnx dtype, arity, rank) -> session
        self._not_done: dict[int, Any] = {}  # batch size -> all-False `done` OrtValue (rows are compacted instead)

    @classmethod
    def unavailable_reason(cls, artifact: "Artifact", precision: str) -> str | None:
        path = artifact.onnx.get(precision)
        if path is None:
            have = ", ".join(artifact.onnx) or "none"
            return f"no {precision} ONNX file in the artifact (has: {have}); {_build_hint(artifact, precision)}"
        if not path.is_file():
            return f"{path} is missing"
        try:
            import_onnxruntime()
        except EqRError as e:
            return str(e)
        return None

    @classmethod
    def from_artifact(cls, artifact: "Artifact", precision: str, providers: Sequence[str] | None = None,
                      threads: int | None = None, require_provider: bool = False, **_: Any) -> "OrtBackend":
        """On the CPU provider a precision runs its CPU graph when the export has one (int8 ->
        int8-cpu, `eqr.contract.artifact.cpu_precision`); GPU providers keep the graph asked for."""
        if first_provider(providers) == "CPUExecutionProvider":
            precision = cpu_precision(artifact, precision)
        noisy = artifact.noisy.get(precision)
        noise_shape = None
        if noisy is not None and noisy.is_file() and artifact.config is not None:
            noise_shape = (artifact.config.updates_per_step, artifact.seq_len, artifact.hidden_size)
        return cls(artifact.onnx[precision], providers=providers, threads=threads, precision=precision,
                   profile=(artifact.batch, artifact.seq_len, artifact.hidden_size), require_provider=require_provider,
                   noisy_path=noisy if noise_shape else None, noise_shape=noise_shape)

    # ------------------------------------------------------------------ lifecycle
    def _session_options(self, threads: int | None) -> Any:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning threads starve everything else on a shared or small machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The CPU arena kept ~113 MiB more per batch-256 step as shapes shrank under compaction.
        options.enable_cpu_mem_arena = False
        return options

    def activate_impl(self) -> None:
        ort = import_onnxruntime()
        available = ort.get_available_providers()
        if self.require_provider and self.requested_providers[0] not in available:
            self._missing_provider(f"this onnxruntime offers only {', '.join(available)}")
        requested = [p for p in self.requested_providers or () if p in available]  # the rest: fallback
        self._providers = requested or [p for p in PREFERRED_PROVIDERS if p in available]  # as first_provider
        self.session = self._load(self.onnx_path, INPUT_NAMES)
        used = self.session.get_providers()[0]
        if self.require_provider and used != self.requested_providers[0]:
            self.session = None
            self._missing_provider(f"it failed to initialise and ONNX Runtime fell back to {used}")
        self.device = "cuda" if used in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        if used == "TensorrtExecutionProvider" and self.profile is not None:
            self.max_batch = self.profile[0][2]  # batches beyond the profile would force an engine rebuild
        self._dtypes = {v.name: _ONNX_TO_NUMPY.get(v.type, np.float32)
                        for v in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self._binding = self.session.io_binding()
        self._block = self._rows_per_block()
        log.info("onnxruntime %s on %s (providers %s)", self.onnx_path.name, self.device, self.session.get_providers())

    def _rows_per_block(self) -> int:
        """0 (whole steps) off the CPU or when the graph's per-row shapes are not static."""
        per_row = [o.shape[1:] for o in (*self.session.get_inputs(), *self.session.get_outputs())]
        if self.device != "cpu" or any(not isinstance(d, int) for shape in per_row for d in shape):
            return 0
        if self.row_block is not None:
            return self.row_block
        _, L, D = next(i.shape for i in self.session.get_inputs() if i.name == "z_H")  # [B, L, D]
        return cpu_row_block(L, D)

    def _load(self, path: Path, inputs: tuple[str, ...]) -> Any:
        """A session of the step graph at `path`, whose inputs must be `inputs` (EqRError otherwise)."""
        ort = import_onnxruntime()
        providers = [self._with_options(p, noisy=NOISE_INPUT in inputs) for p in self._providers]
        try:
            session = ort.InferenceSession(str(path), self._session_options(self.threads), providers=providers)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise EqRError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        names = ({i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()})
        if names != (set(inputs), set(OUTPUT_NAMES)):
            raise EqRError(f"{path}: I/O names {sorted(names[0])} -> {sorted(names[1])} are not the eqr "
                           "step contract; re-export with `eqr export`")
        return session

    def _noisy_session(self) -> tuple[Any, Any]:
        """(session, io binding) of the noisy step graph, loaded on first use."""
        if self._noisy is None:
            session = self._load(self.noisy_path, (*INPUT_NAMES, NOISE_INPUT))
            self._noisy = (session, session.io_binding())
            log.info("onnxruntime %s loaded for noisy steps", self.noisy_path.name)
        return self._noisy

    def _missing_provider(self, why: str) -> None:
        wanted = self.requested_providers[0]
        raise EqRError(f"{wanted} is not available ({why}); install onnxruntime-gpu (pip install 'eqr[gpu]') "
                       "on a CUDA machine, or pass --fallback to run on the CPU provider")

    def _with_options(self, provider: str, noisy: bool = False) -> Any:
        """TensorRT provider: an optimization profile over the batch axis and a persistent engine cache."""
        if provider != "TensorrtExecutionProvider" or self.profile is None:
            return provider
        (lo, opt, hi), L, D = self.profile
        U = self.noise_shape[0] if noisy and self.noise_shape else None

        def shapes(b: int) -> str:
            noise = f",{NOISE_INPUT}:{b}x{U}x{L}x{D}" if U else ""
            return f"tokens:{b}x{L},z_H:{b}x{L}x{D},z_L:{b}x{L}x{D}{noise}"

        cache = Path(tempfile.gettempdir()) / "eqr-ort-trt-cache"
        return (provider, {"trt_profile_min_shapes": shapes(lo), "trt_profile_opt_shapes": shapes(opt),
                           "trt_profile_max_shapes": shapes(hi), "trt_engine_cache_enable": True,
                           "trt_engine_cache_path": str(cache)})  # precision lives in the graph itself

    def deactivate_impl(self) -> None:
        self._pairs.clear()
        self._ops.clear()
        self._not_done.clear()
        self._binding = None
        self._noisy = None
        self.session = None

    def describe(self) -> dict[str, Any]:
        providers = self.session.get_providers() if self.session is not None else self.requested_providers
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "onnx": str(self.onnx_path), "providers": providers}

    # ------------------------------------------------------------------ the step
    def _output_buffer(self, state: str, given: Any) -> Any:
        """The ping-pong buffer of `state` that is not `given` (allocated for its shape if needed)."""
        shape = given.shape()
        pair = self._pairs.get(state)
        if pair is None or pair[0].shape() != shape:
            ort = import_onnxruntime()
            dtype = self._dtypes[STATE_OUTPUTS[state]]
            pair = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, 0) for _ in range(2)]
            self._pairs[state] = pair  # the previous batch size's pair is released here
        return pair[1] if pair[0].data_ptr() == given.data_ptr() else pair[0]

    def step_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        noisy = NOISE_INPUT in feeds
        session, binding = self._noisy_session() if noisy else (self.session, self._binding)
        if 0 < self._block < feeds["tokens"].shape()[0]:
            return self._step_in_blocks(session, binding, feeds, noisy)
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name in (*STEP_FEEDS, NOISE_INPUT) if noisy else STEP_FEEDS:
            binding.bind_ortvalue_input(name, feeds[name])
        binding.bind_ortvalue_input("done", self._done_for(feeds["tokens"].shape()[0]))
        states = {STATE_OUTPUTS[s]: self._output_buffer(s, feeds[s]) for s in STATE_NAMES}
        for name in OUTPUT_NAMES:
            if name in states:
                binding.bind_ortvalue_output(name, states[name])
            else:
                binding.bind_output(name, "cpu" if name in HOST_OUTPUTS else self.device)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()  # in binding order, state buffers included
        outputs = dict(zip(OUTPUT_NAMES, values))
        outputs.update(states)  # keep our own buffer objects so the next step can tell them apart
        return outputs

    def _step_in_blocks(self, session: Any, binding: Any, feeds: Mapping[str, Any], noisy: bool) -> dict[str, Any]:
        """The step run on consecutive blocks of `_block` rows, each bound by pointer into the
        whole batch's inputs and outputs (host memory: the CPU provider only)."""
        ort = import_onnxruntime()
        B = feeds["tokens"].shape()[0]
        inputs = {name: feeds[name] for name in ((*STEP_FEEDS, NOISE_INPUT) if noisy else STEP_FEEDS)}
        inputs["done"] = self._done_for(B)
        outputs = {STATE_OUTPUTS[s]: self._output_buffer(s, feeds[s]) for s in STATE_NAMES}
        for o in session.get_outputs():
            if o.name not in outputs:
                outputs[o.name] = ort.OrtValue.ortvalue_from_shape_and_type([B, *o.shape[1:]],
                                                                          _ONNX_TO_NUMPY[o.type], "cpu", 0)
        for start in range(0, B, self._block):
            rows = min(self._block, B - start)
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for name, value in inputs.items():
                binding.bind_input(name, "cpu", 0, *_rows_of(value, start, rows))
            for name, value in outputs.items():
                binding.bind_output(name, "cpu", 0, *_rows_of(value, start, rows))
            session.run_with_iobinding(binding)
        return {name: outputs[name] for name in OUTPUT_NAMES}

    def _done_for(self, B: int) -> Any:
        if B not in self._not_done:
            ort = import_onnxruntime()
            self._not_done[B] = ort.OrtValue.ortvalue_from_numpy(np.zeros(B, bool), self.device, 0)
        return self._not_done[B]

    # ------------------------------------------------------------------ device arrays
    def upload(self, array: np.ndarray) -> Any:
        ort = import_onnxruntime()
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(self._dtypes["z_H"], copy=False)
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def download(self, array: Any) -> np.ndarray:
        return array.numpy()

    def take(self, array: Any, rows: np.ndarray) -> Any:
        ort = import_onnxruntime()
        indices = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(rows, dtype=np.int64), self.device, 0)
        return self._run_op("gather", [array, indices])

    def concat(self, arrays: Sequence[Any]) -> Any:
        arrays = list(arrays)
        return arrays[0] if len(arrays) == 1 else self._run_op("concat", arrays)

    def _run_op(self, op: str, inputs: list[Any]) -> Any:
        session = self._op_session(op, inputs[0].element_type(), len(inputs), len(inputs[0].shape()))
        binding = session.io_binding()
        for i, value in enumerate(inputs):
            binding.bind_ortvalue_input(f"x{i}", value)
        binding.bind_output("y", self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _op_session(self, op: str, elem_type: int, arity: int, rank: int) -> Any:
        key = (op, elem_type, arity, rank)
        if key not in self._ops:
            ort = import_onnxruntime()
            model = _array_op_model(op, elem_type, arity, rank)
            # Gather/Concat are memory moves: the CUDA provider (or CPU) does them without a TensorRT build.
            providers = [p for p in self.session.get_providers() if p != "TensorrtExecutionProvider"]
            self._ops[key] = ort.InferenceSession(model.SerializeToString(), self._session_options(1),
                                                  providers=providers)
        return self._ops[key]


def _rows_of(value: Any, start: int, rows: int) -> tuple[Any, list[int], int]:
    """(numpy dtype, shape, pointer) of rows [start, start + rows) of a host OrtValue (rows are contiguous)."""
    dtype = np.dtype(_ONNX_TO_NUMPY[value.data_type()])
    shape = value.shape()
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    return dtype.type, [rows, *shape[1:]], value.data_ptr() + start * row_bytes


def _array_op_model(op: str, elem_type: int, arity: int, rank: int) -> Any:
    """A one-node ONNX graph: Gather(x0, x1 indices) or Concat(x0..x{n-1}) along axis 0."""
    from onnx import TensorProto, helper

    dims = [f"d{i}" for i in range(rank)]
    if op == "gather":
        inputs = [helper.make_tensor_value_info("x0", elem_type, dims),
                  helper.make_tensor_value_info("x1", TensorProto.INT64, ["r"])]
        node = helper.make_node("Gather", ["x0", "x1"], ["y"], axis=0)
    else:
        inputs = [helper.make_tensor_value_info(f"x{i}", elem_type, [f"b{i}", *dims[1:]]) for i in range(arity)]
        node = helper.make_node("Concat", [f"x{i}" for i in range(arity)], ["y"], axis=0)
    output = helper.make_tensor_value_info("y", elem_type, ["n", *dims[1:]])
    graph = helper.make_graph([node], f"eqr_{op}", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
