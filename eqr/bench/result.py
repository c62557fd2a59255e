"""`Measurement`: one measured quantity, its table, its goal verdict and its `RESULT` line."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eqr.bench.config import GOALS


class MeasurementError(RuntimeError):
    """A measurement that cannot be right (e.g. a step faster than the machine's GEMM peak)."""


@dataclass
class Measurement:
    """One measured quantity, its table and its RESULT line."""

    name: str
    value: float
    fields: dict[str, Any]
    header: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    note: str = ""
    goal_applies: bool = True  # False where the goal is not defined (e.g. --paper's random weights)
    bound: float | None = None  # the most the measured setting allows (printed beside the value)
    also_met: dict[str, bool] = field(default_factory=dict)  # further goals of this measurement, all must hold
    threshold: float | None = None  # this run's goal threshold where the setting moves it (None: GOALS')

    @property
    def goal(self) -> tuple[str, float] | None:
        goal = GOALS.get(self.name) if self.goal_applies else None
        return goal if goal is None or self.threshold is None else (goal[0], self.threshold)

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        if not np.isfinite(self.value):  # e.g. the runtime lost accuracy: there is no equal-accuracy ratio
            return False
        op, threshold = self.goal
        return (self.value >= threshold if op == ">=" else self.value <= threshold) and all(self.also_met.values())

    def result_line(self) -> str:
        pairs = {self.name: self.value}
        if self.goal is not None:
            pairs["goal_" + ("min" if self.goal[0] == ">=" else "max")] = self.goal[1]
            pairs["met"] = {True: 1, False: 0, None: "na"}[self.met]
        if self.bound is not None:
            pairs["bound"] = self.bound
        pairs |= self.fields
        return "RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in pairs.items())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "goal": self.goal, "met": self.met, "bound": self.bound,
                "fields": self.fields, "table": {"header": list(self.header), "rows": [list(r) for r in self.rows]},
                "note": self.note}


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if np.isfinite(value) else "nan"
    return str(value).replace(" ", "_")


def parse_result_line(line: str) -> tuple[str, dict[str, str]]:
    """`RESULT name=v k=v ...` -> (name, {name: v, k: v, ...}); ValueError if it is not one."""
    head, *pairs = line.split()
    if head != "RESULT" or not pairs:
        raise ValueError(f"not a RESULT line: {line!r}")
    parsed = dict(pair.split("=", 1) for pair in pairs)
    return pairs[0].split("=", 1)[0], parsed
