"""The work of `eqr report`: every precision x backend against FP32 on the same puzzles and
seeds, judged (report.json), rendered (report.md, report.html, plots) and optionally recorded in
a model card (docs/formats.md).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from eqr.calibration.calibrate import export_artifact
from eqr.calibration.config import ReportConfig
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress
from eqr.runtime.backends.base import describe_run


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
    from eqr.calibration.collect import collect, plan_units, runnable_cascades, runnable_pairs, save_results
    from eqr.calibration.compare import compare
    from eqr.calibration.data import load_puzzles
    from eqr.calibration.render import load_report, render
    from eqr.contract.artifact import REPORT_DIR
    from eqr.contract.io import atomic_write_text

    progress = progress or Progress(quiet=True)
    for renderer in ("jinja2", "matplotlib"):  # eqr[calibrate]: asked now rather than after the runs
        importlib.import_module(renderer)
    artifact = export_artifact(export_dir)
    out = Path(out_dir) if out_dir else Path(export_dir) / REPORT_DIR
    check_report_out(out, force)
    pairs, skipped = runnable_pairs(artifact, cfg)
    missing = [p for p in cfg.precisions if not any(pp == p for _, pp in pairs)]
    if missing:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items() if k in cfg.backends or k.endswith(tuple(missing)))
        no_graph = [p for p in missing if not (p in artifact.onnx and artifact.onnx[p].is_file())]
        build = f"build with `eqr calibrate {export_dir} --precision {','.join(no_graph)}`, " if no_graph else ""
        raise EqRError(f"{export_dir}: no backend can run {', '.join(missing)} ({reasons}); {build}"
                       "leave them out of --precision or pass another --backend")
    if not any(p == "fp32" for _, p in pairs):
        raise EqRError("--precision must include fp32: every precision is compared with it")
    puzzles = load_puzzles(artifact.task, artifact.seq_len, data, cfg.puzzles, cfg.seed)
    calib = _report_calib(artifact, export_dir, calib_path, puzzles, cfg, progress)
    out.mkdir(parents=True, exist_ok=True)
    with progress.bar("precision report", plan_units(cfg, len(pairs), len(runnable_cascades(artifact, cfg)))) as advance:
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
    from eqr.calibration.record import load_calib, record_fp32
    from eqr.contract.artifact import CALIB_FILE

    path = Path(calib_path) if calib_path else Path(export_dir) / CALIB_FILE
    if calib_path or path.is_file():
        return load_calib(path, artifact.seq_len, artifact.hidden_size)
    depths = sorted({0, *cfg.depths})
    with progress.bar("recording calibration states", min(len(puzzles), 16)) as advance:
        return record_fp32(artifact.onnx["fp32"], (artifact.seq_len, artifact.hidden_size, artifact.init_std),
                           puzzles.inputs[:16], 1, depths, cfg.seed, {"data": puzzles.source}, advance)[0]


def summary_lines(report: dict[str, Any]) -> list[str]:
    from eqr.calibration.render import summary_rows

    rows = summary_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    headline = (report.get("decision") or {}).get("headline")
    if headline:
        lines.append(headline)
    lines += official_lines(report)
    runs = run_backends(report)
    lines.append("ran on: " + "; ".join(f"{name} {describe_run(info)}" for name, info in runs.items()))
    lines += [f"not run: {name}: {why}" for name, why in report["skipped"].items() if "-" not in name]  # a whole backend
    lines.append(f"{'PASSED' if report['passed'] else 'FAILED'}: {report['out']}/report.html")
    return lines


def official_lines(report: dict[str, Any]) -> list[str]:
    """One line per run and breadth K > 1: its official breadth metrics in words."""
    from eqr.runtime.metrics import headline

    return [f"official metrics {name} {label} depth {section['depth']}: {headline(section['metrics'])}"
            for name, run in report["runs"].items() for label, section in run.get("official_metrics", {}).items()]
