"""Record a report's measured FP16/INT8 accuracy drops in a model card (card.json + card.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from eqr.contract.bundled import CARD_JSON, CARD_MD, bundled_dir
from eqr.contract.errors import EqRError
from eqr.contract.io import atomic_write_text

BEGIN, END = "<!-- eqr:precision-report:begin -->", "<!-- eqr:precision-report:end -->"


def card_dir(name_or_dir: str | os.PathLike[str]) -> Path:
    """A directory holding card.json, or the bundled model of that name."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    bundled = bundled_dir() / str(name_or_dir)
    if bundled.is_dir():
        return bundled
    raise EqRError(f"--card {name_or_dir}: not a directory or bundled model name")


def card_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Per run: accuracy, drop vs FP32 and agreement at the deepest depth, tol, steps, spectral radius."""
    runs = {}
    for name, run in report["runs"].items():
        heads = run["accuracy"]["at_max_depth"]
        runs[name] = {
            "precision": run["precision"], "backend": run["backend"],
            "accuracy": {label: h["accuracy"] for label, h in heads.items()},
            "drop_points": {label: h["drop"] for label, h in heads.items()},
            "agreement": {label: h["agreement"] for label, h in heads.items()},
            "tol": run["tol"], "recommended_tol": run["convergence"]["recommended_tol"],
            "settled_fraction": run["convergence"]["settled_fraction"],
            "mean_steps": run["convergence"]["mean_steps"], "spectral_radius": run["contraction"]["median"],
            "passed": run["verdict"]["passed"]}
    return {"reference": report["reference"], "puzzles": report["puzzles"], "passed": report["passed"],
            "depth": report["meta"]["config"]["depths"][-1], "runs": runs}


def record_in_card(report: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write the summary under "precision_report" in card.json and as a section of card.md."""
    root = card_dir(directory)
    summary = card_summary(report)
    json_path = root / CARD_JSON
    card = json.loads(json_path.read_text()) if json_path.is_file() else {}
    card["precision_report"] = summary
    atomic_write_text(json_path, json.dumps(card, indent=2) + "\n")
    md_path = root / CARD_MD
    text = md_path.read_text() if md_path.is_file() else ""
    atomic_write_text(md_path, with_precision_section(text, summary))
    return root


def with_precision_section(text: str, summary: dict[str, Any]) -> str:
    """card.md text with its precision section (between the markers) replaced or appended."""
    section = _markdown(summary)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    return text.rstrip("\n") + "\n"


def _markdown(summary: dict[str, Any]) -> str:
    lines = [BEGIN, "## Precision (measured by `eqr report`)", "",
             f"{summary['puzzles']} puzzles, depth {summary['depth']}, reference `{summary['reference']}`.", "",
             "| run | accuracy (single) | drop vs FP32 (points) | agreement | tol | spectral radius |",
             "|---|---|---|---|---|---|"]
    for name, run in summary["runs"].items():
        acc = run["accuracy"].get("single")
        drop = run["drop_points"].get("single")
        agree = run["agreement"].get("single")
        lines.append(f"| {name} | {'n/a' if acc is None else f'{acc:.1f}%'} | "
                     f"{'n/a' if drop is None else f'{drop:.1f}'} | "
                     f"{'n/a' if agree is None else f'{100 * agree:.1f}%'} | {run['tol']:.3g} | "
                     f"{run['spectral_radius']:.3f} |")
    return "\n".join(lines) + "\n" + END
