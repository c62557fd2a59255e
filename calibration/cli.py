"""`eqr calibrate` (calibration states, FP16/INT8 graphs) and `eqr report` (precision regression report)."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from eqr.artifact import PRECISIONS
from eqr.calibration.config import METHODS, CalibConfig, ReportConfig, parse_ints, parse_names
from eqr.errors import EqRError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def progress_bar(label: str, length: int, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A stderr progress bar; yields `advance(n)`."""
    if quiet:
        yield lambda n: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update


def _export_artifact(export_dir: str) -> Any:
    from eqr.runtime.artifact import load_artifact

    artifact = load_artifact(export_dir)
    if artifact.kind != "export":
        raise EqRError(f"{export_dir}: expected an export directory (made by `eqr export`), got a {artifact.kind}")
    return artifact


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


# --------------------------------------------------------------------------- eqr calibrate


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--data", default=None, help="Puzzles: a data set directory (eqr data generate) or .npz with 'inputs'.")
@click.option("--generate", "puzzles", type=int, default=CalibConfig.puzzles, show_default=True,
              help="Puzzles of the export's task to generate (or the first N of --data).")
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
@click.option("--precisions", default="fp16,int8", show_default=True, help="Graphs to build: fp16, int8.")
@click.option("--seed", type=int, default=0, show_default=True, help="Puzzles and initial states.")
@click.option("--rule-puzzles", type=int, default=CalibConfig.rule_puzzles, show_default=True,
              help="Labelled puzzles (generated with --seed + 1, or the first N of --data) the stopping rules are "
              "fitted on (half) and measured on (the other half); 0: keep the current rules.")
@click.option("--rule-steps", type=int, default=CalibConfig.rule_steps, show_default=True,
              help="Steps of the recorded trajectories the stopping rules are replayed on.")
@click.option("--rule-margin", type=float, default=CalibConfig.rule_margin, show_default=True,
              help="Accuracy points a stopping rule may lose against the best fixed depth.")
@click.option("--force", is_flag=True, help="Replace calib.npz and existing precision graphs.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest entries as JSON.")
def calibrate(export_dir: str, data: str | None, puzzles: int, starts: int, depths: str, method: str, op_types: str,
              exclude_nodes: str, percentile: float, keep_fp32_ops: str | None, precisions: str, seed: int,
              rule_puzzles: int, rule_steps: int, rule_margin: float, force: bool, as_json: bool) -> None:
    """Record trajectory-aware calibration states and build the FP16/INT8 graphs of EXPORT_DIR.

    Runs the FP32 loop from --starts random states per puzzle, records the step inputs
    (tokens, z_H, z_L) at every --depths, saves them as EXPORT_DIR/calib.npz with their
    provenance, then writes model.step.fp16.onnx / model.step.int8.onnx (symmetric Q/DQ;
    by default only MatMul/Gemm) and their tolerances into manifest.json.

    Then, per precision (fp32 and each one built), it records --rule-steps steps of one
    trajectory per --rule-puzzles puzzle and fits the stopping rule (max_steps, tol, patience,
    stable window, q_halt and its threshold) with the fewest mean steps whose exact accuracy stays
    within --rule-margin points of the best fixed depth, on half the puzzles; the other half
    measures it. The rule, its held-out accuracy and mean steps go into manifest.json, and
    `eqr solve`, `Solver` and `Scheduler` use it by default (docs/algorithm.md).

    \b
    Examples:
      eqr calibrate sudoku-eqr/
      eqr calibrate sudoku-eqr/ --method percentile --precisions int8 --force
      eqr calibrate maze-eqr/ --data data/maze --generate 32 --starts 8
      eqr calibrate sudoku-eqr/ --exclude-nodes /blocks.0/mlp/down/MatMul --force
      eqr calibrate maze-eqr/ --rule-puzzles 512 --rule-margin 0.5 --force
    """
    cfg = CalibConfig(puzzles=puzzles, starts=starts, depths=parse_ints(depths, "--depths"), seed=seed,
                      method=method, op_types=_names(op_types), exclude_nodes=_names(exclude_nodes),
                      percentile=percentile, keep_fp32_ops=None if keep_fp32_ops is None else _names(keep_fp32_ops),
                      precisions=parse_names(precisions, "--precisions", ("fp16", "int8")), force=force,
                      rule_puzzles=rule_puzzles, rule_steps=rule_steps, rule_margin=rule_margin)
    entries = run_calibrate(export_dir, data, cfg, quiet=as_json)
    if as_json:
        click.echo(json.dumps(entries, indent=2, default=str))
        return
    for precision, entry in entries.items():
        extra = ""
        if "scale_change_vs_minmax" in entry:
            change = entry["scale_change_vs_minmax"]
            extra = f", {100 * change['changed_fraction']:.0f}% of scales moved vs minmax (median x{change['median_ratio']:.3f})"
        if "onnx" in entry:
            click.echo(f"{precision}: {entry['onnx']}, tol {entry['tol']:.3g} (residual floor "
                       f"{entry['tol_rule']['residual_floor']:.3g}){extra}")
        if "stopping" in entry:
            click.echo(f"{precision}: stopping rule {rule_text(entry['stopping'])}")


