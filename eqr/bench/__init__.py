"""`eqr bench`: speed claims as ratios measured side by side in one run (never in tests).

One file per concern: `config` (BenchConfig, goals), `result` (Measurement, RESULT lines),
`setting` (what the measurements share), `reference` (the official protocol's loop, a
baseline), the measurements (`side_by_side`: reference_vs_runtime, adaptive_steps,
host_overhead; `batching`: continuous_vs_static; `efficiency`: step_efficiency and the GEMM
peaks; `int8`: int8_speedup; `cascade`: cascade_vs_fp32; `memory`; `official`: the official
streaming evaluator and frontier_vs_official), `table` (THE name -> measurement table that
`--only` reads), `run` and `render`; the command is eqr/commands/bench.py. docs/performance.md explains every measurement.
"""
from eqr.bench.config import GOALS, BenchConfig
from eqr.bench.reference import ReferenceRun, reference_solve
from eqr.bench.result import Measurement, MeasurementError, parse_result_line
from eqr.bench.run import run_bench
from eqr.bench.setting import exact_correct
from eqr.bench.table import DEFAULT_MEASUREMENTS, MEASURE, MEASUREMENTS

__all__ = ["DEFAULT_MEASUREMENTS", "GOALS", "MEASURE", "MEASUREMENTS", "BenchConfig", "Measurement", "MeasurementError", "ReferenceRun",
           "exact_correct", "parse_result_line", "reference_solve", "run_bench"]
