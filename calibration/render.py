"""report.json -> report.md, report.html and PNG plots. Reads nothing but the saved report."""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from eqr.io import atomic_open, atomic_write_text

PLOTS = {"accuracy": "accuracy_vs_depth.png", "residual": "residual_curves.png", "steps": "steps_histogram.png",
         "state_error": "state_error_vs_depth.png"}


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
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
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
    esc = html.escape
    rows = summary_rows(report)
    table = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in rows[0]) + "</tr>"
    for row in rows[1:]:
        cls = "fail" if row[-1] == "FAIL" else "pass"
        table += f"<tr class='{cls}'>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
    table += "</table>"
    status = "PASSED" if report["passed"] else "FAILED"
    parts = [f"<h1>Precision report: {esc(str(report['meta']['artifact']))}</h1>",
             f"<p>{report['puzzles']} puzzles; reference <code>{esc(report['reference'])}</code>.</p>",
             f"<h2 class='{status.lower()}'>{status}</h2>",
             "<ul>" + "".join(f"<li>{esc(f)}</li>" for f in report["failures"]) + "</ul>", table,
             "<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in _notes(report)) + "</ul>"]
    for name, diagnosis in _diagnoses(report):
        items = [f"worst one-step error at depth {diagnosis['worst_depth']}",
                 f"spectral radius at the settled state {diagnosis['spectral_radius']:.3f}"]
        items += [f"activation {a['tensor']} ({', '.join(a['read_by'])}): {a['relative_error']:.3g} relative error"
                  for a in diagnosis["worst_activations"][:5]]
        if "suggested_policy" in diagnosis:
            items.append(f"suggested policy: {diagnosis['suggested_policy']['command']}")
        parts.append(f"<h2>INT8 diagnosis: {esc(name)}</h2><ul>" + "".join(f"<li>{esc(i)}</li>" for i in items)
                     + "</ul>")
    if report["skipped"]:
        parts.append("<h2>Not run</h2><ul>" + "".join(f"<li>{esc(k)}: {esc(v)}</li>"
                                                      for k, v in report["skipped"].items()) + "</ul>")
    parts.append("<h2>Plots</h2>" + "".join(f"<figure><img src='{f}' alt='{k}'><figcaption>{k}</figcaption></figure>"
                                            for k, f in PLOTS.items()))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px}tr.fail td{background:#fdd}.failed{color:#b00}.passed{color:#070}img{max-width:900px}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>eqr precision report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


# --------------------------------------------------------------------------- plots


def write_plots(report: dict[str, Any], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for key, draw in (("accuracy", _plot_accuracy), ("residual", _plot_residual), ("steps", _plot_steps),
                      ("state_error", _plot_state_error)):
        fig = draw(report, plt)
        path = out / PLOTS[key]
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        written[key] = path
    return written


def _plot_accuracy(report: dict[str, Any], plt: Any) -> Any:
    labels = list(next(iter(report["runs"].values()))["accuracy"]["curves"])
    fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 3.6), squeeze=False)
    metric = "accuracy" if report["labels"] else "agreement"
    for ax, label in zip(axes[0], labels):
        for name, run in report["runs"].items():
            curve = run["accuracy"]["curves"][label]
            values = curve[metric] if report["labels"] else [100 * a for a in curve["agreement"]]
            ax.plot(curve["depths"], values, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("depth (outer steps)")
        ax.set_ylabel("exact accuracy (%)" if report["labels"] else "agreement with FP32 (%)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_residual(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in report["runs"].items():
        curve = run["convergence"]["residual_curve"]
        line, = ax.plot(range(1, len(curve) + 1), [float("nan") if v is None else v for v in curve], label=name)
        ax.axhline(run["convergence"]["tol"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("outer step")
    ax.set_ylabel("median relative residual (dotted: tol)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _plot_steps(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in report["runs"].items():
        hist = run["convergence"]["steps_histogram"]
        centers = [(a + b) / 2 for a, b in zip(hist["edges"][:-1], hist["edges"][1:])]
        ax.step(centers, hist["counts"], where="mid", label=name)
    ax.set_xlabel("steps to settle (gated run, each precision's tol)")
    ax.set_ylabel("puzzles")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _plot_state_error(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in report["runs"].items():
        if name == report["reference"]:
            continue
        per_depth = run["state_error"]["one_step_by_depth"]
        depths = sorted(per_depth, key=int)
        values = [max(per_depth[d]["median"], 1e-12) for d in depths]
        line, = ax.plot([int(d) + 1 for d in depths], values, marker="o", label=f"{name} one step")
        ax.axhline(max(run["state_error"]["settled_median"], 1e-12), color=line.get_color(), linestyle="--",
                   linewidth=1, label=f"{name} settled state")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth of the calibration state + 1")
    ax.set_ylabel("relative state error vs reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig
