"""step_efficiency: achieved FLOP/s of one step per backend and precision at batch 1, 16, 64,
over the machine's real float32 peak: the best 1024^3 GEMM of every engine the bench uses
(torch, numpy, ONNX Runtime's own MatMul), measured in the same run. A step cannot beat the
best GEMM of its own engine, so a value over 1 is a measurement error and fails the run."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from eqr.bench.config import BLAS_THREAD_VARIABLES, EFFICIENCY_BATCHES, GEMM_SIZE, PAPER_HIDDEN
from eqr.bench.result import Measurement, MeasurementError
from eqr.bench.setting import Setting, best_time, flops

log = logging.getLogger(__name__)


def gemm_peaks(threads: int, size: int = GEMM_SIZE, repeats: int = 5) -> dict[str, float]:
    """Best float32 size^3 GEMM FLOP/s per engine: torch and ONNX Runtime here, numpy in a child
    process (its BLAS pool size is fixed when numpy loads, so only a fresh process obeys `threads`)."""
    a, b = (torch.randn(size, size, generator=torch.Generator().manual_seed(i)) for i in range(2))
    torch.set_num_threads(threads)
    work = 2.0 * size**3
    peaks = {"torch": work / best_time(lambda: torch.mm(a, b), repeats, min_seconds=0.5)}
    ort = _onnxruntime_matmul(a.numpy(), b.numpy(), threads)
    if ort is not None:
        peaks["onnxruntime"] = work / best_time(ort, repeats, min_seconds=0.5)
    env = os.environ | {name: str(threads) for name in BLAS_THREAD_VARIABLES}
    code = "from eqr.bench.efficiency import numpy_gemm_seconds; numpy_gemm_seconds()"
    done = subprocess.run([sys.executable, "-c", code, str(size), str(repeats)], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode == 0:
        peaks["numpy"] = work / float(done.stdout.split()[-1])
    else:
        log.warning("numpy GEMM probe failed: %s", done.stderr.strip()[-200:])
    return peaks


def _onnxruntime_matmul(a: np.ndarray, b: np.ndarray, threads: int) -> Any:
    """A one-node MatMul session with the runtime backend's session options -> a callable, or None."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    n = a.shape[0]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "gemm",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"a": np.ascontiguousarray(a), "b": np.ascontiguousarray(b)}
    return lambda: session.run(None, feeds)


def numpy_gemm_seconds() -> None:
    """Child process of `gemm_peaks`: print the best time of one size x size float32 numpy matmul."""
    size, repeats = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    print(best_time(lambda: a @ b, repeats, min_seconds=0.5))


def step_backends(setting: Setting) -> Iterator[tuple[str, Any]]:
    """(label, active backend) for torch fp32 and every exported ONNX Runtime precision, each run on
    the graph the runtime picks for it (int8 on the CPU provider: int8-cpu, when exported)."""
    from eqr.runtime.resolve import load_artifact
    from eqr.runtime.backends.ort_backend import OrtBackend
    from eqr.runtime.backends.torch_backend import TorchBackend

    artifact = load_artifact(setting.export_dir)
    backend = TorchBackend(setting.model)
    with backend:
        yield "torch fp32", backend
    for precision in setting.config.precisions:
        if artifact.onnx.get(precision) is None:
            continue
        backend = OrtBackend.from_artifact(artifact, precision, threads=setting.config.threads)
        with backend:
            yield f"onnxruntime {precision}", backend


def random_feeds(backend: Any, config: Any, B: int, rng: np.random.Generator) -> dict[str, Any]:
    """Step feeds of B random tokens and states (a ModelConfig's sizes), on the backend's device."""
    L, D = config.seq_len, config.hidden_size
    tokens = rng.integers(1, config.vocab_size, (B, L)).astype(np.int32)  # (B, L)
    return {"tokens": backend.upload(tokens),
            "z_H": backend.upload(rng.standard_normal((B, L, D), dtype=np.float32)),  # (B, L, D)
            "z_L": backend.upload(rng.standard_normal((B, L, D), dtype=np.float32))}


def step_latencies(setting: Setting) -> list[tuple[str, int, float]]:
    """(backend label, batch, best seconds per step) at EFFICIENCY_BATCHES, on random states."""

    def measure() -> list[tuple[str, int, float]]:
        rng = np.random.default_rng(setting.config.seed)
        timed = []
        for label, backend in step_backends(setting):
            setting.report.stage(f"step timing: {label}, batch {', '.join(map(str, EFFICIENCY_BATCHES))}")
            for B in EFFICIENCY_BATCHES:
                feeds = random_feeds(backend, setting.model.config, B, rng)
                timed.append((label, B, best_time(lambda: backend.step(feeds), repeats=3, min_seconds=0.3)))
        return timed

    return setting.once("step_latencies", measure)


def step_efficiency(setting: Setting) -> Measurement:
    c = setting.config
    setting.report.stage(f"GEMM peak: float32 {GEMM_SIZE}^3 matmul, torch, ONNX Runtime and numpy, "
                         f"{c.threads} thread(s)")
    peaks = gemm_peaks(c.threads)
    step_flops = flops(setting)
    timed = step_latencies(setting)
    setting.report.stage("GEMM peak again (the peak is the best of before and after: the machine is shared)")
    peaks = {name: max(value, peaks.get(name, 0.0)) for name, value in gemm_peaks(c.threads).items()}
    peak = max(peaks.values())
    rows, best_at_64 = [], {}
    for label, B, seconds in timed:
        achieved = step_flops * B / seconds
        rows.append((label, B, f"{1e3 * seconds:.2f}", f"{achieved / 1e9:.2f}", f"{achieved / peak:.3f}"))
        if achieved > peak:
            raise MeasurementError(f"step_efficiency: {label} at batch {B} ran {achieved / 1e9:.1f} GFLOP/s, above "
                                   f"the best GEMM peak {peak / 1e9:.1f} GFLOP/s ({_peaks_text(peaks)}): the peak or "
                                   "the FLOP count is wrong, not the step")
        if B == 64:
            best_at_64[label] = achieved / peak
    fastest = max(best_at_64, key=best_at_64.get)
    fields: dict[str, Any] = {"fastest_backend": fastest, "gemm_peak_gflops": peak / 1e9,
                              **{f"{name}_gemm_gflops": value / 1e9 for name, value in peaks.items()},
                              "step_gflop_per_sample": step_flops / 1e9}
    fields |= {f"{label.replace(' ', '_')}_b64": value for label, value in best_at_64.items()}
    paper_size = setting.model.config.hidden_size >= PAPER_HIDDEN
    return Measurement("step_efficiency", best_at_64[fastest], fields,
                       ("backend", "batch", "ms/step", "GFLOP/s", "of GEMM peak"), rows,
                       f"GEMM peak {peak / 1e9:.1f} GFLOP/s, best of {_peaks_text(peaks)}; FLOPs per step as "
                       f"`eqr info` ({step_flops / 1e6:.1f} M/sample)"
                       + ("" if paper_size else f"; the goal is defined on the paper-size model (hidden "
                          f"{PAPER_HIDDEN}), this one has hidden {setting.model.config.hidden_size}"),
                       goal_applies=paper_size)


def _peaks_text(peaks: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items())
