"""report.json -> report.md, report.html (from templates/report.html.j2) and PNG plots. Reads
nothing but the saved report. One colour per precision (and cascade) in every plot; the backend
is the line style."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from eqr.contract.io import atomic_open, atomic_write_text
from eqr.runtime.stopping_rules import describe_rule

PLOTS = {"decision": "accuracy_vs_speed.png", "accuracy": "accuracy_vs_depth.png", "residual": "residual_curves.png",
         "steps": "steps_histogram.png", "state_error": "state_error_vs_depth.png"}
COLOURS = {"fp32": "#1f77b4", "fp16": "#ff7f0e", "int8": "#2ca02c", "fp16+fp32": "#9467bd", "int8+fp32": "#d62728"}
LINESTYLES = {"onnxruntime": "-", "torch": "--", "tensorrt": ":"}


def _style(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """matplotlib keywords: the precision's colour, the backend's line style."""
    return {"color": COLOURS.get(run["precision"], "#7f7f7f"), "linestyle": LINESTYLES.get(run["backend"], "-.")}


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def render(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the plots, report.md and report.html into `out_dir`; returns their paths."""
    out = Path(out_dir)
    written = write_plots(report, out)
    written["md"] = out / "report.md"
    atomic_write_text(written["md"], markdown(report))
    written["html"] = out / "report.html"
    atomic_write_text(written["html"], to_html(report))
    return written


# --------------------------------------------------------------------------- tables

# What every column of the details table means (rendered under it).
SUMMARY_COLUMNS = {
    "accuracy": "exact accuracy (%) at the deepest fixed depth of the curve, breadth 1",
    "drop (pts)": "points below the reference at that depth",
    "FP32 agreement": "puzzles whose whole answer equals the reference's",
    "settled": "trajectories the gated run stopped by tol, stable answer or q_halt (not by the cap)",
    "mean steps": "outer steps per trajectory of the gated run (the precision's calibrated rule)",
    "residual floor": "median lowest relative residual over the second half of the ungated run",
    "tol (recommended)": "the precision's tol, and 3 x its 90th-percentile floor",
    "spectral radius": "median estimated spectral radius of the step's Jacobian at settled states (< 1: contracting)",
    "one-step error": "worst median relative state error of one step on the recorded calibration states",
    "settled error": "median relative error of the state after max-steps steps against the reference's",
    "verdict": "pass unless the drop exceeds --max-drop or agreement is below --min-agreement",
}