def rule_text(stopping: dict[str, Any]) -> str:
    """One line: the rule, then its held-out accuracy and mean steps against the best fixed depth."""
    rule, held = stopping["rule"], stopping["heldout"]
    parts = [f"max_steps {rule['max_steps']}"]
    if rule.get("tol") is not None:
        parts.append(f"tol {rule['tol']:.3g} x{rule['patience']}")
    if rule.get("window") is not None:
        parts.append(f"window {rule['window']}")
    if rule.get("q_halt"):
        parts.append(f"q_halt > {rule['q_halt_threshold']:g} x{rule['patience']}")
    return (f"{', '.join(parts)}: held-out {held['accuracy']:.1f}% at {held['mean_steps']:.2f} mean steps "
            f"(fixed depth {held['fixed_depth']}, the best on the fitting half: {held['fixed_depth_accuracy']:.1f}%; "
            f"{held['puzzles']} puzzles)")


def run_calibrate(export_dir: str, data: str | None, cfg: CalibConfig, quiet: bool = False) -> dict[str, Any]:
    """The work of `eqr calibrate`; returns the manifest entries it wrote."""
    from eqr.artifact import CALIB_FILE, read_manifest, update_manifest, with_precision
    from eqr.calibration.data import load_puzzles
    from eqr.calibration.quantize import QuantPolicy, build_fp16, build_int8, embed_manifest, fp32_onnx
    from eqr.calibration.record import record_calibration, save_calib
    from eqr.io import sha256_file
    from eqr.runtime import Solver

    artifact = _export_artifact(export_dir)
    manifest = read_manifest(export_dir)
    fp32_onnx(export_dir)  # the graph the others derive from must be there
    root = Path(export_dir)
    targets = [root / CALIB_FILE] + [root / PRECISIONS[p].onnx for p in cfg.precisions]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not cfg.force:
        raise EqRError(f"{', '.join(existing)} exist; pass --force to replace them")
    puzzles = load_puzzles(artifact.task, artifact.seq_len, data, cfg.puzzles, cfg.seed)
    fp32_path = artifact.onnx["fp32"]
    provenance = {"model": {"fp32_onnx": fp32_path.name, "fp32_onnx_sha256": sha256_file(fp32_path),
                            "source": manifest.get("source")},
                  "data": puzzles.source, "config": cfg.to_dict()}
    with progress_bar("recording FP32 trajectories", len(puzzles) * cfg.starts, quiet) as advance:
        with Solver.load(artifact, backend="onnxruntime", precision="fp32") as solver:
            calib = record_calibration(solver, puzzles.inputs, cfg.starts, cfg.depths, cfg.seed, provenance,
                                       progress=advance)
    save_calib(root / CALIB_FILE, calib, force=cfg.force)
    rules_on = load_puzzles(artifact.task, artifact.seq_len, data, cfg.rule_puzzles, cfg.seed + 1) \
        if cfg.rule_puzzles else None
    if rules_on is not None and rules_on.labels is None:
        log.warning("--data %s has no labels: the stopping rules are not fitted", data)
        rules_on = None
    entries: dict[str, dict[str, Any]] = {}
    calibration = {"file": CALIB_FILE, "states": len(calib), "sha256": sha256_file(root / CALIB_FILE),
                   "puzzles": len(puzzles), "starts": cfg.starts, "depths": list(cfg.depths),
                   "seed": cfg.seed, "data": puzzles.source}
    measured = ("fp32", *cfg.precisions) if rules_on is not None else cfg.precisions
    with progress_bar("building precision graphs and fitting stopping rules", len(measured), quiet) as advance:
        for precision in measured:
            entry: dict[str, Any] = {}
            if precision == "fp16":
                entry = build_fp16(export_dir, cfg.keep_fp32_ops, force=cfg.force)
            elif precision == "int8":
                policy = QuantPolicy(cfg.method, cfg.op_types, cfg.exclude_nodes, cfg.percentile)
                entry = build_int8(export_dir, calib, policy, force=cfg.force)
            onnx_name = entry.get("onnx") or artifact.onnx[precision].name
            entry |= measure_precision(export_dir, precision, onnx_name, puzzles.inputs if rules_on is None
                                       else rules_on.inputs, None if rules_on is None else rules_on.labels, cfg)
            if precision == "fp32":
                entry.pop("tol"), entry.pop("tol_rule")  # FP32's tol is the export's (its parity run)
            if rules_on is not None:
                entry["stopping"]["data"] = rules_on.source
            update_manifest(export_dir, precision, entry, None if precision == "fp32" else calibration)
            entries[precision] = entry
            advance(1)
    # Every graph this run touched describes itself (a copy of it runs like this directory, with
    # every precision's stopping rule); its own hash cannot be inside it, so manifest.json records
    # that after the metadata is written.
    for precision in measured:
        path = root / PRECISIONS[precision].onnx
        manifest = with_precision(read_manifest(export_dir), precision, {})  # a copy
        manifest["precisions"][precision].pop("sha256", None)
        embed_manifest(path, manifest, precision)
        entries[precision]["sha256"] = sha256_file(path)
        update_manifest(export_dir, precision, {"sha256": entries[precision]["sha256"]})
    return entries


