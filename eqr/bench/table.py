"""The one table of measurements: name -> function of the shared `Setting`. `--only` and the run
order read it; a new measurement is one row."""
from __future__ import annotations

from collections.abc import Callable

from eqr.bench.batching import continuous_vs_static
from eqr.bench.cascade import cascade_vs_fp32
from eqr.bench.efficiency import step_efficiency
from eqr.bench.memory import memory
from eqr.bench.result import Measurement
from eqr.bench.setting import Setting
from eqr.bench.side_by_side import adaptive_steps, host_overhead, reference_vs_runtime

MEASURE: dict[str, Callable[[Setting], Measurement]] = {
    "reference_vs_runtime": reference_vs_runtime,  # official protocol vs runtime, puzzles/s at equal accuracy
    "adaptive_steps": adaptive_steps,  # gated mean steps / smallest fixed depth at the gated accuracy
    "continuous_vs_static": continuous_vs_static,  # Scheduler vs static batches, puzzles/s
    "host_overhead": host_overhead,  # share of solve time outside backend.step
    "step_efficiency": step_efficiency,  # step FLOP/s over the best GEMM peak of every engine
    "cascade_vs_fp32": cascade_vs_fp32,  # int8+fp32 cascade vs fp32, puzzles/s at equal accuracy
    "memory": memory,  # peak RSS of a fresh process at batch 64 and 256
}
MEASUREMENTS = tuple(MEASURE)
