"""A CPU stand-in for cuda-python's runtime and a TensorRT engine, strict where the real ones are.

"Device" memory is host memory; every copy, memset and engine run is queued on its stream and
runs only at `cudaStreamSynchronize` (so a missing wait reads stale data, as on a GPU). Stream
capture records instead of running, with the arguments (addresses, shapes) fixed at capture
time, as a real graph's kernel parameters are. The engine runs the step graph with ONNX
Runtime: its file holds the ONNX bytes. It refuses what CUDA and TensorRT document as undefined
or invalid: a copy whose kind does not match where its pointers live (device, pinned or pageable
host memory; a captured copy needs pinned host memory), cudaMalloc or cudaFree while a stream
captures, freeing memory with the other allocator's free, re-binding a context after it was
captured, capturing a context's first run (TensorRT allocates and selects on it), capture in a
mode other than thread-local, any input dimension outside the profile, misaligned addresses,
USER_MANAGED contexts run without memory, and a run while a CUDA error is pending (TensorRT reads
cudaGetLastError after its launches). `fail` makes EndCapture or Instantiate fail on request (after n good calls); a
cuda-python major above the driver's fails like the real runtime (cudaErrorInsufficientDriver).
"""
from __future__ import annotations

import bisect
import ctypes
from enum import IntEnum
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

ALIGN = 256


