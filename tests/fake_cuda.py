"""A CPU stand-in for cuda-python's runtime and a TensorRT engine, strict where the real ones are.

"Device" memory is host memory; every copy, memset and engine run is queued on its stream and
runs only at `cudaStreamSynchronize` (so a missing wait reads stale data, as on a GPU). Stream
capture records instead of running, with the arguments (addresses, shapes) fixed at capture
time, as a real graph's kernel parameters are. The engine runs the step graph with ONNX
Runtime: its file holds the ONNX bytes. It refuses what TensorRT documents as undefined or
invalid: re-binding a context after it was captured, capture in a mode other than thread-local,
shapes outside the profile, misaligned addresses, USER_MANAGED contexts run without memory.
"""
from __future__ import annotations

import ctypes
from enum import IntEnum
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

ALIGN = 256


class Error(IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1


class FakeCudart:
    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1,
                                            cudaStreamCaptureModeRelaxed=2)

    def __init__(self, devices: int = 1) -> None:
        self.devices = devices
        self.current = 0
        self.buffers: dict[int, Any] = {}
        self.queues: dict[int, list[Callable[[], None]]] = {}
        self.capturing: dict[int, list[Callable[[], None]]] = {}
        self.capture_modes: list[int] = []
        self.device_calls: list[int] = []  # the device of each stream operation

    # memory
    def _alloc(self, size: int) -> tuple[Error, int]:
        raw = ctypes.create_string_buffer(size + ALIGN)
        ptr = (ctypes.addressof(raw) + ALIGN - 1) // ALIGN * ALIGN
        self.buffers[ptr] = raw
        return Error.cudaSuccess, ptr

    cudaMalloc = cudaMallocHost = _alloc

    def cudaFree(self, ptr: int) -> tuple[Error]:
        for stream in list(self.queues):  # cudaFree waits for the device's pending work
            if stream not in self.capturing:
                self.cudaStreamSynchronize(stream)
        self.buffers.pop(ptr, None)
        return (Error.cudaSuccess,)

    cudaFreeHost = cudaFree

    # streams
    def cudaSetDevice(self, device: int) -> tuple[Error]:
        if not 0 <= device < self.devices:
            return (Error.cudaErrorInvalidValue,)
        self.current = device
        return (Error.cudaSuccess,)

    def cudaGetDeviceCount(self) -> tuple[Error, int]:
        return Error.cudaSuccess, self.devices

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
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, count))
        return (Error.cudaSuccess,)

    def cudaMemsetAsync(self, ptr: int, value: int, count: int, stream: int) -> tuple[Error]:
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

    def cudaStreamEndCapture(self, stream: int) -> tuple[Error, list]:
        return Error.cudaSuccess, self.capturing.pop(stream)

    def cudaGraphInstantiate(self, graph: list, flags: int) -> tuple[Error, list]:
        return Error.cudaSuccess, list(graph)

    def cudaGraphLaunch(self, graph_exec: list, stream: int) -> tuple[Error]:
        for op in graph_exec:
            self.enqueue(stream, op)
        return (Error.cudaSuccess,)

    def cudaGraphDestroy(self, graph: Any) -> tuple[Error]:
        return (Error.cudaSuccess,)

    cudaGraphExecDestroy = cudaGraphDestroy

    def cudaGetErrorString(self, err: Any) -> tuple[Error, bytes]:
        return Error.cudaSuccess, b"invalid argument"


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
    trt = SimpleNamespace(__version__="10.16.0", ExecutionContextAllocationStrategy=Strategy, engines=[], **{
        t.name: t for t in DataType})
    trt.Runtime = lambda logger: FakeRuntime(cudart, trt, profile)
    return trt


class FakeRuntime:
    def __init__(self, cudart: FakeCudart, trt: SimpleNamespace, profile: tuple[int, int, int]) -> None:
        self.cudart, self.trt, self.profile = cudart, trt, profile
        self.DLA_core = -1

    def deserialize_cuda_engine(self, plan: bytes) -> "FakeEngine":
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

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert not self.captured, "set_input_shape after this context was captured"
        lo, _, hi = self.engine.profile
        if not lo <= shape[0] <= hi:
            return False
        self.shapes[name] = tuple(shape)
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
        if stream in cudart.capturing:
            self.captured = True
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
