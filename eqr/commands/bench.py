"""`eqr bench`: the command. Flags map 1:1 to `BenchConfig`; measurements come from eqr.bench.table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from eqr.bench.config import DEFAULT_MODELS, FALLBACK_MODEL, PAPER_MODEL, BenchConfig
from eqr.bench.render import render
from eqr.bench.result import MeasurementError
from eqr.bench.run import default_model, run_bench
from eqr.bench.table import DEFAULT_MEASUREMENTS, MEASUREMENTS
from eqr.commands.options import (backend_option, batch_option, device_option, force_option, out_option,
                                  output_options, precision_option)
from eqr.contract.artifact import BASE_PRECISIONS, CASCADES, PRECISIONS
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress


@click.command()
@click.option("--model", default=None, help="Bundled model, checkpoint or preset [default: the bundled model "
              f"where puzzle difficulty varies ({DEFAULT_MODELS[0]}); {FALLBACK_MODEL} (fresh weights) while none is bundled].")
@click.option("--paper", is_flag=True, help=f"reference_vs_runtime (or the --only measurements) on {PAPER_MODEL} "
              "(hidden 512) with random weights for a few steps: the per-step cost at paper scale.")
@click.option("--only", "only", multiple=True, type=click.Choice(MEASUREMENTS), help="Run only these (repeatable).")
@click.option("--puzzles", type=int, default=None,
              help="Puzzles of the set every measurement shares (half the task's own draw, half its tiers) "
              f"[{BenchConfig.puzzles}; paper 4].")
@click.option("--breadth", type=int, default=None, help="K trajectories per puzzle [4; paper 1].")
@click.option("--depth", type=int, default=None, help="D: fixed depth of the official protocol [16; paper 2].")
@batch_option(default=BenchConfig.batch_size, type=click.IntRange(min=1),
              help="Working batch in trajectories.")
@click.option("--stream", type=int, default=BenchConfig.stream, show_default=True,
              help="Puzzles in the continuous_vs_static stream.")
@backend_option(choices=["onnxruntime", "tensorrt", "torch"], default="onnxruntime",
                help="Runtime backend of the runtime side (the reference is torch eager); torch runs the model "
                     "itself on --device, and needs no export for the side-by-side measurements.")
@device_option(help="With --backend torch: the device of the runtime side and of the reference: auto, cpu, cuda, "
                    "cuda:N [default: cpu].")
@click.option("--max-steps", type=int, default=None, help="Runtime step cap [default: the calibrated rule's].")
@click.option("--tol", type=float, default=None, help="Runtime residual tolerance [default: the calibrated rule's].")
@click.option("--window", type=click.IntRange(min=0), default=None,
              help="Runtime: stop when the answer is unchanged this many steps, 0: off [default: the calibrated "
              "rule's].")
@click.option("--patience", type=int, default=None, help="Runtime: steps the residual must stay below --tol "
              "[default: the calibrated rule's].")
@click.option("--rule-puzzles", type=int, default=BenchConfig.rule_puzzles, show_default=True,
              help="Labelled puzzles (drawn like the bench set, --breadth trajectories each) the FP32 stopping "
              "rule is fitted on when the export has none.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="CPU threads for torch, ONNX Runtime and the GEMM peaks.")
@precision_option(default=(), choices=tuple(PRECISIONS),
                  help="Precisions to export and time, fp32 always among them (repeat or comma list) "
                       "[default: fp32,fp16,int8].")
@click.option("--cascade", type=click.Choice(CASCADES, case_sensitive=False), default=BenchConfig.cascade,
              show_default=True, help="The cascade of cascade_vs_fp32.")
@click.option("--reference-noise", type=float, default=None,
              help="Path noise of the reference [default: the model's sigma, as the official evaluation; "
                   "0.5 for frontier_vs_official's streaming evaluator, as its official configs].")
@click.option("--noise", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SIGMA",
              help="Path noise of the runtime side (eqr solve --noise; the official sigma is 0.01).")
@click.option("--export-dir", type=click.Path(exists=True, file_okay=False),
              help="An `eqr export` directory of the same model to reuse (skips exporting; uses its calibrated rule).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--check-goals", is_flag=True, help="Exit 1 when a measured goal is missed.")
@out_option(type=click.Path(dir_okay=False), help="Also write the output (tables or JSON) to this file.")
@force_option(help="Replace an existing --out file.")
@output_options
def bench(model: str | None, paper: bool, only: tuple[str, ...], puzzles: int | None, breadth: int | None,
          depth: int | None, batch: int, stream: int, backend: str, device: str | None, max_steps: int | None, tol: float | None,
          window: int | None, patience: int | None, rule_puzzles: int, threads: int, precision: tuple[str, ...],
          cascade: str, reference_noise: float | None, noise: float, export_dir: str | None, seed: int,
          check_goals: bool,
          out: str | None, force: bool, as_json: bool, quiet: bool, verbose: int) -> None:
    """Measure the runtime against the official protocol, side by side, and print ratios.

    Prints a table per measurement, then one `RESULT name=value key=value ...` line each.
    Absolute numbers depend on the machine and its load; the ratios are measured in one run
    (docs/performance.md). The runtime stops each trajectory by the export's calibrated
    stopping rule (`eqr calibrate`); without one the bench fits it first, as calibrate does.
    Exit 0 done; 1 --check-goals and a goal missed, or a measurement error; 2 bad flags or input.

    \b
    Examples:
      eqr bench
      eqr bench --only reference_vs_runtime --only adaptive_steps --json
      eqr bench --model my-run/last.pt --breadth 8 --depth 32 --threads 2
      eqr bench --export-dir maze-small-eqr/ --only cascade_vs_fp32 --cascade fp16+fp32
      eqr bench --paper
      eqr bench --paper --only step_efficiency --precision fp32
      eqr bench --paper --backend torch --device cuda --puzzles 64 --batch 64 --depth 16
      eqr bench --only serving --stream 256        # through tritonserver (the serve extra)
      python scripts/bench.py --only step_efficiency
    """
    if paper and model is not None:
        raise EqRError(f"--paper runs {PAPER_MODEL}; drop --model (or drop --paper to bench {model})")
    if out and Path(out).exists() and not force:
        raise EqRError(f"--out {out} exists; pass --force to replace it")
    config = BenchConfig(
        model=PAPER_MODEL if paper else (model or default_model()),
        measurements=tuple(dict.fromkeys(only)) or (("reference_vs_runtime",) if paper else DEFAULT_MEASUREMENTS),
        puzzles=_given(puzzles, 4 if paper else BenchConfig.puzzles), breadth=_given(breadth, 1 if paper else 4),
        depth=_given(depth, 2 if paper else 16), stream=stream,
        batch_size=min(batch, 4) if paper and _device(device) == "cpu" else batch,
        backend=backend, device=_device(device), max_steps=max_steps, tol=tol, patience=patience, window=window, rule_puzzles=rule_puzzles,
        threads=threads, seed=seed, reference_noise=reference_noise, noise=noise,
        precisions=("fp32",) if paper else (tuple(dict.fromkeys(("fp32", *precision))) if precision else BASE_PRECISIONS), cascade=cascade.lower(),
        export_dir=export_dir, paper=paper)
    try:
        measurements, info = run_bench(config, Progress(quiet))
    except MeasurementError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if as_json:
        text = json.dumps({"run": info, "measurements": [m.to_dict() for m in measurements]}, indent=2, default=str)
    else:
        text = render(measurements, info)
    click.echo(text)
    if out:
        from eqr.contract.io import atomic_write_text

        atomic_write_text(out, text + "\n")
    if check_goals and any(m.met is False for m in measurements):
        sys.exit(1)


def _device(device: str | None) -> str:
    from eqr.runtime.backends.registry import parse_device

    return "cpu" if device is None else parse_device(device)


def _given(value: int | None, default: int) -> int:
    return default if value is None else value