class Error(IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35
    cudaErrorStreamCaptureInvalidated = 901


class FakeGraph(list):
    """A captured graph or its executable: the recorded operations."""


class FakeCudart:
    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1,
                                            cudaStreamCaptureModeRelaxed=2)
    # memcpy kind -> where (dst, src) must live
    KINDS = {1: ("device", "host"), 2: ("host", "device"), 3: ("device", "device")}

    def __init__(self, devices: int = 1, driver: int = 12040, runtime: int = 12060) -> None:
        self.devices = devices
        self.driver, self.runtime = driver, runtime  # cudaDriverGetVersion, cudaRuntimeGetVersion
        self.current = 0
        self.buffers: dict[int, Any] = {}
        self.memory: dict[int, tuple[int, str]] = {}  # ptr -> (size, "device" | "pinned")
        self._starts: list[int] = []  # sorted allocation starts
        self.queues: dict[int, list[Callable[[], None]]] = {}
        self.capturing: dict[int, list[Callable[[], None]]] = {}
        self.capture_modes: list[int] = []
        self.device_calls: list[int] = []  # the device of each stream operation
        self.calls: dict[str, int] = {"malloc": 0, "free": 0}  # device and pinned, counted together
        self.fail: dict[str, int] = {}  # "EndCapture" / "Instantiate" -> fail every such call after this many
        self._made: dict[str, int] = {}
        self.last_error = Error.cudaSuccess
        self.live_graphs: set[int] = set()
        self.live_execs: set[int] = set()

    # memory
    def _alloc(self, size: int, where: str) -> tuple[Error, int]:
        assert not self.capturing, f"cudaMalloc{'Host' if where == 'pinned' else ''} during a stream capture"
        raw = ctypes.create_string_buffer(size + ALIGN)
        ptr = (ctypes.addressof(raw) + ALIGN - 1) // ALIGN * ALIGN
        self.buffers[ptr] = raw
        self.memory[ptr] = (size, where)
        bisect.insort(self._starts, ptr)
        self.calls["malloc"] += 1
        return Error.cudaSuccess, ptr

    def cudaMalloc(self, size: int) -> tuple[Error, int]:
        return self._alloc(size, "device")

    def cudaMallocHost(self, size: int) -> tuple[Error, int]:
        return self._alloc(size, "pinned")

    def _free(self, ptr: int, where: str) -> tuple[Error]:
        assert not self.capturing, "cudaFree during a stream capture"
        assert self.memory.get(ptr, (0, where))[1] == where, f"{where} free of {self.memory[ptr][1]} memory"
        for stream in list(self.queues):  # cudaFree waits for the device's pending work
            self.cudaStreamSynchronize(stream)
        if ptr in self.memory:
            del self.memory[ptr]
            self._starts.remove(ptr)
        self.buffers.pop(ptr, None)
        self.calls["free"] += 1
        return (Error.cudaSuccess,)

    def cudaFree(self, ptr: int) -> tuple[Error]:
        return self._free(ptr, "device")

    def cudaFreeHost(self, ptr: int) -> tuple[Error]:
        return self._free(ptr, "pinned")

    def where(self, ptr: int, count: int) -> str:
        """"device", "pinned" or "pageable" for [ptr, ptr + count); an overrun is an error."""
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i >= 0:
            start = self._starts[i]
            size, kind = self.memory[start]
            if ptr < start + size:
                assert ptr + count <= start + size, f"{count} bytes at {ptr:#x} overrun a {size}-byte {kind} allocation"
                return kind
        return "pageable"

    def _check_copy(self, dst: int, src: int, count: int, kind: int, stream: int) -> None:
        want = self.KINDS[kind]
        got = (self.where(dst, count), self.where(src, count))
        for side, need, have in zip(("destination", "source"), want, got):
            assert (have != "device") if need == "host" else (have == "device"), \
                f"memcpy kind {kind}: the {side} is {have} memory"
            assert not (stream in self.capturing and have == "pageable"), "a captured copy from/to pageable memory"

    # streams
    def cudaSetDevice(self, device: int) -> tuple[Error]:
        if not 0 <= device < self.devices:
            return (Error.cudaErrorInvalidValue,)
        self.current = device
        return (Error.cudaSuccess,)

    def cudaDriverGetVersion(self) -> tuple[Error, int]:
        return Error.cudaSuccess, self.driver

    def cudaRuntimeGetVersion(self) -> tuple[Error, int]:
        return Error.cudaSuccess, self.runtime

    def cudaGetDeviceCount(self) -> tuple[Error, int]:
        if self.runtime // 1000 > self.driver // 1000:
            return Error.cudaErrorInsufficientDriver, 0
        return Error.cudaSuccess, self.devices

    def cudaGetLastError(self) -> tuple[Error]:
        err, self.last_error = self.last_error, Error.cudaSuccess
        return (err,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[Error, int]:
        handle = 1000 + len(self.queues)
        self.queues[handle] = []
        return Error.cudaSuccess, handle

    def cudaStreamDestroy(self, stream: int) -> tuple[Error]:
        return (Error.cudaSuccess,)

    def enqueue(self, stream: Any, op: Callable[[], None]) -> None:
        assert stream in self.queues, f"work issued on a foreign stream {stream!r}"
        self.device_calls.append(self.current)
        (self.capturing[stream] if stream in self.capturing else self.queues[stream]).append(op)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: int, stream: int) -> tuple[Error]:
        self._check_copy(dst, src, count, kind, stream)
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, count))
        return (Error.cudaSuccess,)

    def cudaMemsetAsync(self, ptr: int, value: int, count: int, stream: int) -> tuple[Error]:
        assert self.where(ptr, count) == "device", "cudaMemsetAsync on host memory"
        self.enqueue(stream, lambda: ctypes.memset(ptr, value, count))
        return (Error.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[Error]:
        assert stream not in self.capturing, "synchronize during capture"
        queue = self.queues[stream]
        while queue:
            queue.pop(0)()
        return (Error.cudaSuccess,)

    # graphs
    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple[Error]:
        self.capture_modes.append(mode)
        self.capturing[stream] = []
        return (Error.cudaSuccess,)

    def cudaStreamEndCapture(self, stream: int) -> tuple[Error, FakeGraph | None]:
        ops = self.capturing.pop(stream)  # the stream leaves capture mode either way
        if self._fails("EndCapture"):
            self.last_error = Error.cudaErrorStreamCaptureInvalidated
            return Error.cudaErrorStreamCaptureInvalidated, None
        graph = FakeGraph(ops)
        self.live_graphs.add(id(graph))
        return Error.cudaSuccess, graph

    def cudaGraphInstantiate(self, graph: FakeGraph, flags: int) -> tuple[Error, FakeGraph | None]:
        assert id(graph) in self.live_graphs, "instantiating a destroyed graph"
        if self._fails("Instantiate"):
            self.last_error = Error.cudaErrorInvalidValue
            return Error.cudaErrorInvalidValue, None
        graph_exec = FakeGraph(graph)
        self.live_execs.add(id(graph_exec))
        return Error.cudaSuccess, graph_exec

    def _fails(self, call: str) -> bool:
        made = self._made[call] = self._made.get(call, 0) + 1
        return call in self.fail and made > self.fail[call]

    def cudaGraphLaunch(self, graph_exec: FakeGraph, stream: int) -> tuple[Error]:
        assert id(graph_exec) in self.live_execs, "launching a destroyed graph"
        for op in graph_exec:
            self.enqueue(stream, op)
        return (Error.cudaSuccess,)

    def cudaGraphDestroy(self, graph: FakeGraph) -> tuple[Error]:
        assert graph is not None and id(graph) in self.live_graphs, "destroying no graph"
        self.live_graphs.discard(id(graph))
        return (Error.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph_exec: FakeGraph) -> tuple[Error]:
        assert graph_exec is not None and id(graph_exec) in self.live_execs, "destroying no executable graph"
        self.live_execs.discard(id(graph_exec))
        return (Error.cudaSuccess,)

    def cudaGetErrorString(self, err: Any) -> tuple[Error, bytes]:
        return Error.cudaSuccess, Error(int(err)).name.encode()


# --------------------------------------------------------------------------- TensorRT


class DataType(IntEnum):
    float32 = 0
    float16 = 1
    int32 = 3
    int64 = 4
    bool = 5


NUMPY = {DataType.float32: np.float32, DataType.float16: np.float16, DataType.int32: np.int32,
         DataType.int64: np.int64, DataType.bool: np.bool_}


class Strategy(IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


def fake_tensorrt(cudart: FakeCudart, profile: tuple[int, int, int]) -> SimpleNamespace:
    trt = SimpleNamespace(__version__="10.16.0", ExecutionContextAllocationStrategy=Strategy, engines=[],
                          Logger=Severity, ILogger=ILogger, **{t.name: t for t in DataType})
    trt.Runtime = lambda logger: FakeRuntime(cudart, trt, profile, logger)
    return trt


class FakeRuntime:
    def __init__(self, cudart: FakeCudart, trt: SimpleNamespace, profile: tuple[int, int, int], logger: Any) -> None:
        self.cudart, self.trt, self.profile, self.logger = cudart, trt, profile, logger
        self.DLA_core = -1

    def deserialize_cuda_engine(self, plan: bytes) -> "FakeEngine":
        if self.logger is not None:  # as TensorRT does for, e.g., a plan built by a newer minor release
            self.logger.log(Severity.WARNING, "TensorRT: a runtime warning")
        engine = FakeEngine(self.cudart, plan, self.profile)
        self.trt.engines.append(engine)
        return engine


class FakeEngine:
    def __init__(self, cudart: FakeCudart, onnx_bytes: bytes, profile: tuple[int, int, int]) -> None:
        import onnxruntime as ort

        self.cudart, self.profile, self.device = cudart, profile, cudart.current
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        values = [*self.session.get_inputs(), *self.session.get_outputs()]
        self.names = [v.name for v in values]
        types = {"tensor(float)": DataType.float32, "tensor(int32)": DataType.int32, "tensor(bool)": DataType.bool}
        self.types = {v.name: types[v.type] for v in values}
        self.shapes = {v.name: tuple(-1 if isinstance(d, str) else d for d in v.shape) for v in values}
        self.inputs = [v.name for v in self.session.get_inputs()]
        self.contexts: list[FakeContext] = []
        self.device_memory_size_v2 = 4096

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.types[name]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        return [(b, *self.shapes[name][1:]) for b in self.profile]

    def create_execution_context(self, strategy: Strategy = Strategy.STATIC) -> "FakeContext":
        assert self.cudart.current == self.device, "context created on another device than the engine"
        context = FakeContext(self, strategy)
        self.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy: Strategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.captured = False
        self.binds = 0
        self.runs = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert not self.captured, "set_input_shape after this context was captured"
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        assert not self.captured, "set_tensor_address after this context was captured (undefined in TensorRT)"
        self.binds += 1
        if ptr % ALIGN:
            return False
        self.addresses[name] = ptr
        return True

    def update_device_memory_size_for_shapes(self) -> int:
        return 8192

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = (ptr, size)

    def execute_async_v3(self, stream: int) -> bool:
        cudart = self.engine.cudart
        if self.strategy == Strategy.USER_MANAGED and self.memory is None:
            return False
        if cudart.last_error != Error.cudaSuccess:  # TensorRT checks cudaGetLastError after its launches
            return False
        if stream in cudart.capturing:
            assert self.runs, "captured this context's first run (TensorRT allocates and selects lazily on it)"
            self.captured = True
        self.runs += 1
        shapes, addresses = dict(self.shapes), dict(self.addresses)  # fixed now, like kernel parameters
        cudart.enqueue(stream, lambda: self._run(shapes, addresses))
        return True

    def _run(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
        engine = self.engine
        B = shapes["tokens"][0]

        def view(name: str, shape: tuple[int, ...]) -> np.ndarray:
            dtype = np.dtype(NUMPY[engine.types[name]])
            n = int(np.prod(shape)) * dtype.itemsize
            return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addresses[name])).view(dtype).reshape(shape)

        feeds = {name: view(name, shapes[name]).copy() for name in engine.inputs}
        outputs = engine.session.run(None, feeds)
        for value, out in zip(engine.session.get_outputs(), outputs):
            view(value.name, (B, *out.shape[1:]))[...] = out


# --------------------------------------------------------------------------- the build path


class Severity(IntEnum):
    """trt.Logger's severities."""

    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    """trt.ILogger: subclasses implement log(severity, msg)."""

    def __init__(self) -> None:
        pass


def builder_tensorrt(version: str = "10.3.0") -> SimpleNamespace:
    """A `tensorrt` module for the build path: what eqr and Polygraphy's logger read of it."""
    return SimpleNamespace(__version__=version, MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"),
                           Logger=Severity, ILogger=ILogger)


def fake_loaders(trt: SimpleNamespace, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Stand-ins for Polygraphy's TensorRT loaders (polygraphy.backend.trt): the plan they build
    is the ONNX bytes (what fake_tensorrt's runtime deserializes), each build is appended to
    `calls`, and each one warns the way TensorRT and Polygraphy do: through the process's TensorRT
    logger, Polygraphy's logger, and a bare print() (an old Polygraphy)."""
    from eqr.contract.trt_engine import trt_logger

    def engine_bytes(network: tuple, config: dict, save_timing_cache: str | None = None) -> Callable[[], bytes]:
        def build() -> bytes:
            from polygraphy.logger import G_LOGGER

            trt_logger().log(trt.Logger.WARNING, "TensorRT: a builder warning")
            G_LOGGER.warning("Polygraphy: a loader warning")
            G_LOGGER.error("Polygraphy: an error-level message")
            print("an old Polygraphy printing")
            calls.append({"network": network, "config": config, "save_timing_cache": save_timing_cache})
            return network[1]

        return build

    class Profile(dict):
        def add(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> "Profile":
            self[name] = (lo, opt, hi)
            return self

    return {"NetworkFromOnnxBytes": lambda data, strongly_typed: ("network", data, strongly_typed),
            "CreateConfig": lambda **options: options, "PostprocessConfig": lambda config, fn: config,
            "EngineBytesFromNetwork": engine_bytes, "Profile": Profile}


def fake_engine_builds(monkeypatch: Any, cache_dir: Any, gpu: Any, version: str = "10.3.0") -> list[dict[str, Any]]:
    """TensorRT `version` on `gpu` (an eqr.export.tensorrt.GpuInfo) with Polygraphy's loaders faked
    (`fake_loaders`) for the rest of a test -> the list each build is appended to."""
    import sys

    import polygraphy.backend.trt as loaders
    import polygraphy.backend.trt.util as polygraphy_util

    from eqr.contract import trt_engine
    from eqr.export import tensorrt as trt_export

    trt, calls = builder_tensorrt(version), []
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    for name, fake in fake_loaders(trt, calls).items():
        monkeypatch.setattr(loaders, name, fake)
    monkeypatch.setattr(polygraphy_util, "TRT_LOGGER", None)
    monkeypatch.setattr(trt_engine, "_LOGGER", None)
    monkeypatch.setattr(trt_export, "cuda_gpu", lambda device=0: gpu)
    monkeypatch.setenv("EQR_CACHE_DIR", str(cache_dir))
    return calls
