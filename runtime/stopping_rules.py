"""The stopping rules of the loop, one registered class each: the fields it reads, what counts
toward it at a step, how many consecutive counts settle a trajectory, and its description.

The loop (`eqr.runtime.loop`) counts each active rule online, one step at a time, over (B,)
arrays; `eqr calibrate` replays the same rules offline over a recorded (N, T) trajectory
(`eqr.calibration.stopping`) with the same `hits`, so a fitted rule stops exactly where the loop
would. A rule reads a plain mapping of RULE_FIELDS (a manifest's fitted rule, or a SolveConfig's
fields); an absent field means the rule is off. A new rule is one class here, its fields in
SolveConfig, and its `eqr solve` flag (docs/algorithm.md#stopping-rules).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from eqr.contract.artifact import STOPPING_KEY
from eqr.contract.errors import EqRError

Rule = Mapping[str, Any]  # RULE_FIELDS -> values


@dataclass(frozen=True)
class Signals:
    """What a step says about each trajectory: (B,) arrays online, (N, T) offline."""

    residual: np.ndarray  # relative state residual
    q_halt: np.ndarray  # q_halt logit
    changed: np.ndarray  # bool: the answer changed at this step (the first step always counts as changed)


class StoppingRule:
    """A trajectory settles once `hits` held `need` consecutive steps."""

    reason: ClassVar[str]  # the stop reason it records (eqr.runtime.stats.STOP_REASONS)
    fields: ClassVar[tuple[str, ...]]  # the SolveConfig fields it reads

    def active(self, rule: Rule) -> bool:
        raise NotImplementedError

    def hits(self, signals: Signals, rule: Rule) -> np.ndarray:
        raise NotImplementedError

    def need(self, rule: Rule) -> int:
        raise NotImplementedError

    def level(self, rule: Rule) -> Any:
        """What `hits` depends on besides the signals (replays with equal levels share counts)."""
        return None

    def describe(self, rule: Rule) -> str:
        raise NotImplementedError


class Tolerance(StoppingRule):
    """The relative residual stays below `tol` for `patience` steps."""

    reason, fields = "tol", ("tol", "patience")

    def active(self, rule: Rule) -> bool:
        return rule.get("tol") is not None

    def hits(self, signals: Signals, rule: Rule) -> np.ndarray:
        return signals.residual < float(rule["tol"])

    def need(self, rule: Rule) -> int:
        return int(rule.get("patience", 2))

    def level(self, rule: Rule) -> Any:
        return float(rule["tol"])

    def describe(self, rule: Rule) -> str:
        return f"tol {rule['tol']:.3g} x{rule.get('patience')}"


class StableAnswer(StoppingRule):
    """The answer (argmax per position) is unchanged for `window` steps."""

    reason, fields = "stable", ("window",)

    def active(self, rule: Rule) -> bool:
        return rule.get("window") is not None

    def hits(self, signals: Signals, rule: Rule) -> np.ndarray:
        return ~signals.changed

    def need(self, rule: Rule) -> int:
        return int(rule["window"])

    def describe(self, rule: Rule) -> str:
        return f"window {rule['window']}"


class QHalt(StoppingRule):
    """The q_halt head's logit stays above `q_halt_threshold` for `patience` steps."""

    reason, fields = "q_halt", ("q_halt", "q_halt_threshold", "patience")

    def active(self, rule: Rule) -> bool:
        return bool(rule.get("q_halt"))

    def hits(self, signals: Signals, rule: Rule) -> np.ndarray:
        return signals.q_halt > float(rule.get("q_halt_threshold") or 0.0)

    def need(self, rule: Rule) -> int:
        return int(rule.get("patience", 2))

    def level(self, rule: Rule) -> Any:
        return float(rule.get("q_halt_threshold") or 0.0)

    def describe(self, rule: Rule) -> str:
        return f"q_halt > {rule.get('q_halt_threshold') or 0:g} x{rule.get('patience')}"


# The registered rules, in the order their stop reasons are recorded when several fire at once.
RULES: tuple[StoppingRule, ...] = (Tolerance(), StableAnswer(), QHalt())
# The fields of a fitted rule (manifest precisions.<p>.stopping.rule): the step cap, then each rule's.
RULE_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(("max_steps", *(f for r in RULES for f in r.fields))))


def rule_of(config: Any) -> dict[str, Any]:
    """The RULE_FIELDS of a SolveConfig (or anything with those attributes)."""
    return {name: getattr(config, name) for name in RULE_FIELDS}


def active_rules(rule: Rule) -> list[tuple[int, StoppingRule]]:
    """(index in RULES, rule) of the rules `rule` turns on."""
    return [(i, r) for i, r in enumerate(RULES) if r.active(rule)]


def describe_rule(rule: Rule) -> str:
    """A stopping rule in a few words: 'max 32 steps, tol 0.001 x2, window 4'."""
    return ", ".join([f"max {rule.get('max_steps')} steps", *(r.describe(rule) for _, r in active_rules(rule))])


def stopping_rules(manifest: dict[str, Any], where: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """precision -> its calibrated stopping rule (only RULE_FIELDS); EqRError on a malformed entry."""
    rules = {}
    for precision, entry in (manifest.get("precisions") or {}).items():
        stopping = entry.get(STOPPING_KEY) if isinstance(entry, dict) else None
        if stopping is None:
            continue
        rule = stopping.get("rule") if isinstance(stopping, dict) else None
        if not isinstance(rule, dict) or set(rule) - set(RULE_FIELDS):
            raise EqRError(f"{where}: malformed {precision} stopping rule {rule!r} (fields: {', '.join(RULE_FIELDS)}); "
                           "re-run eqr calibrate --force")
        rules[precision] = dict(rule)
    return rules
