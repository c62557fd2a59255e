"""Native TensorRT backend (TRT 10/11 Python API) on cuda-python: no torch.

Device and pinned host memory, copies, the stream, and CUDA graphs all go through
`cuda.bindings.runtime` (cuda-python; `cuda.cudart` on releases before 12.6). TensorRT and
cuda-python are imported lazily: `import eqr` never needs them, and the tests skip this backend
without a GPU.

Every copy the loop asks for (uploads, row gathers, slot refills, the done mask) and every engine
run is issued on the backend's one stream, so stream order alone makes each step read finished
inputs. The four outputs the loop reads every step (preds, residual, logit_delta, q_halt) are
copied into pinned host buffers on that stream after the engine runs; the step then waits for
the stream once.

Two modes:
- cuda_graphs=True (static shapes; static_shapes=True alone runs the same without graphs): one fixed batch of `batch_size` slots and two CUDA graphs,
  A (state buffer 0 -> 1) and B (1 -> 0). TensorRT documents re-binding a context's addresses
  after a capture as undefined, so each graph has its own execution context, bound once; the two
  share one USER_MANAGED scratch allocation (they never run at the same time: one stream). Each
  context runs once before its capture (TensorRT allocates and selects lazily on the first
  run), and capture is thread-local so another thread's CUDA calls cannot invalidate it. Frozen
  rows keep their state through the graph's own `done` input (eqr/contract/artifact.py); the loop
  freezes settled rows and refills slots instead of compacting.
- cuda_graphs=False (dynamic shapes): one context, `set_input_shape` per call, so compaction
  shrinks the work; every output is a fresh array of the batch's rows; `done` is all False.
TensorRT does not allow inputs and outputs to alias, hence the two state buffers.
- noisy steps (a `noise` feed, path noise): the engine of the noisy step graph, deserialized on
  the first such step, runs with its own context bound per call and fresh outputs, in either
  mode (no graph replay); static slots still feed their done mask.

Device arrays (uploads, gathers, concats, dynamic-mode outputs) are row views of max-batch blocks
from a pool (`_Pool`) reserved at activation and reused when an array is dropped: cudaMalloc and
cudaFree synchronize the device, so none runs per step, per gather or when the batch shrinks.

A CUDA graph that cannot be captured or instantiated (a driver or TensorRT without capture
support for some kernel) ends its capture, clears the error, and the backend runs plain enqueues
instead, with one warning, as trtexec does.
"""
from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eqr.contract.artifact import INPUT_NAMES, NOISE_INPUT, OUTPUT_NAMES, STEP_FEEDS
from eqr.contract.errors import EqRError, missing_extra
from eqr.contract.trt_engine import check_engine, cuda_gpu, rebuild_hint, trt_logger
from eqr.runtime.backends.base import STATE_NAMES, STATE_OUTPUTS, Backend

if TYPE_CHECKING:
    from eqr.contract.artifact import Artifact

log = logging.getLogger(__name__)

ALIGNMENT = 256  # bytes: TensorRT's requirement for I/O tensor addresses and context memory
HOST_OUTPUTS = ("preds", "residual", "logit_delta", "q_halt")  # read by the loop every step


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:  # on Jetson, JetPack's system tensorrt (a venv with --system-site-packages)
        raise (missing_extra(e, "the tensorrt backend") or e) from None
    return tensorrt


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as e:  # its major version follows the driver's CUDA
            raise (missing_extra(e, "the tensorrt backend (cuda-python)") or e) from None
    return runtime


def cuda_mismatch(cudart: Any) -> str | None:
    """Why cuda-python cannot run on this driver (its major CUDA above the driver's), else None.
    Without this the CUDA runtime answers "insufficient driver" as if there were no device."""
    err, driver = cudart.cudaDriverGetVersion()
    if int(err) != 0 or int(driver) == 0:
        return "no CUDA driver found (libcuda); install the NVIDIA driver (JetPack on Jetson)"
    err, runtime = cudart.cudaRuntimeGetVersion()
    if int(err) != 0 or int(runtime) // 1000 <= int(driver) // 1000:
        return None
    major = int(runtime) // 1000
    return (f"cuda-python {major} needs a CUDA {major} driver; this driver supports CUDA {int(driver) // 1000}."
            f"{int(driver) % 1000 // 10}: pip install \"cuda-python<{major}\"")


