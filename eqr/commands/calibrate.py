"""`eqr calibrate` (calibration states, FP16/INT8 graphs) and `eqr report` (precision regression report)."""
from __future__ import annotations

import json
from typing import Any

import click

from eqr.calibration.calibrate import CALIBRATED, export_artifact, run_calibrate
from eqr.calibration.config import CalibConfig, ReportConfig, parse_ints
from eqr.calibration.report import run_backends, run_report, summary_lines
from eqr.commands.options import (backend_option, calib_data_option, force_option, out_option, output_options,
                                  precision_option)
from eqr.contract.artifact import BASE_PRECISIONS, CASCADES, PRECISIONS
from eqr.contract.progress import Progress
from eqr.export.int8 import CALIBRATION_METHODS
from eqr.runtime.backends.base import describe_run
from eqr.runtime.backends.registry import backend_names
from eqr.runtime.stopping_rules import describe_rule


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


# --------------------------------------------------------------------------- eqr calibrate


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@calib_data_option(help="Puzzles to calibrate on: a data set directory (`eqr data generate`) "
                                         "or an .npz with 'inputs' [N, L] [default: generated].")
@click.option("--generate", "puzzles", type=int, default=CalibConfig.puzzles, show_default=True,
              help="Puzzles of the export's task to generate (or the first N of --calib-data).")
@click.option("--starts", type=int, default=CalibConfig.starts, show_default=True,
              help="Random initial states per puzzle.")
@click.option("--depths", default=",".join(map(str, CalibConfig.depths)), show_default=True,
              help="Steps after which the step inputs are recorded (0 = the random start).")
@click.option("--method", type=click.Choice(CALIBRATION_METHODS), default=CalibConfig.method, show_default=True,
              help="INT8 activation range estimator.")
@click.option("--op-types", default=",".join(CalibConfig.op_types), show_default=True, help="Op types quantized to INT8.")
@click.option("--exclude-nodes", default="", help="Node names kept FP32 (see the report's INT8 diagnosis).")
@click.option("--percentile", type=float, default=CalibConfig.percentile, show_default=True,
              help="Percentile of --method percentile.")
@click.option("--reduce-range/--no-reduce-range", default=CalibConfig.reduce_range, show_default=True,
              help="int8-cpu: 7-bit weights, ONNX Runtime's advice for x86 CPUs without VNNI (their U8S8 "
                   "kernel can saturate); VNNI CPUs and ARM take 8 bits.")
@click.option("--keep-fp32-ops", default=None, help="FP16: op types kept FP32 (default: the export's list).")
@precision_option(default=(), choices=CALIBRATED,
                  help="Graphs to build (repeat or comma list): fp16, int8 (TensorRT's, and int8-cpu with it), "
                       "int8-cpu (ONNX Runtime CPU's integer kernels, which int8 on the CPU provider runs) "
                       "[default: fp16 and int8, except a graph `eqr export` wrote itself].")
@click.option("--seed", type=int, default=0, show_default=True, help="Puzzles and initial states.")
@click.option("--rule-puzzles", type=int, default=CalibConfig.rule_puzzles, show_default=True,
              help="Labelled puzzles (generated with --seed + 1, or the first N of --calib-data) the stopping rules "
              "are fitted on (half) and measured on (the other half); 0: keep the current rules.")
@click.option("--rule-steps", type=int, default=CalibConfig.rule_steps, show_default=True,
              help="Steps of the recorded trajectories the stopping rules are replayed on.")
@click.option("--rule-margin", type=float, default=CalibConfig.rule_margin, show_default=True,
              help="Accuracy points a stopping rule may lose against the best fixed depth.")
@click.option("--rule-breadth", type=int, default=CalibConfig.rule_breadth, show_default=True,
              help="Trajectories per rule puzzle: fit the rules for solving at this --breadth (the answer the "
              "converged aggregation picks is judged).")