def _fmt(value: Any, spec: str = ".3g", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    header = ["run", "accuracy", "drop (pts)", "FP32 agreement", "settled", "mean steps", "residual floor",
              "tol (recommended)", "spectral radius", "one-step error", "settled error", "verdict"]
    rows = [header]
    for name, run in report["runs"].items():
        head = run["accuracy"]["at_max_depth"].get("single") or next(iter(run["accuracy"]["at_max_depth"].values()))
        conv, err = run["convergence"], run["state_error"]
        one_step = max((v["median"] for v in err["one_step_by_depth"].values()), default=None)
        rows.append([name + (" (reference)" if name == report["reference"] else ""),
                     _fmt(head["accuracy"], ".1f") + ("%" if head["accuracy"] is not None else ""),
                     _fmt(head["drop"], "+.1f" if head["drop"] else ".1f"), f"{100 * head['agreement']:.1f}%",
                     f"{100 * conv['settled_fraction']:.0f}%", f"{conv['mean_steps']:.1f}",
                     _fmt(conv["residual_floor_median"]), f"{conv['tol']:g} ({conv['recommended_tol']:.2g})",
                     _fmt(run["contraction"]["median"], ".3f"), _fmt(one_step), _fmt(err["settled_median"]),
                     "pass" if run["verdict"]["passed"] else "FAIL"])
    return rows


def _notes(report: dict[str, Any]) -> list[str]:
    notes = []
    for name, run in report["runs"].items():
        notes += [f"{name}: {w}" for w in run["convergence"]["warnings"]]
        err = run["state_error"]
        if "attractor_pulls_back" in err and name != report["reference"]:
            verb = "pulls it back" if err["attractor_pulls_back"] else "does NOT pull it back"
            notes.append(f"{name}: one-step error {max(v['median'] for v in err['one_step_by_depth'].values()):.3g}, "
                         f"settled-state error {err['settled_median']:.3g} (x{err['amplification']:.2f}): "
                         f"the attractor {verb}")
        coupling = run["coupling"]
        if coupling.get("most_converged_accuracy") is not None:
            notes.append(f"{name}: most converged half {coupling['most_converged_accuracy']:.1f}% correct, "
                         f"least converged half {coupling['least_converged_accuracy']:.1f}%")
    return notes


DECISION_HEADER = ("run", "accuracy", "drop", "mean steps", "rule", "latency b1/b16/b64 (ms)", "puzzles/s", "file",
                   "provider", "within")


def decision_rows(report: dict[str, Any]) -> list[list[str]]:
    """The decision table (accuracy beside speed), header first; DECISION_COLUMNS explains each column."""
    rows = [list(DECISION_HEADER)]
    for r in (report.get("decision") or {}).get("rows", []):
        steps = f"{r['mean_steps']:.2f}" + ("" if r["low_steps"] is None else f" ({r['low_steps']:.2f} low)")
        latency = "/".join(f"{v:.2f}" for v in r["latency_ms"].values()) or "n/a"
        rows.append([r["run"], f"{r['accuracy']:.1f}%", f"{r['drop']:+.1f}", steps, rule_words(r["rule"]), latency,
                     _fmt(r["puzzles_per_s"], ".1f"), _size(r["file_bytes"]), str(r["provider"]),
                     "yes" if r["within"] else "no"])
    return rows


OFFICIAL_NOTE = ("The official evaluator's breadth metrics on the fixed-depth run, named as there: every "
                 "trajectory's final answer, a diverged one counted wrong and never chosen "
                 "(docs/algorithm.md#the-official-metrics).")
_COUNTS = ("/n", "/total_samples", "/num_samples", "/k")  # shown in the table's title, not as rows


def official_tables(report: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """(title, rows: header first, one row per metric, one column per run) for every breadth K > 1."""
    tables = []
    breadths = {label: section["breadth"] for run in report["runs"].values()
                for label, section in run.get("official_metrics", {}).items()}
    for label in sorted(breadths, key=breadths.get):
        runs = {name: run["official_metrics"][label] for name, run in report["runs"].items()
                if label in run.get("official_metrics", {})}
        first = next(iter(runs.values()))
        k = first["metrics"].get("convergence_top_k/k")
        title = (f"{label}, depth {first['depth']}, top-{k}, {first['metrics']['different_init/total_samples']} "
                 "puzzles")
        names = [m for m in first["metrics"] if not m.endswith(_COUNTS)]
        rows = [["metric", *runs]]
        rows += [[m, *(_official_value(m, section["metrics"].get(m)) for section in runs.values())] for m in names]
        tables.append((title, rows))
    return tables


def _official_value(name: str, value: float | None) -> str:
    if name.endswith("avg_convergence_score"):
        return _fmt(value)
    return "n/a" if value is None else f"{100 * value:.1f}%"


def rule_words(rule: dict[str, Any]) -> str:
    return describe_rule(rule) if rule else "n/a"


def _size(n: int | None) -> str:
    return "n/a" if not n else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _diagnoses(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, run["diagnosis"]) for name, run in report["runs"].items() if "diagnosis" in run]


# --------------------------------------------------------------------------- markdown


def markdown(report: dict[str, Any]) -> str:
    rows = summary_rows(report)
    lines = [f"# Precision report: {report['meta']['artifact']}", "",
             f"{report['puzzles']} puzzles, reference `{report['reference']}`, "
             f"{'exact accuracy against labels' if report['labels'] else 'no labels: agreement only'}.",
             "", f"**{'PASSED' if report['passed'] else 'FAILED'}**", ""]
    lines += [f"- {f}" for f in report["failures"]]
    decision = report.get("decision") or {}
    if decision.get("rows"):
        table = decision_rows(report)
        lines += ["", "## Decision", "", f"**{decision.get('headline') or 'no run is within --max-drop'}**", "",
                  "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
        lines += [""] + [f"- **{k}**: {v}" for k, v in decision["columns"].items()]
        lines += ["", "## Details"]
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += [""] + [f"- **{k}**: {v}" for k, v in SUMMARY_COLUMNS.items()]
    for title, table in official_tables(report):
        lines += ["", f"## Official metrics: {title}", "", OFFICIAL_NOTE, "",
                  "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in _notes(report)]
    for name, diagnosis in _diagnoses(report):
        lines += ["", f"## INT8 diagnosis: {name}", "",
                  f"- worst one-step error at depth {diagnosis['worst_depth']}",
                  f"- spectral radius at the settled state {diagnosis['spectral_radius']:.3f}"]
        lines += [f"- activation `{a['tensor']}` ({', '.join(a['read_by'])}): {a['relative_error']:.3g} relative error"
                  for a in diagnosis["worst_activations"][:5]]
        if "suggested_policy" in diagnosis:
            lines += [f"- suggested policy: `{diagnosis['suggested_policy']['command']}`",
                      f"  ({diagnosis['suggested_policy']['why']})"]
    if report["skipped"]:
        lines += ["", "## Not run", ""] + [f"- {k}: {v}" for k, v in report["skipped"].items()]
    lines += ["", "## Plots", ""] + [f"![{key}]({file})" for key, file in PLOTS.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- html


def to_html(report: dict[str, Any]) -> str:
    """report.html from templates/report.html.j2 (autoescaped)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("eqr.calibration", "templates"),
                             autoescape=True, keep_trailing_newline=True)
    decision = report.get("decision") or {}
    return env.get_template("report.html.j2").render(
        report=report, status="PASSED" if report["passed"] else "FAILED", summary=summary_rows(report),
        decision=decision, decision_table=decision_rows(report) if decision.get("rows") else None,
        notes=_notes(report), diagnoses=_diagnoses(report), plots=PLOTS, summary_columns=SUMMARY_COLUMNS,
        official=official_tables(report), official_note=OFFICIAL_NOTE)


# --------------------------------------------------------------------------- plots


def write_plots(report: dict[str, Any], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for key, draw in (("decision", _plot_decision), ("accuracy", _plot_accuracy), ("residual", _plot_residual),
                      ("steps", _plot_steps), ("state_error", _plot_state_error)):
        fig = draw(report, plt)
        path = out / PLOTS[key]
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        written[key] = path
    return written


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # a plot may have nothing to compare (e.g. the reference alone)
        ax.legend(fontsize=7)


def _plot_decision(report: dict[str, Any], plt: Any) -> Any:
    """Accuracy against gated puzzles/s: up and to the right is better."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    decision = report.get("decision") or {}
    for r in decision.get("rows", []):
        if r["puzzles_per_s"] is None:
            continue
        marker = "o" if r["backend"] == "onnxruntime" else "s"
        ax.scatter([r["puzzles_per_s"]], [r["accuracy"]], color=COLOURS.get(r["precision"], "#7f7f7f"),
                   marker=marker, s=60, label=r["run"], edgecolors="black" if r["run"] == decision.get("fastest")
                   else "none")
    ax.set_xlabel("puzzles/s (gated loop, breadth 1)")
    ax.set_ylabel("exact accuracy (%)" if report["labels"] else "agreement with the reference (%)")
    ax.set_title("accuracy vs speed (outlined: fastest within --max-drop)")
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig


def _plot_accuracy(report: dict[str, Any], plt: Any) -> Any:
    labels = list(next(iter(report["runs"].values()))["accuracy"]["curves"])
    fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 3.6), squeeze=False)
    metric = "accuracy" if report["labels"] else "agreement"
    for ax, label in zip(axes[0], labels):
        for name, run in report["runs"].items():
            curve = run["accuracy"]["curves"][label]
            values = curve[metric] if report["labels"] else [100 * a for a in curve["agreement"]]
            ax.plot(curve["depths"], values, marker="o", label=name, **_style(name, run))
        ax.set_xscale("log", base=2)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("depth (outer steps)")
        ax.set_ylabel("exact accuracy (%)" if report["labels"] else "agreement with FP32 (%)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    _legend(axes[0][0])
    fig.tight_layout()
    return fig


def _plot_residual(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in report["runs"].items():
        curve = run["convergence"]["residual_curve"]
        ax.plot(range(1, len(curve) + 1), [float("nan") if v is None else v for v in curve], label=name,
                **_style(name, run))
        ax.axhline(run["convergence"]["tol"], color=_style(name, run)["color"], linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("outer step")
    ax.set_ylabel("median relative residual (dotted: tol)")
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig


def _plot_steps(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in report["runs"].items():
        hist = run["convergence"]["steps_histogram"]
        centers = [(a + b) / 2 for a, b in zip(hist["edges"][:-1], hist["edges"][1:])]
        ax.step(centers, hist["counts"], where="mid", label=name, **_style(name, run))
    ax.set_xlabel("steps to settle (gated run, each precision's calibrated rule)")
    ax.set_ylabel("puzzles")
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig


def _plot_state_error(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in report["runs"].items():
        if name == report["reference"]:
            continue
        per_depth = run["state_error"]["one_step_by_depth"]
        depths = sorted(per_depth, key=int)
        values = [max(per_depth[d]["median"], 1e-12) for d in depths]
        ax.plot([int(d) + 1 for d in depths], values, marker="o", label=f"{name} one step", **_style(name, run))
        ax.axhline(max(run["state_error"]["settled_median"], 1e-12), color=_style(name, run)["color"], linestyle="--",
                   linewidth=1, label=f"{name} settled state")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth of the calibration state + 1")
    ax.set_ylabel("relative state error vs reference")
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig
