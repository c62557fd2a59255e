"""`eqr calibrate` (calibration states, FP16/INT8 graphs) and `eqr report` (precision regression report)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click
import numpy as np

from eqr.contract.artifact import CASCADES, PRECISIONS, describe_rule
from eqr.calibration.config import METHODS, CalibConfig, ReportConfig, parse_ints
from eqr.cli_options import Progress, backend_option, calib_data_option, force_option, out_option, output_options, \
    precision_option
from eqr.contract.errors import EqRError
from eqr.runtime.backends.registry import backend_names
from eqr.runtime.cli import backend_info, describe_run

BUILT_BY = "eqr calibrate"  # manifest precisions[p]["built_by"] of the graphs calibrate owns
CALIBRATED = ("fp16", "int8")
log = logging.getLogger(__name__)


def _export_artifact(export_dir: str) -> Any:
    from eqr.runtime.resolve import load_artifact

    artifact = load_artifact(export_dir)
    if artifact.kind != "export":
        raise EqRError(f"{export_dir}: expected an export directory (made by `eqr export`), got a {artifact.kind}")
    return artifact


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


# --------------------------------------------------------------------------- eqr calibrate


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@calib_data_option(old=("--data",), help="Puzzles to calibrate on: a data set directory (`eqr data generate`) "
                                         "or an .npz with 'inputs' [N, L] [default: generated].")
@click.option("--generate", "puzzles", type=int, default=CalibConfig.puzzles, show_default=True,
              help="Puzzles of the export's task to generate (or the first N of --calib-data).")
@click.option("--starts", type=int, default=CalibConfig.starts, show_default=True,
              help="Random initial states per puzzle.")
@click.option("--depths", default=",".join(map(str, CalibConfig.depths)), show_default=True,
              help="Steps after which the step inputs are recorded (0 = the random start).")
@click.option("--method", type=click.Choice(METHODS), default="minmax", show_default=True,
              help="INT8 activation range estimator.")
@click.option("--op-types", default="MatMul,Gemm", show_default=True, help="Op types quantized to INT8.")
@click.option("--exclude-nodes", default="", help="Node names kept FP32 (see the report's INT8 diagnosis).")
@click.option("--percentile", type=float, default=CalibConfig.percentile, show_default=True,
              help="Percentile of --method percentile.")
@click.option("--keep-fp32-ops", default=None, help="FP16: op types kept FP32 (default: the export's list).")
@precision_option(default=(), choices=CALIBRATED, old="--precisions",
                  help="Graphs to build (repeat or comma list) [default: fp16 and int8, except a graph "
                       "`eqr export` wrote itself].")
@click.option("--seed", type=int, default=0, show_default=True, help="Puzzles and initial states.")
@click.option("--rule-puzzles", type=int, default=CalibConfig.rule_puzzles, show_default=True,
              help="Labelled puzzles (generated with --seed + 1, or the first N of --calib-data) the stopping rules "
              "are fitted on (half) and measured on (the other half); 0: keep the current rules.")
@click.option("--rule-steps", type=int, default=CalibConfig.rule_steps, show_default=True,
              help="Steps of the recorded trajectories the stopping rules are replayed on.")
@click.option("--rule-margin", type=float, default=CalibConfig.rule_margin, show_default=True,
              help="Accuracy points a stopping rule may lose against the best fixed depth.")
@force_option(help="Also replace graphs that `eqr export` wrote (calibrate's own files are always replaced).")
@output_options
def calibrate(export_dir: str, calib_data: str | None, puzzles: int, starts: int, depths: str, method: str,
              op_types: str, exclude_nodes: str, percentile: float, keep_fp32_ops: str | None,
              precision: tuple[str, ...], seed: int, rule_puzzles: int, rule_steps: int, rule_margin: float,
              force: bool, as_json: bool, quiet: bool, verbose: int) -> None:
    """Record trajectory-aware calibration states and build the FP16/INT8 graphs of EXPORT_DIR.

    Runs the FP32 loop from --starts random states per puzzle, records the step inputs
    (tokens, z_H, z_L) at every --depths, saves them as EXPORT_DIR/calib.npz with their
    provenance, then writes model.step.fp16.onnx / model.step.int8.onnx (symmetric Q/DQ;
    by default only MatMul/Gemm) and their tolerances into manifest.json. It adds to the
    export: re-running replaces its own files, and a graph `eqr export` wrote is kept
    unless named in --precision with --force.

    Then, per precision (fp32 and each one built), it records --rule-steps steps of one
    trajectory per --rule-puzzles puzzle and fits the stopping rule (max_steps, tol, patience,
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
                      percentile=percentile, keep_fp32_ops=None if keep_fp32_ops is None else _names(keep_fp32_ops),
                      precisions=precision, force=force, rule_puzzles=rule_puzzles, rule_steps=rule_steps,
                      rule_margin=rule_margin)
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