@force_option(help="Also replace graphs that `eqr export` wrote (calibrate's own files are always replaced).")
@output_options
def calibrate(export_dir: str, calib_data: str | None, puzzles: int, starts: int, depths: str, method: str,
              op_types: str, exclude_nodes: str, percentile: float, reduce_range: bool, keep_fp32_ops: str | None,
              precision: tuple[str, ...], seed: int, rule_puzzles: int, rule_steps: int, rule_margin: float,
              rule_breadth: int, force: bool, as_json: bool, quiet: bool, verbose: int) -> None:
    """Record trajectory-aware calibration states and build the FP16/INT8 graphs of EXPORT_DIR.

    Runs the export's FP32 step graph in ONNX Runtime (no torch: eqr[cpu,calibrate] is enough,
    docs/jetson.md) from --starts random states per puzzle, records the step inputs
    (tokens, z_H, z_L) at every --depths, saves them as EXPORT_DIR/calib.npz with their
    provenance, then writes model.step.fp16.onnx / model.step.int8.onnx (symmetric Q/DQ;
    by default only MatMul/Gemm) and their tolerances into manifest.json. It adds to the
    export: re-running replaces its own files, and a graph `eqr export` wrote is kept
    unless named in --precision with --force.

    Then, per precision (fp32 and each one built), it records --rule-steps steps of
    --rule-breadth trajectories per --rule-puzzles puzzle and fits the stopping rule (max_steps, tol, patience,
    stable window, q_halt and its threshold) with the fewest mean steps whose exact accuracy stays
    within --rule-margin points of the best fixed depth, on half the puzzles; the other half
    measures it. The rule, its held-out accuracy and mean steps go into manifest.json, and
    `eqr solve`, `Solver` and `Scheduler` use it by default (docs/algorithm.md).

    \b
    Examples:
      eqr calibrate sudoku-eqr/
      eqr calibrate sudoku-eqr/ --method percentile --precision int8
      eqr calibrate maze-eqr/ --calib-data data/maze --generate 32 --starts 8
      eqr calibrate sudoku-eqr/ --precision fp16,int8 --force
      eqr calibrate sudoku-eqr/ --exclude-nodes /blocks.0/mlp/down/MatMul
      eqr calibrate maze-eqr/ --rule-puzzles 512 --rule-margin 0.5
    """
    progress = Progress(quiet)
    cfg = CalibConfig(puzzles=puzzles, starts=starts, depths=parse_ints(depths, "--depths"), seed=seed,
                      method=method, op_types=_names(op_types), exclude_nodes=_names(exclude_nodes),
                      percentile=percentile, reduce_range=reduce_range, keep_fp32_ops=None if keep_fp32_ops is None else _names(keep_fp32_ops),
                      precisions=precision, force=force, rule_puzzles=rule_puzzles, rule_steps=rule_steps,
                      rule_margin=rule_margin, rule_breadth=rule_breadth)
    entries, info = run_calibrate(export_dir, calib_data, cfg, progress)
    if as_json:
        click.echo(json.dumps({"precisions": entries} | info, indent=2, default=str))
        return
    for precision, entry in entries.items():
        extra = ""
        if "scale_change_vs_minmax" in entry:
            change = entry["scale_change_vs_minmax"]
            extra = f", {100 * change['changed_fraction']:.0f}% of scales moved vs minmax (median x{change['median_ratio']:.3f})"
        if "onnx" in entry and "tol_rule" in entry:
            click.echo(f"{precision}: {entry['onnx']}, tol {entry['tol']:.3g} (residual floor "
                       f"{entry['tol_rule']['residual_floor']:.3g}){extra}")
        if "stopping" in entry:
            click.echo(f"{precision}: stopping rule {rule_text(entry['stopping'])}")
    for precision in info["kept"]:
        click.echo(f"{precision}: kept the export's graph (pass --precision {precision} --force to calibrate it)")
    progress.note(f"{info['calib']}: {info['states']} states recorded on {describe_run(info['recorded_on'])}")


def rule_text(stopping: dict[str, Any]) -> str:
    """One line: the rule, then its held-out accuracy and mean steps against the best fixed depth."""
    held = stopping["heldout"]
    return (f"{describe_rule(stopping['rule'])}: held-out {held['accuracy']:.1f}% at {held['mean_steps']:.2f} "
            f"mean steps "
            f"(fixed depth {held['fixed_depth']}, the best on the fitting half: {held['fixed_depth_accuracy']:.1f}%; "
            f"{held['puzzles']} puzzles)")


# --------------------------------------------------------------------------- eqr report


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--data", default=None, help="Puzzles with labels: a data set directory or .npz (inputs, labels).")
@click.option("--generate", "puzzles", type=int, default=ReportConfig.puzzles, show_default=True,
              help="Puzzles of the export's task to generate (or the first N of --data).")
@precision_option(default=(), choices=(*PRECISIONS, *CASCADES),
                  help="Precisions to compare (repeat or comma list), and cascades (int8+fp32, fp16+fp32) to add "
                       "to the decision table [default: every graph in the export and every cascade it can run].")
