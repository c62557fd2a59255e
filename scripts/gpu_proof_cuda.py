"""gpu_proof.sh's cuda-python section: the TensorRT backend's CUDA helpers without TensorRT.

runtime/backends/trt_backend.py does its memory, copies, stream and CUDA graphs through
cuda-python (cuda.bindings.runtime). This runs those helpers on the real driver: the version
check, device and pinned allocations, the max-batch pool and its row views, async copies on a
non-blocking stream, row gathers, and the backend's own graph capture (`_capture`) of a
kernel-free graph (memcpys), replayed, plus a capture that fails inside (a stream sync while
capturing) to show it ends the capture, clears the error and leaves the stream usable.
Prints PASS/FAIL per check; exits 1 when one fails.
"""
from __future__ import annotations

import sys
import traceback

import numpy as np

from eqr.contract.errors import EqRError
from eqr.runtime.backends import trt_backend as trt

results: list[tuple[str, bool, str]] = []


def check(name: str):
    def wrap(fn):
        try:
            detail = fn() or ""
            results.append((name, True, detail))
        except Exception as e:  # noqa: BLE001 - every check runs and reports
            results.append((name, False, f"{type(e).__name__}: {e}"))
            traceback.print_exc()
        return fn
    return wrap


def main() -> int:
    cudart = trt.import_cudart()
    version = lambda f: trt.cuda_check(f(), f.__name__)  # noqa: E731
    mismatch = trt.cuda_mismatch(cudart)
    print(f"cuda-python runtime {version(cudart.cudaRuntimeGetVersion)}, driver {version(cudart.cudaDriverGetVersion)}, "
          f"mismatch: {mismatch}")
    if mismatch:
        print(f"FAIL cuda_mismatch: {mismatch}")
        return 1
    trt.cuda_check(cudart.cudaSetDevice(0), "cudaSetDevice")
    stream = trt.cuda_check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
    H2D, D2H, D2D = (cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice)
    sync = lambda: trt.cuda_check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")  # noqa: E731
    rows, shape = 64, (64, 81, 512)
    data = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)

    @check("device + pinned memory, H2D/D2H round trip on the stream")
    def _():
        host, _pin = trt.pinned_array(shape, np.float32)
        host[:] = data
        dev = trt.device_array(shape, np.float32)
        assert dev.ptr % trt.ALIGNMENT == 0, hex(dev.ptr)
        back, _pin2 = trt.pinned_array(shape, np.float32)
        trt.cuda_check(cudart.cudaMemcpyAsync(dev.ptr, host.ctypes.data, dev.nbytes, H2D, stream), "H2D")
        trt.cuda_check(cudart.cudaMemcpyAsync(back.ctypes.data, dev.ptr, dev.nbytes, D2H, stream), "D2H")
        sync()
        np.testing.assert_array_equal(back, data)
        return f"{dev.nbytes / 2**20:.0f} MiB"

    @check("max-batch pool: row views, blocks reused, row-run gathers")
    def _():
        pool = trt._Pool(rows)
        pool.reserve(shape[1:], np.float32, 2)
        before = len(pool.blocks)
        src = pool.array(shape, np.float32)
        trt.cuda_check(cudart.cudaMemcpyAsync(src.ptr, data.ctypes.data, src.nbytes, H2D, stream), "H2D")
        sync()
        picked = np.array([0, 1, 2, 10, 11, 40])
        out = pool.array((len(picked), *shape[1:]), np.float32)
        for d, s, n in trt.row_runs(np.arange(len(picked)), picked):
            trt.cuda_check(cudart.cudaMemcpyAsync(out.ptr + d * src.row_bytes, src.ptr + s * src.row_bytes,
                                                  n * src.row_bytes, D2D, stream), "gather")
        host = np.empty(out.shape, np.float32)
        trt.cuda_check(cudart.cudaMemcpyAsync(host.ctypes.data, out.ptr, out.nbytes, D2H, stream), "D2H")
        sync()
        np.testing.assert_array_equal(host, data[picked])
        assert len(pool.blocks) == before, "the pool allocated beyond its reservation"
        del src, out
        again = pool.array((8, *shape[1:]), np.float32)
        assert len(pool.blocks) == before, "a dropped block was not reused"
        del again
        pool.close()
        return f"{len(trt.row_runs(np.arange(len(picked)), picked))} copies for {len(picked)} rows"

    class Probe(trt.TensorRTBackend):
        """The backend's capture code with a memcpy for the engine run (no TensorRT anywhere)."""

        def __init__(self, src, dst, fail=False):
            self.cudart, self.stream, self.src, self.dst, self.fail = cudart, stream, src, dst, fail

        def _enqueue(self, context, outputs):
            trt.cuda_check(cudart.cudaMemcpyAsync(self.dst.ptr, self.src.ptr, self.src.nbytes, D2D, self.stream),
                           "cudaMemcpyAsync(graph)")
            if self.fail:  # synchronizing a capturing stream is illegal: the capture is invalidated
                trt.cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize in capture")

    @check("TensorRTBackend._capture: a kernel-free graph captured, instantiated and replayed")
    def _():
        src, dst = trt.device_array(shape, np.float32), trt.device_array(shape, np.float32)
        trt.cuda_check(cudart.cudaMemcpyAsync(src.ptr, data.ctypes.data, src.nbytes, H2D, stream), "H2D")
        trt.cuda_check(cudart.cudaMemsetAsync(dst.ptr, 0, dst.nbytes, stream), "memset")
        sync()
        graph_exec, why = Probe(src, dst)._capture(None, {})
        assert graph_exec is not None, why
        for _ in range(3):
            trt.cuda_check(cudart.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")
        host = np.empty(shape, np.float32)
        trt.cuda_check(cudart.cudaMemcpyAsync(host.ctypes.data, dst.ptr, dst.nbytes, D2H, stream), "D2H")
        sync()
        np.testing.assert_array_equal(host, data)
        cudart.cudaGraphExecDestroy(graph_exec)
        return "3 replays"

    @check("TensorRTBackend._capture: a failing capture ends, clears the error, the stream still works")
    def _():
        src, dst = trt.device_array(shape, np.float32), trt.device_array(shape, np.float32)
        graph_exec, why = Probe(src, dst, fail=True)._capture(None, {})
        assert graph_exec is None and why, (graph_exec, why)
        err, status = cudart.cudaStreamIsCapturing(stream)
        assert int(err) == 0 and status == cudart.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone, status
        assert int(cudart.cudaGetLastError()[0]) == 0
        trt.cuda_check(cudart.cudaMemcpyAsync(dst.ptr, src.ptr, src.nbytes, D2D, stream), "after the failure")
        sync()
        return f"fell back: {why.splitlines()[0][:120]}"

    trt.cuda_check(cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (EqRError, ImportError) as e:
        print(f"FAIL cuda-python: {e}")
        sys.exit(1)
