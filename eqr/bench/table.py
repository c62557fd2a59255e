"""The one table of measurements: name -> function of the shared `Setting`. `--only` and the run
order read it; a new measurement is one row."""
from __future__ import annotations

from collections.abc import Callable

from eqr.bench.batching import continuous_vs_static
from eqr.bench.cascade import cascade_vs_fp32
from eqr.bench.efficiency import step_efficiency
from eqr.bench.int8 import int8_speedup
from eqr.bench.memory import memory
from eqr.bench.official import frontier_vs_official
from eqr.bench.result import Measurement
from eqr.bench.setting import Setting
from eqr.bench.side_by_side import adaptive_steps, host_overhead, reference_vs_runtime


def serving(setting: Setting) -> Measurement:
    """Triton (eqr serve's server) vs the in-process Scheduler on one stream (eqr.serving.bench)."""
    from eqr.serving.bench import NAME, measure_serving

    c = setting.config
    return Measurement(NAME, **measure_serving(setting.export_dir, puzzles=c.stream, batch=c.batch_size,
                                               threads=c.threads, seed=c.seed, stage=setting.report.stage))


MEASURE: dict[str, Callable[[Setting], Measurement]] = {
    "reference_vs_runtime": reference_vs_runtime,  # official protocol vs runtime, puzzles/s at equal accuracy
    "adaptive_steps": adaptive_steps,  # gated mean steps / smallest fixed depth at the gated accuracy
    "continuous_vs_static": continuous_vs_static,  # Scheduler vs static batches, puzzles/s
    "host_overhead": host_overhead,  # share of solve time outside backend.step
    "step_efficiency": step_efficiency,  # step FLOP/s over the best GEMM peak of every engine
    "int8_speedup": int8_speedup,  # ONNX Runtime CPU: int8-cpu step over fp32 step at batch 1 and 64
    "cascade_vs_fp32": cascade_vs_fp32,  # int8+fp32 cascade vs fp32, puzzles/s at equal accuracy
    "memory": memory,  # peak RSS of a fresh process at batch 64 and 256
    "frontier_vs_official": frontier_vs_official,  # eqr rules vs the official streaming evaluator's frontier
    "serving": serving,  # Triton vs in-process Scheduler, puzzles/s and latency (needs the serve extra)
}
MEASUREMENTS = tuple(MEASURE)
DEFAULT_MEASUREMENTS = tuple(name for name in MEASURE if name != "serving")  # serving starts a server: --only
