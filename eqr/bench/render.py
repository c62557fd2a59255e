"""Bench output: a header, a table per measurement (value, goal verdict, bound), then RESULT lines."""
from __future__ import annotations

from typing import Any

from eqr.bench.result import Measurement, fmt


def render(measurements: list[Measurement], info: dict[str, Any]) -> str:
    """Tables, then one RESULT line per measurement."""
    lines = [f"eqr bench  {info['date']}  model {info['model']} ({info['task']}, {info['parameters']:,} params)  "
             f"threads {info['config']['threads']}  load {info['load_avg']}  wall {info['wall_s']}s"]
    rule = info.get("rule") or {}
    if rule:
        lines.append(f"stopping rule: {rule.get('rule', 'from the flags')} ({rule['source']})")
    lines += [f"note: {n}" for n in info["notes"]]
    for m in measurements:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[m.met]
        goal = "" if m.goal is None else f"  goal {m.goal[0]} {m.goal[1]:g}: {verdict}"
        bound = "" if m.bound is None else f"  (bound {fmt(m.bound)})"
        lines += ["", f"## {m.name} = {fmt(m.value)}{bound}{goal}", *table(m.header, m.rows)]
        if m.note:
            lines.append(f"({m.note})")
    lines.append("")
    lines += [m.result_line() for m in measurements]
    return "\n".join(lines)


def table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    cells = [tuple(str(x) for x in header)] + [tuple(str(x) for x in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out