def plan_precisions(manifest: dict[str, Any], root: Path, requested: tuple[str, ...],
                    force: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """-> (graphs to build, export-written graphs kept). Calibrate replaces its own graphs freely;
    one `eqr export` wrote only when named in --precision with --force."""
    def foreign(p: str) -> bool:
        entry = manifest["precisions"].get(p) or {}
        return (root / PRECISIONS[p].onnx).exists() and entry.get("built_by") != BUILT_BY

    if not requested:
        return tuple(p for p in CALIBRATED if not foreign(p)), tuple(p for p in CALIBRATED if foreign(p))
    clash = [str(root / PRECISIONS[p].onnx) for p in requested if foreign(p)]
    if clash and not force:
        raise EqRError(f"{', '.join(clash)}: written by `eqr export`; pass --force to replace "
                       f"{'it' if len(clash) == 1 else 'them'} with calibrated graphs, or leave "
                       f"{'it' if len(clash) == 1 else 'them'} out of --precision")
    return requested, ()


def run_calibrate(export_dir: str, data: str | None, cfg: CalibConfig,
                  progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The work of `eqr calibrate` -> (the manifest entries it wrote, {calib, states, kept, recorded_on})."""
    from eqr.contract.artifact import CALIB_FILE, read_manifest, update_manifest, with_precision
    from eqr.calibration.data import load_puzzles
    from eqr.calibration.quantize import embed_manifest, fp32_onnx
    from eqr.calibration.record import record_calibration, save_calib
    from eqr.contract.io import sha256_file
    from eqr.runtime import Solver

    progress = progress or Progress(quiet=True)
    artifact = _export_artifact(export_dir)
    manifest = read_manifest(export_dir)
    fp32_onnx(export_dir)  # the graph the others derive from must be there
    root = Path(export_dir)
    build, kept = plan_precisions(manifest, root, cfg.precisions, cfg.force)
    puzzles = load_puzzles(artifact.task, artifact.seq_len, data, cfg.puzzles, cfg.seed)
    fp32_path = artifact.onnx["fp32"]
    provenance = {"model": {"fp32_onnx": fp32_path.name, "fp32_onnx_sha256": sha256_file(fp32_path),
                            "source": manifest.get("source")},
                  "data": puzzles.source, "config": cfg.to_dict()}
    with progress.bar("recording FP32 trajectories", len(puzzles) * cfg.starts) as advance:
        with Solver.load(artifact, backend="onnxruntime", precision="fp32") as solver:
            calib = record_calibration(solver, puzzles.inputs, cfg.starts, cfg.depths, cfg.seed, provenance,
                                       progress=advance)
            recorded_on = backend_info(solver.backend)
    save_calib(root / CALIB_FILE, calib, force=True)  # calibrate's own file
    rules_on = load_puzzles(artifact.task, artifact.seq_len, data, cfg.rule_puzzles, cfg.seed + 1) \
        if cfg.rule_puzzles else None
    if rules_on is not None and rules_on.labels is None:
        log.warning("--calib-data %s has no labels: the stopping rules are not fitted", data)
        rules_on = None
    calibration = {"file": CALIB_FILE, "states": len(calib), "sha256": sha256_file(root / CALIB_FILE),
                   "puzzles": len(puzzles), "starts": cfg.starts, "depths": list(cfg.depths),
                   "seed": cfg.seed, "data": puzzles.source}
    # fp32 and the export's own graphs only get a stopping rule; the graphs calibrate builds get everything
    measured = ("fp32", *build, *kept) if rules_on is not None else build
    entries: dict[str, dict[str, Any]] = {}
    with progress.bar("building precision graphs and fitting stopping rules", len(measured)) as advance:
        for precision in measured:
            built = precision in build
            entry = build_graph(export_dir, precision, calib, cfg) if built else {}
            onnx_name = entry.get("onnx") or artifact.onnx[precision].name
            entry |= measure_precision(export_dir, precision, onnx_name, puzzles.inputs if rules_on is None
                                       else rules_on.inputs, None if rules_on is None else rules_on.labels, cfg)
            if not built:
                entry.pop("tol"), entry.pop("tol_rule")  # its tol is the export's (its parity run)
            if rules_on is not None:
                entry["stopping"]["data"] = rules_on.source
            update_manifest(export_dir, precision, entry, calibration if built else None, replace=built)
            entries[precision] = entry
            advance(1)
    # Every graph this run built describes itself (a copy of it runs like this directory, with every
    # precision's stopping rule); its own hash cannot be inside it, so manifest.json records that
    # after the metadata is written. Graphs `eqr export` wrote (fp32 included) keep their bytes: the
    # engines built from them and calib.npz's provenance name their hashes; their stopping rules
    # live in manifest.json.
    for precision in build:
        path = root / PRECISIONS[precision].onnx
        manifest = with_precision(read_manifest(export_dir), precision, {})  # a copy
        manifest["precisions"][precision].pop("sha256", None)
        embed_manifest(path, manifest, precision)
        entries[precision]["sha256"] = sha256_file(path)
        update_manifest(export_dir, precision, {"sha256": entries[precision]["sha256"]})
    info = {"calib": str(root / CALIB_FILE), "states": len(calib), "kept": list(kept), "recorded_on": recorded_on}
    return entries, info


def build_graph(export_dir: str, precision: str, calib: Any, cfg: CalibConfig) -> dict[str, Any]:
    """Write calibrate's FP16 or INT8 graph of the export -> its manifest entry."""
    from eqr.calibration.quantize import QuantPolicy, build_fp16, build_int8

    if precision == "fp16":
        entry = build_fp16(export_dir, cfg.keep_fp32_ops, force=True)
    else:
        policy = QuantPolicy(cfg.method, cfg.op_types, cfg.exclude_nodes, cfg.percentile)
        entry = build_int8(export_dir, calib, policy, force=True)
    return entry | {"built_by": BUILT_BY}


def measure_precision(export_dir: str, precision: str, onnx_name: str, inputs: np.ndarray,
                      labels: np.ndarray | None, cfg: CalibConfig) -> dict[str, Any]:
    """One recorded fixed-depth run of this graph: the export's tol rule applied to the residual
    floor it reaches and, with labels, the fitted stopping rule (`eqr.calibration.stopping`)."""
    from eqr.contract.artifact import recommended_tol
    from eqr.calibration.stopping import fit_and_evaluate, record_trajectories
    from eqr.runtime import Solver
    from eqr.runtime.backends.ort_backend import OrtBackend

    artifact = _export_artifact(export_dir)
    backend = OrtBackend(Path(export_dir) / onnx_name, precision=precision)
    solver = Solver(backend, artifact.seq_len, artifact.hidden_size, artifact.init_std, precision=precision)
    steps = max(cfg.rule_steps if labels is not None else cfg.max_depth, 2)
    with solver:
        traj = record_trajectories(solver, inputs, steps, cfg.seed)
    tail = traj.residual[steps // 2:]  # late residuals (N/2, P)
    floor = float(np.median(np.nanmin(np.where(np.isfinite(tail), tail, np.inf), axis=0)))
    rule = recommended_tol(precision, floor)
    entry: dict[str, Any] = {"tol": rule["tol"], "tol_rule": rule}
    if labels is not None:
        entry["stopping"] = fit_and_evaluate(traj, labels, cfg.rule_margin)
    return entry


# --------------------------------------------------------------------------- eqr report


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--data", default=None, help="Puzzles with labels: a data set directory or .npz (inputs, labels).")
@click.option("--generate", "puzzles", type=int, default=ReportConfig.puzzles, show_default=True,
              help="Puzzles of the export's task to generate (or the first N of --data).")
@precision_option(default=(), choices=(*PRECISIONS, *CASCADES), old="--precisions",
                  help="Precisions to compare (repeat or comma list), and cascades (int8+fp32, fp16+fp32) to add "
                       "to the decision table [default: every graph in the export and every cascade it can run].")
@backend_option(choices=backend_names(), default=("onnxruntime", "torch"), multiple=True, old="--backends",
                help="Backends (repeat or comma list); pairs a backend cannot run (torch at fp16/int8) are "
                     "listed as not run.")
@click.option("--depths", default=",".join(map(str, ReportConfig.depths)), show_default=True,
              help="Fixed depths of the accuracy curve.")
@click.option("--breadth", default="1,8", show_default=True, help="Trajectories per puzzle (vote / converged).")
@click.option("--max-drop", type=float, default=None,
              help="Accuracy points a precision may lose vs FP32 [default: fp16 0.5, int8 2].")
@click.option("--min-agreement", type=float, default=ReportConfig.min_agreement, show_default=True,
              help="Fraction of puzzles whose answer must equal FP32's.")
@click.option("--max-steps", type=int, default=ReportConfig.max_steps, show_default=True,
              help="Cap of the gated runs and length of the residual-floor run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Puzzles and initial states (all runs).")
@calib_data_option(old=("--calib",), help="calib.npz for the per-step state error [default: EXPORT_DIR/calib.npz, "
                                          "else states recorded on the report's puzzles].")
@out_option(help="Output directory [default: EXPORT_DIR/report].")
@click.option("--card", default=None, help="Also record the results in this model card (directory or bundled name).")
@force_option(help="Write into an --out that holds other files (a report there is always replaced).")
@output_options
@click.pass_context
def report(ctx: click.Context, export_dir: str, data: str | None, puzzles: int, precision: tuple[str, ...],
           backend: tuple[str, ...], depths: str, breadth: str, max_drop: float | None, min_agreement: float,
           max_steps: int, seed: int, calib_data: str | None, out: str | None, card: str | None, force: bool,
           as_json: bool, quiet: bool, verbose: int) -> None:
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
    artifact = _export_artifact(export_dir)
    cascades = tuple(n for n in precision if n in CASCADES)
    plain = tuple(n for n in precision if n not in CASCADES)
    cfg = ReportConfig(precisions=plain or tuple(p for p in PRECISIONS if p in artifact.onnx),
                       cascades=cascades or None, backends=backend,
                       depths=tuple(sorted(set(parse_ints(depths, "--depths")))),
                       breadth=tuple(sorted(set(parse_ints(breadth, "--breadth")))), puzzles=puzzles, seed=seed,
                       max_steps=max_steps, max_drop=max_drop, min_agreement=min_agreement)
    result = run_report(export_dir, data, cfg, calib_data, out, force, card, progress)
    if as_json:
        click.echo(json.dumps({k: result[k] for k in ("passed", "failures", "reference", "skipped")} |
                              {"out": result["out"], "runs": run_backends(result)}, indent=2))
    else:
        for line in summary_lines(result):
            click.echo(line)
    if not result["passed"]:
        for failure in result["failures"]:
            click.echo(f"regression: {failure}", err=True)
        ctx.exit(1)


def run_backends(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{run name: what ran it (backend, precision, device, providers)} from report.json."""
    return {name: {k: v for k, v in run.get("describe", {}).items() if k not in ("onnx", "engine")}
            for name, run in report["runs"].items()}


def check_report_out(out: Path, force: bool) -> None:
    """A report replaces an earlier report; other files in --out need --force."""
    if out.exists() and not out.is_dir():
        raise EqRError(f"--out {out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file() and not force:
        raise EqRError(f"--out {out}: holds files that are not an eqr report; pass --force to write there "
                       "or choose another --out")


def run_report(export_dir: str, data: str | None, cfg: ReportConfig, calib_path: str | None, out_dir: str | None,
               force: bool, card: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Collect, save results.npz, judge into report.json, render from report.json; returns the report."""
    from eqr.calibration.collect import collect, plan_units, runnable_pairs, save_results
    from eqr.calibration.compare import compare
    from eqr.calibration.data import load_puzzles
    from eqr.calibration.render import load_report, render
    from eqr.contract.artifact import REPORT_DIR
    from eqr.contract.io import atomic_write_text

    progress = progress or Progress(quiet=True)
    artifact = _export_artifact(export_dir)
    out = Path(out_dir) if out_dir else Path(export_dir) / REPORT_DIR
    check_report_out(out, force)
    pairs, skipped = runnable_pairs(artifact, cfg)
    missing = [p for p in cfg.precisions if not any(pp == p for _, pp in pairs)]
    if missing:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items() if k.endswith(tuple(missing)))
        no_graph = [p for p in missing if not (p in artifact.onnx and artifact.onnx[p].is_file())]
        build = f"build with `eqr calibrate {export_dir} --precision {','.join(no_graph)}`, " if no_graph else ""
        raise EqRError(f"{export_dir}: no backend can run {', '.join(missing)} ({reasons}); {build}"
                       "leave them out of --precision or pass another --backend")
    if not any(p == "fp32" for _, p in pairs):
        raise EqRError("--precision must include fp32: every precision is compared with it")
    puzzles = load_puzzles(artifact.task, artifact.seq_len, data, cfg.puzzles, cfg.seed)
    calib = _report_calib(artifact, export_dir, calib_path, puzzles, cfg, progress)
    out.mkdir(parents=True, exist_ok=True)
    with progress.bar("precision report", plan_units(cfg, len(pairs))) as advance:
        results = collect(artifact, puzzles, cfg, calib, advance)
    judged = compare(results, cfg)
    save_results(out / "results.npz", results, judged["reference"])
    report_json = out / "report.json"
    atomic_write_text(report_json, json.dumps(judged, indent=2) + "\n")
    saved = load_report(report_json)  # render from the file, as anyone re-rendering it would
    render(saved, out)
    if card is not None:
        from eqr.calibration.card import record_in_card

        record_in_card(saved, card)
    return saved | {"out": str(out)}


def _report_calib(artifact: Any, export_dir: str, calib_path: str | None, puzzles: Any, cfg: ReportConfig,
                  progress: Progress) -> Any:
    """--calib-data, else EXPORT_DIR/calib.npz, else a fresh small recording on the report's puzzles."""
    from eqr.contract.artifact import CALIB_FILE
    from eqr.calibration.record import load_calib, record_calibration
    from eqr.runtime import Solver

    path = Path(calib_path) if calib_path else Path(export_dir) / CALIB_FILE
    if calib_path or path.is_file():
        return load_calib(path, artifact.seq_len, artifact.hidden_size)
    depths = sorted({0, *cfg.depths})
    with progress.bar("recording calibration states", min(len(puzzles), 16)) as advance:
        with Solver.load(artifact, backend="onnxruntime", precision="fp32") as solver:
            return record_calibration(solver, puzzles.inputs[:16], 1, depths, cfg.seed,
                                      {"data": puzzles.source}, progress=advance)


def summary_lines(report: dict[str, Any]) -> list[str]:
    from eqr.calibration.render import summary_rows

    rows = summary_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    headline = (report.get("decision") or {}).get("headline")
    if headline:
        lines.append(headline)
    runs = run_backends(report)
    lines.append("ran on: " + "; ".join(f"{name} {describe_run(info)}" for name, info in runs.items()))
    lines.append(f"{'PASSED' if report['passed'] else 'FAILED'}: {report['out']}/report.html")
    return lines