@backend_option(choices=backend_names(), default=("onnxruntime", "torch"), multiple=True,
                help="Backends (repeat or comma list); pairs a backend cannot run (torch at fp16/int8) are "
                     "listed as not run, a backend that runs none (torch where it is not installed) once.")
@click.option("--depths", default=",".join(map(str, ReportConfig.depths)), show_default=True,
              help="Fixed depths of the accuracy curve.")
@click.option("--breadth", default="1,8", show_default=True, help="Trajectories per puzzle (vote / converged).")
@click.option("--top-k", type=click.IntRange(min=1), default=ReportConfig.top_k, show_default=True,
              help="Trajectories of the official convergence top-k metrics (each breadth > 1, with labels).")
@click.option("--max-drop", type=float, default=None,
              help="Accuracy points a precision may lose vs FP32 [default: fp16 0.5, int8 2].")
@click.option("--min-agreement", type=float, default=ReportConfig.min_agreement, show_default=True,
              help="Fraction of puzzles whose answer must equal FP32's.")
@click.option("--max-steps", type=int, default=ReportConfig.max_steps, show_default=True,
              help="Cap of the gated runs and length of the residual-floor run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Puzzles and initial states (all runs).")
@click.option("--noise", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SIGMA",
              help="Path noise of every solve (the official evaluation's is 0.01); runs whose export has no noisy "
                   "graph (eqr export --noisy) are skipped.")
@calib_data_option(help="calib.npz for the per-step state error [default: EXPORT_DIR/calib.npz, "
                                          "else states recorded on the report's puzzles].")
@out_option(help="Output directory [default: EXPORT_DIR/report].")
@click.option("--card", default=None, help="Also record the results in this model card (directory or bundled name).")
@force_option(help="Write into an --out that holds other files (a report there is always replaced).")
@output_options
@click.pass_context
def report(ctx: click.Context, export_dir: str, data: str | None, puzzles: int, precision: tuple[str, ...],
           backend: tuple[str, ...], depths: str, breadth: str, max_drop: float | None, min_agreement: float,
           max_steps: int, seed: int, noise: float, calib_data: str | None, out: str | None, card: str | None,
           force: bool, as_json: bool, quiet: bool, verbose: int, top_k: int) -> None:
    """Accuracy, convergence and contraction of every precision x backend vs FP32.

    Runs each precision on the same puzzles and initial-state seeds; writes report.json,
    report.md, report.html and PNG plots (re-running replaces them). Exit 1 when a
    precision's accuracy drops more than --max-drop points below FP32 or its answers agree
    with FP32 on fewer than --min-agreement of the puzzles (each failure is printed); exit 0
    otherwise. The summary and --json name the backend and provider(s) of every run.

    \b
    Examples:
      eqr report sudoku-eqr/
      eqr report sudoku-eqr/ --precision fp32,int8 --max-drop 2 --depths 1,4,16,64
      eqr report maze-eqr/ --data data/maze --generate 128 --breadth 1,16 --out maze-report
      eqr report sudoku-eqr/ --card cpu-sudoku-4x4
    """
    progress = Progress(quiet)
    artifact = export_artifact(export_dir)
    cascades = tuple(n for n in precision if n in CASCADES)
    plain = tuple(n for n in precision if n not in CASCADES)
    cfg = ReportConfig(precisions=plain or tuple(p for p in BASE_PRECISIONS if p in artifact.onnx),
                       cascades=cascades or None, backends=backend,
                       depths=tuple(sorted(set(parse_ints(depths, "--depths")))),
                       breadth=tuple(sorted(set(parse_ints(breadth, "--breadth")))), puzzles=puzzles, seed=seed,
                       max_steps=max_steps, max_drop=max_drop, min_agreement=min_agreement, top_k=top_k,
                       noise=noise)
    result = run_report(export_dir, data, cfg, calib_data, out, force, card, progress)
    if as_json:
        click.echo(json.dumps({k: result[k] for k in ("passed", "failures", "reference", "skipped")} |
                              {"out": result["out"], "runs": run_backends(result),
                               "official_metrics": {n: r["official_metrics"] for n, r in result["runs"].items()}},
                              indent=2))
    else:
        for line in summary_lines(result):
            click.echo(line)
    if not result["passed"]:
        for failure in result["failures"]:
            click.echo(f"regression: {failure}", err=True)
        ctx.exit(1)


