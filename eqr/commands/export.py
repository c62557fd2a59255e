"""`eqr export` (and its alias `eqr-export`): a model -> checked ONNX step graphs, manifest, engines."""
from __future__ import annotations

import contextlib
import json
import signal
from typing import Callable, Iterator

import click

from eqr.commands.options import calib_data_option, force_option, out_option, output_options, precision_option
from eqr.contract.artifact import PRECISIONS
from eqr.contract.progress import Progress
from eqr.export.config import DEFAULT_OPSET, ENGINE_MODES, ExportConfig, parse_batch


# The TensorRT build flags `eqr export` shares with `eqr engine` (checked by
# eqr.export.config.check_engine_options).


def profile_batch_option(default: str | None, help: str) -> Callable[[Callable], Callable]:
    return click.option("--batch", default=default, show_default=default is not None, metavar="MIN:OPT:MAX", help=help)


def workspace_option(f: Callable) -> Callable:
    return click.option("--workspace-mib", type=int, default=4096, show_default=True,
                        help="TensorRT builder workspace limit (lower it on an 8 GB Jetson).")(f)


def dla_core_option(f: Callable) -> Callable:
    return click.option("--dla-core", type=int, default=None, metavar="N",
                        help="Jetson: build the fp16/int8 engines for DLA core N (GPU fallback; needs a single "
                             "--batch).")(f)


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the staging directory is removed (no partial files)."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command()
@click.argument("model")
@precision_option(default=("fp32",), choices=tuple(PRECISIONS),
                  help="Graph(s) to write: repeat the flag or give a comma list. fp32 is always written too; "
                       "int8 also writes int8-cpu, the graph ONNX Runtime's CPU provider runs for int8.")
@out_option(help="Output directory [default: <model stem>-eqr/].", type=click.Path(file_okay=False))
@profile_batch_option(default="1:64:256", help="TensorRT optimization profile over the batch dimension.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset (17..20).")
@click.option("--engine", type=click.Choice(ENGINE_MODES), default="auto", show_default=True,
              help="TensorRT engines: auto = when TensorRT and a GPU exist; always = fail (exit 1) without.")
@calib_data_option(type=click.Path(dir_okay=False), metavar="NPZ",
                   help="INT8 calibration inputs: a calib.npz from `eqr calibrate`, or puzzles as 'tokens' [N, L] "
                        "[default: built-in puzzles of the model's task].")
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True,
              help="Which weights to export when the checkpoint has both.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of check/calibration inputs and states.")
@click.option("--check-batch", type=int, default=4, show_default=True,
              help="Trajectories (task puzzles from random initial states) in the parity checks.")
@click.option("--check-steps", type=int, default=32, show_default=True,
              help="Outer steps per checked and calibration trajectory.")
@workspace_option
@dla_core_option
@click.option("--noisy", "noise", is_flag=True,
              help="Also write the noisy step graph of fp32 (and fp16): path noise at inference, `eqr solve "
                   "--noise SIGMA`.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="CPU threads for the checks; 0 = the cores left idle by the load average.")
@force_option(help="Replace an existing export; also removes what was derived from it (calib.npz, report/).")
@output_options
def export(model: str, precision: tuple[str, ...], out: str | None, batch: str, opset: int, engine: str,
           calib_data: str | None, weights: str, seed: int, check_batch: int, check_steps: int, workspace_mib: int,
           dla_core: int | None, noise: bool, threads: int, force: bool, as_json: bool, quiet: bool,
           verbose: int) -> None:
    """Export MODEL's outer step as ONNX (FP32, FP16, INT8) and, on a GPU, TensorRT engines.

    MODEL is an eqr checkpoint, an official EqR checkpoint (.pth), a bundled model name or a
    preset (paper-sudoku, paper-maze: fresh initialisation). Every graph is checked in ONNX
    Runtime against model.step before it is written (FP32 must match within 1e-4 of each
    output's RMS per step); manifest.json records the checks and a recommended convergence
    tolerance per precision. The manifest is printed as JSON with --json.

    \b
    Examples:
      eqr-export --precision fp16 model.pt
      eqr export sudoku-small --precision fp16,int8 --out sudoku-trt
      eqr export step_50000.pth --precision int8 --calib-data calib.npz --batch 1:128:512
      eqr export paper-sudoku --engine never --json > manifest.json
      eqr export sudoku-small --precision int8 --batch 32 --dla-core 0   # Jetson DLA
      eqr export sudoku-small --noisy        # + model.step.noisy.onnx, for eqr solve --noise 0.01

    \b
    Exit status: 0 exported; 1 a check or the engine build failed (or --engine always
    without TensorRT/GPU); 2 bad input (model, flags, output directory); 130 interrupted.
    """
    from eqr.calibration.record import int8_calibration
    from eqr.export.exporter import export_model
    from eqr.model.load import load_model

    config = ExportConfig(precision=precision, batch=parse_batch(batch), opset=opset, engine=engine,
                          calib_data=calib_data, force=force, seed=seed, check_batch=check_batch,
                          check_steps=check_steps, workspace_mib=workspace_mib, threads=threads, dla_core=dla_core,
                          noise=noise)
    progress = Progress(quiet)
    loaded = load_model(model, weights=weights)
    calibrate = int8_calibration(loaded, config) if any(PRECISIONS[p].calibrated for p in config.precisions) else None  # reads --calib-data now
    with _terminate_cleanly():
        manifest = export_model(loaded, out, config, progress=progress, calibrate=calibrate)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