def cuda_check(result: Any, what: str) -> Any:
    """cuda-python returns (cudaError_t, *values): raise on an error, else the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EqRError(f"CUDA error in {what}: {_error_text(import_cudart(), err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _error_text(cudart: Any, err: Any) -> str:
    text = cudart.cudaGetErrorString(err)
    text = text[1] if isinstance(text, tuple) else text
    text = text.decode() if isinstance(text, bytes) else str(text)
    return f"{text} ({int(err)})"


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int64: np.int64,
             trt.bool: np.bool_}
    if dtype not in table:
        raise EqRError(f"engine tensor dtype {dtype} is not supported by the eqr runtime; rebuild the engine")
    return np.dtype(table[dtype])


# --------------------------------------------------------------------------- device memory


class _Allocation:
    """cudaMalloc'd (or cudaMallocHost'd) bytes, freed when the last holder lets go."""

    def __init__(self, nbytes: int, pinned: bool = False) -> None:
        cudart = import_cudart()
        size = max(int(nbytes), 1)
        alloc, free = (cudart.cudaMallocHost, cudart.cudaFreeHost) if pinned else (cudart.cudaMalloc, cudart.cudaFree)
        self.ptr = int(cuda_check(alloc(size), "cudaMallocHost" if pinned else "cudaMalloc"))
        self.nbytes = size
        self._free = weakref.finalize(self, free, self.ptr)

    def free(self) -> None:
        self._free()


class _Lease:
    """A pool block lent to the arrays viewing it: back to the pool when the last one is dropped."""

    def __init__(self, pool: "_Pool", key: tuple, block: _Allocation) -> None:
        self.ptr, self.nbytes = block.ptr, block.nbytes
        weakref.finalize(self, pool.give_back, key, block)


class _Pool:
    """Device blocks of `rows` rows (the profile's max batch) per row shape and dtype, reused.

    Arrays of up to `rows` rows are row views of a block; a block returns to the pool when the
    arrays on it are dropped. All its users queue work on one stream, so a reused block is written
    only after the work that read it. Freed (all at once) by `close`."""

    def __init__(self, rows: int) -> None:
        self.rows = int(rows)
        self.free: dict[tuple, list[_Allocation]] = {}
        self.blocks: list[_Allocation] = []
        self.closed = False

    def reserve(self, row_shape: Sequence[int], dtype: Any, count: int) -> None:
        key = self._key(row_shape, dtype)
        free = self.free.setdefault(key, [])
        while len(free) < count:
            free.append(self._block(key))

    def array(self, shape: Sequence[int], dtype: Any) -> "DeviceArray":
        shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        if not shape or shape[0] > self.rows:  # beyond the profile (refused by the engine anyway)
            return device_array(shape, dtype)
        key = self._key(shape[1:], dtype)
        free = self.free.setdefault(key, [])
        if not free:
            log.debug("device pool: one more block of %s x %s %s", self.rows, key[0], key[1])
        lease = _Lease(self, key, free.pop() if free else self._block(key))
        return DeviceArray(lease.ptr, shape, dtype, lease)

    def give_back(self, key: tuple, block: _Allocation) -> None:
        if not self.closed:
            self.free.setdefault(key, []).append(block)

    def close(self) -> None:
        self.closed = True
        for block in self.blocks:
            block.free()
        self.blocks.clear()
        self.free.clear()

    def _key(self, row_shape: Sequence[int], dtype: Any) -> tuple:
        return tuple(int(s) for s in row_shape), np.dtype(dtype).str

    def _block(self, key: tuple) -> _Allocation:
        block = _Allocation(self.rows * int(np.prod(key[0], dtype=np.int64)) * np.dtype(key[1]).itemsize)
        self.blocks.append(block)
        return block


@dataclass
class DeviceArray:
    """A C-contiguous device buffer: the TensorRT backend's array type.

    `host` is a pinned mirror the step fills (the per-step host outputs); `download` then reads
    it instead of copying again. Views share their parent's allocation."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: _Allocation | _Lease  # keeps the memory alive as long as the array (and its views)
    host: np.ndarray | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def rows(self, n: int) -> "DeviceArray":
        """The first n rows (a view: same pointer, still contiguous and aligned)."""
        host = None if self.host is None else self.host[:n]
        return DeviceArray(self.ptr, (n, *self.shape[1:]), self.dtype, self.owner, host)


def device_array(shape: Sequence[int], dtype: Any) -> DeviceArray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    allocation = _Allocation(nbytes)
    return DeviceArray(allocation.ptr, tuple(int(s) for s in shape), dtype, allocation)


def pinned_array(shape: Sequence[int], dtype: Any) -> tuple[np.ndarray, _Allocation]:
    """A numpy array over page-locked host memory (copies captured in a CUDA graph need it)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    allocation = _Allocation(nbytes, pinned=True)
    raw = (ctypes.c_uint8 * allocation.nbytes).from_address(allocation.ptr)
    return np.ctypeslib.as_array(raw)[:nbytes].view(dtype).reshape(shape), allocation


def row_runs(dst_rows: np.ndarray, src_rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(first dst row, first src row, count) for each run consecutive on both sides: a row
    gather or scatter as few contiguous copies."""
    runs: list[tuple[int, int, int]] = []
    for d, s in zip(np.asarray(dst_rows, np.int64).tolist(), np.asarray(src_rows, np.int64).tolist()):
        if runs and runs[-1][0] + runs[-1][2] == d and runs[-1][1] + runs[-1][2] == s:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((d, s, 1))
    return runs


# --------------------------------------------------------------------------- the backend


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine_path: str | Path, *, precision: str = "fp32", batch_size: int | None = None,
                 cuda_graphs: bool = True, device: int = 0, static_shapes: bool | None = None,
                 noisy_engine_path: str | Path | None = None, noise_shape: tuple[int, int, int] | None = None) -> None:
        """static_shapes defaults to cuda_graphs; static_shapes=True with cuda_graphs=False runs the
        same fixed slots and bound contexts with a plain enqueue per step (what graph replay must
        equal bit for bit). noisy_engine_path: the engine of the precision's noisy step graph, with
        `noise_shape` (U, L, D) of its noise input; loaded on the first noisy step, which it runs
        with a plain enqueue on its own context (fresh outputs, every mode)."""
        super().__init__()
        self.engine_path = Path(engine_path)
        self.noisy_engine_path = Path(noisy_engine_path) if noisy_engine_path is not None else None
        self.noise_shape = noise_shape if self.noisy_engine_path is not None else None
        self._noisy: tuple[Any, Any] | None = None  # (engine, context) of the noisy engine, once used
        self.precision = precision
        self.requested_batch = batch_size
        self.cuda_graphs = cuda_graphs  # False after a failed capture, until the next activation
        self._want_graphs = cuda_graphs
        self.static_shapes = cuda_graphs if static_shapes is None else static_shapes
        if cuda_graphs and not self.static_shapes:
            raise ValueError("CUDA-graph replay needs static shapes")
        self.device = int(device)
        self.batch_size: int | None = None  # static slot count, fixed at activate()
        self._pairs: dict[str, list[DeviceArray]] = {}  # state -> ping-pong buffers (current shape)
        self._outs: dict[str, DeviceArray] = {}  # non-state outputs (current shape)
        self._graphs: list[tuple[Any, dict[str, DeviceArray]]] = []  # (graph exec, outputs) per source
        self._keep: list[Any] = []  # pinned buffers and scratch memory, freed at deactivate
        self._pool: _Pool | None = None  # every array the backend hands out (activate to deactivate)

    @classmethod
    def unavailable_reason(cls, artifact: "Artifact", precision: str) -> str | None:
        if precision not in artifact.engines:
            return (f"no {precision} TensorRT engine in the artifact; build one on the target GPU with "
                    f"`eqr engine EXPORT_DIR --precision {precision}`")
        try:
            import_tensorrt()
            cudart = import_cudart()
        except (EqRError, ImportError) as e:  # ImportError: cuda-python present, its driver library not
            return str(e)
        mismatch = cuda_mismatch(cudart)
        if mismatch:
            return mismatch
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return "no CUDA device visible to the CUDA runtime"
        return None

    @classmethod
    def from_artifact(cls, artifact: "Artifact", precision: str, batch_size: int | None = None,
                      cuda_graphs: bool = True, device: int = 0, **_: Any) -> "TensorRTBackend":
        noisy = artifact.noisy_engines.get(precision)
        noise_shape = None
        if noisy is not None and artifact.config is not None:
            noise_shape = (artifact.config.updates_per_step, artifact.seq_len, artifact.hidden_size)
        return cls(artifact.engines[precision], precision=precision, batch_size=batch_size,
                   cuda_graphs=cuda_graphs, device=device, noisy_engine_path=noisy if noise_shape else None,
                   noise_shape=noise_shape)

    # ------------------------------------------------------------------ lifecycle
    def _use_device(self) -> None:
        """Make this backend's GPU current for the calling thread (the scheduler steps from its own)."""
        cuda_check(self.cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")

    def activate_impl(self) -> None:
        trt = import_tensorrt()
        self.cuda_graphs = self._want_graphs
        self.cudart = import_cudart()
        meta = check_engine(self.engine_path, device=self.device)  # same TensorRT, same GPU, unchanged ONNX
        self._use_device()  # TensorRT deserializes and creates contexts on the current device
        self.runtime = trt.Runtime(trt_logger())  # its messages go to logging (stderr), never stdout
        if meta.get("dla_core") is not None:
            self.runtime.DLA_core = int(meta["dla_core"])
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EqRError(f"{self.engine_path}: TensorRT {trt.__version__} cannot load this engine (built for "
                           f"another TensorRT version or GPU); {rebuild_hint(self.engine_path, self.precision)}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted((*INPUT_NAMES, *OUTPUT_NAMES)):
            raise EqRError(f"{self.engine_path}: I/O tensors {names} are not the eqr step contract; "
                           f"{rebuild_hint(self.engine_path, self.precision)}")
        self.dtypes = {n: _numpy_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = [int(s[0]) for s in self.engine.get_tensor_profile_shape("tokens", 0)]  # min, opt, max
        self.seq_len = int(self.engine.get_tensor_shape("tokens")[1])
        self.hidden = int(self.engine.get_tensor_shape("z_H")[2])
        self.vocab = int(self.engine.get_tensor_shape("logits")[2])
        self.stream = cuda_check(self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking),
                                 "cudaStreamCreateWithFlags")
        self.max_batch = self.profile[2]
        self._host, self._host_memory = self._pinned_outputs(self.max_batch)
        if self.static_shapes:
            self.batch_size = self.max_batch = min(self.requested_batch or self.profile[1], self.profile[2])
        self._pool = _Pool(self.max_batch)
        if self.static_shapes:
            self._static_slots(trt)
        else:
            self._reserve_dynamic()
            self.context = self._context(trt, trt.ExecutionContextAllocationStrategy.STATIC)
            self._done = self._zeroed((self.max_batch,), np.bool_)  # all False: compaction, not freezing

    def _reserve_dynamic(self) -> None:
        """The pool's blocks for a compacting loop, all allocated now: the loop's peak, measured on
        fake_cuda (a step's state inputs and outputs with the copies an admission concatenates: 8
        state blocks; tokens and preds: 4; logits: 2; the per-row outputs: 6). A busier caller (a
        cascade) grows the pool once, at its own peak."""
        L, D, V = self.seq_len, self.hidden, self.vocab
        state = self.dtypes["z_H"]
        for row_shape, dtype, count in (((L, D), state, 8), ((L,), np.int32, 4), ((L, V), self.dtypes["logits"], 2),
                                        ((), np.float32, 6)):
            self._pool.reserve(row_shape, dtype, count)

    def deactivate_impl(self) -> None:
        cudart = getattr(self, "cudart", None)
        if cudart is not None and getattr(self, "stream", None) is not None:
            cudart.cudaStreamSynchronize(self.stream)
        for graph_exec, _ in self._graphs:
            if graph_exec is not None:
                cudart.cudaGraphExecDestroy(graph_exec)
        self._graphs = []
        self._contexts: list[Any] = []
        self.context = None
        self._noisy = None
        self.engine = None
        self.runtime = None
        for held in (*self._keep, *[a.owner for pair in self._pairs.values() for a in pair],
                     *[a.owner for a in self._outs.values()]):
            held.free()
        self._keep.clear()
        self._pairs.clear()
        self._outs.clear()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if cudart is not None and getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def synchronize(self) -> None:
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def describe(self) -> dict[str, Any]:
        info = {"backend": self.name, "device": f"cuda:{self.device}", "precision": self.precision,
                "engine": str(self.engine_path), "cuda_graphs": self.cuda_graphs, "static_shapes": self.static_shapes,
                "batch_size": self.batch_size}
        if self.engine is not None:  # what actually runs: the TensorRT library and the GPU
            gpu = cuda_gpu(self.device)
            info |= {"tensorrt": import_tensorrt().__version__, "gpu": gpu.name if gpu else None}
        return info

    # ------------------------------------------------------------------ contexts and buffers
    def _context(self, trt: Any, strategy: Any) -> Any:
        context = self.engine.create_execution_context(strategy)
        if context is None:
            raise EqRError(f"{self.engine_path}: TensorRT could not create an execution context (out of GPU memory?)")
        return context

    def _zeroed(self, shape: Sequence[int], dtype: Any) -> DeviceArray:
        array = device_array(shape, dtype)
        cuda_check(self.cudart.cudaMemsetAsync(array.ptr, 0, array.nbytes, self.stream), "cudaMemsetAsync")
        self._keep.append(array.owner)
        return array

    def _pinned_outputs(self, B: int) -> tuple[dict[str, np.ndarray], list[_Allocation]]:
        shapes = {"preds": (B, self.seq_len), "residual": (B,), "logit_delta": (B,), "q_halt": (B,)}
        host, memory = {}, []
        for name, shape in shapes.items():
            host[name], allocation = pinned_array(shape, self.dtypes[name])
            memory.append(allocation)
        self._keep.extend(memory)
        return host, memory

    def _static_buffers(self, B: int) -> None:
        """The static slots' ping-pong state buffers and output buffers, B rows each."""
        L, D = self.seq_len, self.hidden
        for state in STATE_NAMES:
            dtype = self.dtypes[STATE_OUTPUTS[state]]
            self._pairs[state] = [device_array((B, L, D), dtype) for _ in range(2)]
        self._outs = {n: device_array(s, self.dtypes[n]) for n, s in self._output_shapes(B).items()}
        for name in HOST_OUTPUTS:
            self._outs[name].host = self._host[name][:B]

    def _output_shapes(self, B: int) -> dict[str, tuple[int, ...]]:
        L, V = self.seq_len, self.vocab
        return {"logits": (B, L, V), "preds": (B, L), "residual": (B,), "logit_delta": (B,), "q_halt": (B,)}

    def _fresh_outputs(self, B: int) -> dict[str, DeviceArray]:
        """Dynamic mode: every output as a new array of B rows from the pool (never aliasing an input)."""
        L, D = self.seq_len, self.hidden
        shapes = self._output_shapes(B) | {STATE_OUTPUTS[s]: (B, L, D) for s in STATE_NAMES}
        outputs = {name: self._pool.array(shape, self.dtypes[name]) for name, shape in shapes.items()}
        for name in HOST_OUTPUTS:
            outputs[name].host = self._host[name][:B]
        return outputs

    def _bind(self, context: Any, inputs: Mapping[str, DeviceArray],
              outputs: Mapping[str, DeviceArray]) -> dict[str, DeviceArray]:
        """Point `context` at `inputs` and `outputs`; every TensorRT setter's answer is checked (a
        refused shape or address would run on stale ones)."""
        B = inputs["tokens"].shape[0]
        for name, array in inputs.items():
            if array.shape[0] != B:
                raise ValueError(f"{name} has {array.shape[0]} rows, tokens {B}")
            if not context.set_input_shape(name, array.shape):
                raise EqRError(f"{self.engine_path}: TensorRT refused input shape {name}{list(array.shape)} (profile "
                               f"batch {self.profile[0]}..{self.profile[2]}); rebuild with a wider --batch")
        for name, array in {**inputs, **outputs}.items():
            self._check_pointer(name, array)
            if not context.set_tensor_address(name, array.ptr):
                raise EqRError(f"{self.engine_path}: TensorRT refused the address of {name}")
        return dict(outputs)

    def _slot_io(self, source: int) -> tuple[dict[str, DeviceArray], dict[str, DeviceArray]]:
        """Static slots: (inputs, outputs) reading state buffer `source` and writing 1 - source."""
        inputs = {"tokens": self._tokens, "done": self._done} | {s: self._pairs[s][source] for s in STATE_NAMES}
        outputs = dict(self._outs) | {STATE_OUTPUTS[s]: self._pairs[s][1 - source] for s in STATE_NAMES}
        return inputs, outputs

    def _check_pointer(self, name: str, array: Any) -> None:
        if not isinstance(array, DeviceArray):
            raise TypeError(f"{name}: expected a TensorRT backend DeviceArray (upload it first), got {type(array)}")
        if array.ptr % ALIGNMENT:
            raise ValueError(f"{name}: device address {array.ptr:#x} is not {ALIGNMENT}-byte aligned")
        if self.dtypes[name] != array.dtype:
            raise ValueError(f"{name}: dtype {array.dtype} but the engine wants {self.dtypes[name]}")

    def _enqueue(self, context: Any, outputs: Mapping[str, DeviceArray]) -> None:
        """The engine run, then the per-step host outputs into pinned memory, all on the stream."""
        if not context.execute_async_v3(int(self.stream)):
            raise EqRError(f"TensorRT execute_async_v3 failed for {self.engine_path} (see the TensorRT log above)")
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in HOST_OUTPUTS:
            array = outputs[name]
            assert array.host is not None  # _static_buffers and _fresh_outputs attach the pinned mirrors
            cuda_check(self.cudart.cudaMemcpyAsync(array.host.ctypes.data, array.ptr, array.nbytes, kind, self.stream),
                       f"cudaMemcpyAsync({name})")

    def _static_slots(self, trt: Any) -> None:
        """Static batch: context A (buffer 0 -> 1) and B (1 -> 0) sharing one scratch allocation,
        each bound once and run once, then (with cuda_graphs) captured as graphs A and B."""
        B, L = int(self.max_batch), self.seq_len
        if L < 0:
            raise EqRError(f"{self.engine_path}: sequence length must be static for CUDA-graph replay")
        self._static_buffers(B)
        for pair in self._pairs.values():
            for array in pair:  # defined values, so the warm-up runs read no garbage
                cuda_check(self.cudart.cudaMemsetAsync(array.ptr, 0, array.nbytes, self.stream), "cudaMemsetAsync")
        self._tokens = self._zeroed((B, L), np.int32)
        self._done = self._zeroed((B,), np.bool_)
        contexts = [self._context(trt, trt.ExecutionContextAllocationStrategy.USER_MANAGED) for _ in range(2)]
        bound = [self._bind(c, *self._slot_io(source)) for source, c in enumerate(contexts)]  # once each
        size = max(int(self.engine.device_memory_size_v2), *(int(c.update_device_memory_size_for_shapes())
                                                              for c in contexts))
        scratch = _Allocation(size)
        if scratch.ptr % ALIGNMENT:
            raise EqRError(f"cudaMalloc returned {scratch.ptr:#x}, not {ALIGNMENT}-byte aligned")
        self._keep.append(scratch)
        self._contexts = contexts  # kept alive as long as their graphs
        for context, outputs in zip(contexts, bound):
            context.set_device_memory(scratch.ptr, scratch.nbytes)
            self._enqueue(context, outputs)  # warm-up outside capture: TensorRT allocates and selects lazily
            cuda_check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._graphs = [(None, outputs) for outputs in bound]
        if self.cuda_graphs:
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        """Graphs A and B, or none (plain enqueues, one warning) when either cannot be made."""
        made = []
        for context, (_, outputs) in zip(self._contexts, self._graphs):
            graph_exec, why = self._capture(context, outputs)
            if graph_exec is None:
                for done in made:
                    self.cudart.cudaGraphExecDestroy(done)
                self.cuda_graphs = False
                log.warning("%s: CUDA-graph capture failed (%s); running plain enqueues instead", self.engine_path.name,
                            why)
                return
            made.append(graph_exec)
        self._graphs = [(graph_exec, outputs) for graph_exec, (_, outputs) in zip(made, self._graphs)]

    def _capture(self, context: Any, outputs: Mapping[str, DeviceArray]) -> tuple[Any, str]:
        """(executable graph of one step, "") or (None, why): a failed capture or instantiation
        still ends the capture, clears CUDA's last error and destroys what was made."""
        cudart = self.cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_check(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        why = ""
        try:
            self._enqueue(context, outputs)
        except EqRError as e:
            why = str(e)
        err, graph = cudart.cudaStreamEndCapture(self.stream)  # always: the stream leaves capture mode
        if int(err) != 0:
            cudart.cudaGetLastError()
            return None, why or f"cudaStreamEndCapture: {_error_text(cudart, err)}"
        try:
            if why:
                return None, why
            err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
            if int(err) != 0:
                cudart.cudaGetLastError()
                return None, f"cudaGraphInstantiate: {_error_text(cudart, err)}"
            return graph_exec, ""
        finally:
            cudart.cudaGraphDestroy(graph)  # the executable graph keeps what it needs

    # ------------------------------------------------------------------ the step
    def step_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self._use_device()
        for name in STEP_FEEDS:
            self._check_pointer(name, feeds[name])
        if NOISE_INPUT in feeds:
            return self._noisy_step(feeds)
        if self.static_shapes:
            source = self._source_of(feeds)
            graph_exec, outputs = self._graphs[source]
            if graph_exec is not None:
                cuda_check(self.cudart.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")
            else:
                self._enqueue(self._contexts[source], outputs)
        else:
            B = feeds["tokens"].shape[0]
            inputs = {name: feeds[name] for name in STEP_FEEDS} | {"done": self._done.rows(B)}
            outputs = self._bind(self.context, inputs, self._fresh_outputs(B))
            self._enqueue(self.context, outputs)
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")  # honest timing
        return outputs

    def _noisy_step(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """One step of the noisy engine: bound per call (the noise is new every step), every output
        a fresh array; static slots feed their done mask, so frozen rows still keep their state
        (the next noise-free step copies the state back into the ping-pong buffers)."""
        context = self._noisy_context()
        B = feeds["tokens"].shape[0]
        inputs = {name: feeds[name] for name in (*STEP_FEEDS, NOISE_INPUT)} | {"done": self._done.rows(B)}
        outputs = self._bind(context, inputs, self._fresh_outputs(B))
        self._enqueue(context, outputs)
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outputs

    def _noisy_context(self) -> Any:
        """The noisy engine's execution context, deserialized and checked on first use."""
        if self._noisy is None:
            trt = import_tensorrt()
            path = self.noisy_engine_path
            check_engine(path, device=self.device)
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EqRError(f"{path}: TensorRT {trt.__version__} cannot load this engine; "
                               f"{rebuild_hint(path, self.precision)}")
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            if sorted(names) != sorted((*INPUT_NAMES, NOISE_INPUT, *OUTPUT_NAMES)):
                raise EqRError(f"{path}: I/O tensors {names} are not the eqr noisy step contract; "
                               f"{rebuild_hint(path, self.precision)}")
            self.dtypes[NOISE_INPUT] = _numpy_dtype(trt, engine.get_tensor_dtype(NOISE_INPUT))
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.STATIC)
            if context is None:
                raise EqRError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
            self._pool.reserve(self.noise_shape, self.dtypes[NOISE_INPUT], 2)  # this step's noise and the next's
            self._noisy = engine, context
        return self._noisy[1]

    def _source_of(self, feeds: Mapping[str, Any]) -> int:
        """Static slots: the ping-pong buffer holding the input state, copying foreign feeds into
        buffer 0 and foreign tokens into the bound tokens buffer, all on the stream."""
        if feeds["tokens"].ptr != self._tokens.ptr:
            self._copy(self._tokens, feeds["tokens"])
        for source in (0, 1):
            if all(feeds[s].ptr == self._pairs[s][source].ptr for s in STATE_NAMES):
                return source
        for state in STATE_NAMES:
            self._copy(self._pairs[state][0], feeds[state])
        return 0

    def _copy(self, dst: DeviceArray, src: DeviceArray) -> None:
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ValueError(f"shape/dtype mismatch: {src.shape} {src.dtype} into {dst.shape} {dst.dtype}")
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        cuda_check(self.cudart.cudaMemcpyAsync(dst.ptr, src.ptr, src.nbytes, kind, self.stream), "cudaMemcpyAsync")

    # ------------------------------------------------------------------ device arrays
    def upload(self, array: np.ndarray) -> DeviceArray:
        self._use_device()
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(self.dtypes["z_H"], copy=False)
        elif array.dtype != np.bool_:
            array = array.astype(np.int32, copy=False)
        host = np.ascontiguousarray(array)
        out = self._pool.array(host.shape, host.dtype)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_check(self.cudart.cudaMemcpyAsync(out.ptr, host.ctypes.data, out.nbytes, kind, self.stream),
                   "cudaMemcpyAsync(upload)")
        # Pageable source: wait, so `host` may be freed. Uploads happen on admission, not per step.
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out

    def download(self, array: DeviceArray) -> np.ndarray:
        if array.host is not None:  # filled by the step, which waited for the stream
            return array.host.copy()
        self._use_device()
        out = np.empty(array.shape, array.dtype)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check(self.cudart.cudaMemcpyAsync(out.ctypes.data, array.ptr, array.nbytes, kind, self.stream),
                   "cudaMemcpyAsync(download)")
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out

    def take(self, array: DeviceArray, rows: np.ndarray) -> DeviceArray:
        """Rows gathered with one device-to-device copy per run of consecutive rows."""
        self._use_device()
        rows = np.asarray(rows, np.int64)
        out = self._pool.array((len(rows), *array.shape[1:]), array.dtype)
        self._copy_rows(out, np.arange(len(rows)), array, rows)
        return out

    def concat(self, arrays: Sequence[DeviceArray]) -> DeviceArray:
        arrays = list(arrays)
        if len(arrays) == 1:
            return arrays[0]
        self._use_device()
        out = self._pool.array((sum(a.shape[0] for a in arrays), *arrays[0].shape[1:]), arrays[0].dtype)
        kind, offset = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, 0
        for a in arrays:
            cuda_check(self.cudart.cudaMemcpyAsync(out.ptr + offset, a.ptr, a.nbytes, kind, self.stream),
                       "cudaMemcpyAsync(concat)")
            offset += a.nbytes
        return out

    def put(self, array: DeviceArray, rows: np.ndarray, values: DeviceArray) -> DeviceArray:
        self._use_device()
        if values.dtype != array.dtype:
            raise ValueError(f"put: values are {values.dtype}, the array is {array.dtype}")
        self._copy_rows(array, np.asarray(rows, np.int64), values, np.arange(len(rows)))
        return array

    def _copy_rows(self, dst: DeviceArray, dst_rows: np.ndarray, src: DeviceArray, src_rows: np.ndarray) -> None:
        """dst[dst_rows[i]] = src[src_rows[i]] on the stream, one copy per run."""
        step, kind = src.row_bytes, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        if step != dst.row_bytes:
            raise ValueError(f"row sizes differ: {src.shape} vs {dst.shape}")
        for d, s, count in row_runs(dst_rows, src_rows):
            cuda_check(self.cudart.cudaMemcpyAsync(dst.ptr + d * step, src.ptr + s * step, count * step, kind,
                                                   self.stream), "cudaMemcpyAsync(rows)")

    def freeze(self, done: np.ndarray) -> None:
        """The graphs' `done` input: rows with done[b] keep their state from the next step on."""
        self._use_device()
        host = np.ascontiguousarray(done, np.bool_)
        if host.shape != self._done.shape:
            raise ValueError(f"freeze: mask of shape {host.shape} for {self._done.shape[0]} slots")
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_check(self.cudart.cudaMemcpyAsync(self._done.ptr, host.ctypes.data, host.nbytes, kind, self.stream),
                   "cudaMemcpyAsync(done)")
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")  # pageable source