def measure_precision(export_dir: str, precision: str, onnx_name: str, inputs: np.ndarray,
                      labels: np.ndarray | None, cfg: CalibConfig) -> dict[str, Any]:
    """One recorded fixed-depth run of this graph: the export's tol rule applied to the residual
    floor it reaches and, with labels, the fitted stopping rule (`eqr.calibration.stopping`)."""
    from eqr.artifact import recommended_tol
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
@click.option("--precisions", default=",".join(PRECISIONS), show_default=True,
              help="Precisions to compare, and cascades (int8+fp32, fp16+fp32) to add to the decision table "
              "[default: every cascade the export can run].")
@click.option("--backends", default="onnxruntime,torch", show_default=True,
              help="Backends; pairs a backend cannot run (torch at fp16/int8) are listed as not run.")
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
@click.option("--calib", default=None, help="calib.npz for the per-step state error [default: EXPORT_DIR/calib.npz].")
@click.option("--out", "out_dir", default=None, help="Output directory [default: EXPORT_DIR/report].")
@click.option("--card", default=None, help="Also record the results in this model card (directory or bundled name).")
@click.option("--force", is_flag=True, help="Replace an existing report in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json's verdict part as JSON.")
@click.pass_context
def report(ctx: click.Context, export_dir: str, data: str | None, puzzles: int, precisions: str, backends: str,
           depths: str, breadth: str, max_drop: float | None, min_agreement: float, max_steps: int, seed: int,
           calib: str | None, out_dir: str | None, card: str | None, force: bool, as_json: bool) -> None:
    """Accuracy, convergence and contraction of every precision x backend vs FP32.

    Runs each precision on the same puzzles and initial-state seeds; writes report.json,
    report.md, report.html and PNG plots. Exit 1 when a precision's accuracy drops more than
    --max-drop points below FP32 or its answers agree with FP32 on fewer than --min-agreement
    of the puzzles (each failure is printed); exit 0 otherwise.

    \b
    Examples:
      eqr report sudoku-eqr/
      eqr report sudoku-eqr/ --precisions fp32,int8 --max-drop 2 --depths 1,4,16,64
      eqr report maze-eqr/ --data data/maze --generate 128 --breadth 1,16 --out maze-report
      eqr report sudoku-eqr/ --card cpu-sudoku-4x4 --force
    """
    from eqr.runtime.backends.registry import backend_names

    from eqr.artifact import CASCADES

    names = parse_names(precisions, "--precisions", (*PRECISIONS, *CASCADES))
    cascades = tuple(n for n in names if n in CASCADES)
    cfg = ReportConfig(precisions=tuple(n for n in names if n not in CASCADES), cascades=cascades or None,
                       backends=parse_names(backends, "--backends", backend_names()),
                       depths=tuple(sorted(set(parse_ints(depths, "--depths")))),
                       breadth=tuple(sorted(set(parse_ints(breadth, "--breadth")))), puzzles=puzzles, seed=seed,
                       max_steps=max_steps, max_drop=max_drop, min_agreement=min_agreement)
    result = run_report(export_dir, data, cfg, calib, out_dir, force, card, quiet=as_json)
    if as_json:
        click.echo(json.dumps({k: result[k] for k in ("passed", "failures", "reference", "skipped")} |
                              {"out": result["out"]}, indent=2))
    else:
        for line in summary_lines(result):
            click.echo(line)
    if not result["passed"]:
        for failure in result["failures"]:
            click.echo(f"regression: {failure}", err=True)
        ctx.exit(1)


def run_report(export_dir: str, data: str | None, cfg: ReportConfig, calib_path: str | None, out_dir: str | None,
               force: bool, card: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Collect, save results.npz, judge into report.json, render from report.json; returns the report."""
    from eqr.calibration.collect import collect, plan_units, runnable_pairs, save_results
    from eqr.calibration.compare import compare
    from eqr.calibration.data import load_puzzles
    from eqr.calibration.render import load_report, render
    from eqr.io import atomic_write_text

    artifact = _export_artifact(export_dir)
    out = Path(out_dir) if out_dir else Path(export_dir) / "report"
    if (out / "report.json").exists() and not force:
        raise EqRError(f"{out}/report.json exists; pass --force to replace it or --out another directory")
    pairs, skipped = runnable_pairs(artifact, cfg)
    missing = [p for p in cfg.precisions if not any(pp == p for _, pp in pairs)]
    if missing:
        raise EqRError(f"{export_dir}: no backend can run {', '.join(missing)} "
                       f"({'; '.join(f'{k}: {v}' for k, v in skipped.items() if k.endswith(tuple(missing)))}); "
                       f"build them with `eqr calibrate {export_dir}` or drop them from --precisions")
    if not any(p == "fp32" for _, p in pairs):
        raise EqRError("--precisions must include fp32: every precision is compared with it")
    puzzles = load_puzzles(artifact.task, artifact.seq_len, data, cfg.puzzles, cfg.seed)
    calib = _report_calib(artifact, export_dir, calib_path, puzzles, cfg, quiet)
    out.mkdir(parents=True, exist_ok=True)
    with progress_bar("precision report", plan_units(cfg, len(pairs)), quiet) as advance:
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
                  quiet: bool) -> Any:
    """--calib, else EXPORT_DIR/calib.npz, else a fresh small recording on the report's puzzles."""
    from eqr.artifact import CALIB_FILE
    from eqr.calibration.record import load_calib, record_calibration
    from eqr.runtime import Solver

    path = Path(calib_path) if calib_path else Path(export_dir) / CALIB_FILE
    if calib_path or path.is_file():
        return load_calib(path, artifact.seq_len, artifact.hidden_size)
    depths = sorted({0, *cfg.depths})
    with progress_bar("recording calibration states", min(len(puzzles), 16), quiet) as advance:
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
    lines.append(f"{'PASSED' if report['passed'] else 'FAILED'}: {report['out']}/report.html")
    return lines
