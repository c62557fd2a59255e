"""Judge collected results against the FP32 reference -> the report dict saved as report.json.

Nothing here runs a model. Every number in report.json comes from `Results`; `render` draws
report.md/.html and the plots from report.json alone.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from eqr.calibration.collect import TRAJECTORY_PARTS, Results, curve_key, curve_keys, relative_error, trajectory_key
from eqr.calibration.config import ReportConfig
from eqr.contract.artifact import recommended_tol

HIST_BINS = 16
FLOOR_TAIL = 0.5  # the residual floor is the minimum over the last half of a fixed-depth trace


def pick_reference(results: Results, wanted: str) -> str:
    """`wanted` if it ran, else the first FP32 run (torch, then onnxruntime)."""
    if wanted in results.runs:
        return wanted
    fp32 = [n for n, r in results.runs.items() if r["precision"] == "fp32"]
    if not fp32:
        raise ValueError("no FP32 run to compare with: include fp32 in --precision")
    return sorted(fp32, key=lambda n: (not n.startswith("torch"), n))[0]


def exact_accuracy(preds: np.ndarray, labels: np.ndarray | None) -> float | None:
    """Percent of puzzles whose every position equals the label (None without labels)."""
    if labels is None or len(labels) == 0:
        return None
    return float(100.0 * (preds == labels).all(axis=1).mean())


def agreement(preds: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of puzzles whose full answer equals the reference's."""
    return float((preds == reference).all(axis=1).mean()) if len(preds) else 1.0


def compare(results: Results, cfg: ReportConfig) -> dict[str, Any]:
    """The report: per-run sections, the reference, verdicts and the exit decision."""
    reference = pick_reference(results, cfg.reference)
    ref_run = results.runs[reference]
    fp32_tol = ref_run["tol"]
    runs = {name: judge_run(run, ref_run, results.labels, cfg, fp32_tol) for name, run in results.runs.items()}
    failures = []
    for name, section in runs.items():
        failures += [f"{name}: {reason}" for reason in section["verdict"]["failures"]]
    return {"format": "eqr-precision-report", "version": 1, "reference": reference, "meta": results.meta,
            "skipped": results.skipped, "puzzles": len(results.inputs), "labels": results.labels is not None,
            "runs": runs, "decision": decision_section(results, reference, cfg), "failures": failures,
            "passed": not failures}


# What every column of the decision table means (rendered under the table).
DECISION_COLUMNS = {
    "run": "backend-precision; a cascade LOW+HIGH steps at LOW to its residual floor, then at HIGH",
    "accuracy": "exact accuracy (%) of the gated run: every puzzle stopped by its precision's calibrated rule",
    "drop": "points below the reference's gated accuracy (positive = worse)",
    "mean steps": "outer steps per puzzle under the calibrated stopping rule (a cascade: low + high)",
    "rule": "the stopping rule: step cap, tol x patience, stable window, q_halt threshold (`eqr calibrate`)",
    "latency b1/b16/b64 (ms)": "best time of one step at batch 1, 16 and 64 on random states",
    "puzzles/s": "puzzles of the report's set per second through the gated loop (breadth 1, one process)",
    "file": "size of the step graph(s) this run loads",
    "provider": "the backend and the execution provider that actually ran",
    "within": "drop <= the precision's --max-drop limit",
}


def decision_section(results: Results, reference: str, cfg: ReportConfig) -> dict[str, Any]:
    """Accuracy beside speed for every run and cascade, and the fastest one within --max-drop."""
    ref_accuracy = exact_accuracy(results.runs[reference]["gated"]["preds"], results.labels)
    if ref_accuracy is None:
        ref_accuracy = 100.0  # no labels: accuracy is agreement with the reference
    P = len(results.inputs)
    rows = []
    for name, run in {**results.runs, **results.cascades}.items():
        preds = run["gated"]["preds"]
        accuracy = exact_accuracy(preds, results.labels)
        if accuracy is None:
            accuracy = 100.0 * agreement(preds, results.runs[reference]["gated"]["preds"])
        speed = run.get("speed") or {}
        drop = ref_accuracy - accuracy
        describe = run.get("describe") or {}
        providers = describe.get("providers") or [p for s in describe.get("stages", [])
                                                  for p in (s.get("providers") or [])[:1]]
        rows.append({"run": name, "precision": run["precision"], "backend": run["backend"],
                     "accuracy": accuracy, "drop": drop, "mean_steps": float(np.mean(run["gated"]["nstep"])),
                     "low_steps": None if run["gated"].get("low_steps") is None
                     else float(np.mean(run["gated"]["low_steps"])),
                     "rule": {k: v for k, v in (run.get("rule") or {}).items()
                              if k in ("max_steps", "tol", "patience", "window", "q_halt", "q_halt_threshold")},
                     "latency_ms": {str(b): 1e3 * t for b, t in (speed.get("latency_s") or {}).items()},
                     "puzzles_per_s": P / speed["gated_seconds"] if speed.get("gated_seconds") else None,
                     "file_bytes": speed.get("file_bytes"), "provider": providers[0] if providers else
                     describe.get("device", run["backend"]),
                     "within": bool(drop <= cfg.drop_limit(run["precision"]) + 1e-9)})
    eligible = [r for r in rows if r["within"] and r["puzzles_per_s"]]
    best = max(eligible, key=lambda r: r["puzzles_per_s"], default=None)
    headline = None if best is None else (
        f"fastest precision within --max-drop: {best['run']} at {best['puzzles_per_s']:.1f} puzzles/s, "
        f"{best['accuracy']:.1f}% ({best['drop']:+.1f} points vs {reference}), {best['mean_steps']:.2f} mean steps")
    return {"rows": rows, "fastest": None if best is None else best["run"], "headline": headline,
            "reference_accuracy": ref_accuracy, "columns": DECISION_COLUMNS}


def judge_run(run: dict[str, Any], ref: dict[str, Any], labels: np.ndarray | None, cfg: ReportConfig,
              fp32_tol: float) -> dict[str, Any]:
    section = {"precision": run["precision"], "backend": run["backend"], "describe": run.get("describe", {}),
               "tol": run["tol"], "seconds": run.get("seconds"),
               "accuracy": accuracy_section(run, ref, labels, cfg),
               "state_error": state_error_section(run, ref),
               "convergence": convergence_section(run, fp32_tol, cfg),
               "contraction": contraction_section(run),
               "coupling": coupling_section(run, labels),
               "official_metrics": official_section(run, labels, cfg)}
    section["verdict"] = verdict(section, cfg)
    if run["precision"] == "int8":
        section["diagnosis"] = int8_diagnosis(section, run.get("activation_errors") or [], cfg)
    return section


def int8_diagnosis(section: dict[str, Any], activation_errors: list[dict[str, Any]],
                   cfg: ReportConfig, worst: int = 3) -> dict[str, Any]:
    """Why INT8 loses accuracy (which ops, which depth) and the policy that would fix it."""
    errors = section["state_error"]
    culprits = [node for entry in activation_errors[:worst] for node in entry["read_by"]]
    diagnosis = {"worst_depth": errors.get("worst_depth"), "worst_activations": activation_errors,
                 "attractor_pulls_back": errors.get("attractor_pulls_back"),
                 "spectral_radius": section["contraction"]["median"]}
    if not section["verdict"]["passed"]:
        diagnosis["suggested_policy"] = {
            "exclude_nodes": culprits,
            "command": f"eqr calibrate EXPORT_DIR --precision int8 --exclude-nodes {','.join(culprits)}",
            "why": (f"the largest INT8 activation errors feed {', '.join(culprits) or 'no node'}; keeping them in "
                    "FP32 removes the dominant error source. Also try --method percentile or entropy "
                    "(tighter ranges) and re-run `eqr report`."),
        }
    return diagnosis


def accuracy_section(run: dict[str, Any], ref: dict[str, Any], labels: np.ndarray | None,
                     cfg: ReportConfig) -> dict[str, Any]:
    """Exact accuracy and FP32 agreement per (aggregate, breadth) as curves over depth."""
    curves: dict[str, dict[str, Any]] = {}
    for aggregate, K, depth in curve_keys(cfg):
        key = curve_key(aggregate, K, depth)
        preds, ref_preds = run["curve"][key], ref["curve"][key]
        label = "single" if K == 1 else f"{aggregate} K={K}"
        curve = curves.setdefault(label, {"aggregate": aggregate, "breadth": K, "depths": [], "accuracy": [],
                                          "reference_accuracy": [], "agreement": []})
        curve["depths"].append(depth)
        curve["accuracy"].append(exact_accuracy(preds, labels))
        curve["reference_accuracy"].append(exact_accuracy(ref_preds, labels))
        curve["agreement"].append(agreement(preds, ref_preds))
    headline = {}
    for label, curve in curves.items():
        acc, ref_acc = curve["accuracy"][-1], curve["reference_accuracy"][-1]
        headline[label] = {"depth": curve["depths"][-1], "accuracy": acc, "reference_accuracy": ref_acc,
                           "drop": None if acc is None else ref_acc - acc, "agreement": curve["agreement"][-1]}
    per_puzzle = (run["curve"][curve_key("first", 1, max(cfg.depths))] ==
                  ref["curve"][curve_key("first", 1, max(cfg.depths))]).all(axis=1) if 1 in cfg.breadth else None
    gated_agreement = agreement(run["gated"]["preds"], ref["gated"]["preds"])
    return {"curves": curves, "at_max_depth": headline, "gated_agreement": gated_agreement,
            "points_per_puzzle": 100.0 / max(len(run["gated"]["preds"]), 1),
            "gated_accuracy": exact_accuracy(run["gated"]["preds"], labels),
            "disagreeing_puzzles": [] if per_puzzle is None else np.flatnonzero(~per_puzzle).tolist()[:50]}


def official_section(run: dict[str, Any], labels: np.ndarray | None, cfg: ReportConfig) -> dict[str, Any]:
    """The official breadth metrics (eqr.runtime.metrics) of every breadth K > 1 at the deepest depth,
    keyed "K=8"; empty without labels (or trajectories, in results collected before they were kept)."""
    from eqr.runtime.metrics import official_metrics

    depth, kept = max(cfg.depths), run.get("trajectories") or {}
    sections = {}
    for K in (k for k in cfg.breadth if k > 1):
        key = trajectory_key(K, depth)
        if labels is None or f"{key}/preds" not in kept:
            continue
        parts = [kept[f"{key}/{part}"] for part in TRAJECTORY_PARTS]
        sections[f"K={K}"] = {"breadth": K, "depth": depth, "top_k": cfg.top_k,
                              "metrics": official_metrics(*parts, labels, cfg.top_k)}
    return sections


def state_error_section(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """One-step error on FP32 calibration states per depth, and the error of the settled state."""
    per_depth = {}
    for depth, out in sorted(run.get("one_step", {}).items()):
        err = relative_error(out, ref["one_step"][depth])
        per_depth[str(depth)] = {"median": float(np.median(err)), "max": float(err.max()), "states": len(err)}
    settled = relative_error(run["settled"], ref["settled"])
    one_step = [v["median"] for v in per_depth.values()]
    worst_depth = max(per_depth, key=lambda d: per_depth[d]["median"]) if per_depth else None
    section = {"one_step_by_depth": per_depth, "worst_depth": worst_depth,
               "settled_median": float(np.median(settled)), "settled_max": float(settled.max())}
    if one_step:
        # Attractor check: a contracting step keeps the fixed-point error near the one-step error
        # (<= err / (1 - rho)); a growing ratio means quantization error accumulates.
        deepest = per_depth[max(per_depth, key=int)]["median"]
        section["amplification"] = section["settled_median"] / max(deepest, 1e-30)
        section["attractor_pulls_back"] = bool(section["amplification"] < 10.0)
    return section


def convergence_section(run: dict[str, Any], fp32_tol: float, cfg: ReportConfig) -> dict[str, Any]:
    gated = run["gated"]
    nstep = np.asarray(gated["nstep"])
    trace = np.asarray(run["fixed"]["residual_trace"], np.float64)  # (P, Dmax)
    tail = trace[:, int(trace.shape[1] * FLOOR_TAIL):] if trace.shape[1] > 1 else trace
    floor = np.nanmin(np.where(np.isfinite(tail), tail, np.inf), axis=1)  # (P,) lowest residual late in the run
    floor_p50, floor_p90 = float(np.median(floor)), float(np.quantile(floor, 0.9))
    reaches = lambda tol: float((floor < tol).mean())  # noqa: E731
    hist, edges = np.histogram(nstep, bins=min(HIST_BINS, max(int(nstep.max(initial=1)), 1)),
                               range=(0.5, max(int(nstep.max(initial=1)), 1) + 0.5))
    section = {
        "tol": run["tol"], "settled_fraction": float(np.mean(gated["converged"])),
        "mean_steps": float(nstep.mean()), "median_steps": float(np.median(nstep)),
        "steps_histogram": {"counts": hist.tolist(), "edges": edges.tolist()},
        "residual_floor_median": floor_p50, "residual_floor_p90": floor_p90,
        "recommended_tol": recommended_tol(run["precision"], floor_p90)["tol"],
        "reaches_own_tol": reaches(run["tol"]), "reaches_fp32_tol": reaches(fp32_tol), "fp32_tol": fp32_tol,
        "residual_curve": _median_curve(trace), "warnings": []}
    if run["precision"] != "fp32" and section["reaches_fp32_tol"] < 0.5:
        section["warnings"].append(
            f"the FP32 tolerance {fp32_tol:g} is below this precision's residual floor ({floor_p50:.3g} median): "
            f"with tol {fp32_tol:g} every puzzle would burn to max steps; use tol >= {section['recommended_tol']:.3g}")
    if section["reaches_own_tol"] < 0.5:
        section["warnings"].append(
            f"tol {run['tol']:g} is reached by only {100 * section['reaches_own_tol']:.0f}% of trajectories "
            f"(residual floor {floor_p50:.3g}); set this precision's tol to {section['recommended_tol']:.3g}")
    return section


def _median_curve(trace: np.ndarray) -> list[float | None]:
    """Median residual per step over trajectories (None where all are NaN)."""
    out = []
    for column in trace.T:
        finite = column[np.isfinite(column)]
        out.append(float(np.median(finite)) if finite.size else None)
    return out


def contraction_section(run: dict[str, Any]) -> dict[str, Any]:
    radius = np.asarray(run["radius"], np.float64)
    history = np.asarray(run["radius_history"], np.float64)
    spread = float(np.median(np.abs(history[-1] - history[-2]) / np.maximum(history[-1], 1e-30))) \
        if len(history) > 1 else None
    return {"median": float(np.median(radius)), "max": float(radius.max()), "per_state": radius.tolist(),
            "last_iteration_change": spread, "contracting": bool(np.median(radius) < 1.0)}


def coupling_section(run: dict[str, Any], labels: np.ndarray | None) -> dict[str, Any]:
    """Accuracy of the most converged half (lowest score) vs the least converged half."""
    score = np.asarray(run["fixed"]["score"], np.float64)
    preds = run["fixed"]["preds"]
    if labels is None or len(score) < 2:
        return {"most_converged_accuracy": None, "least_converged_accuracy": None}
    order = np.argsort(np.where(np.isfinite(score), score, np.inf), kind="stable")
    half = len(order) // 2
    correct = (preds == labels).all(axis=1)
    return {"most_converged_accuracy": float(100 * correct[order[:half]].mean()),
            "least_converged_accuracy": float(100 * correct[order[half:]].mean()),
            "median_score": float(np.nanmedian(score))}


def verdict(section: dict[str, Any], cfg: ReportConfig) -> dict[str, Any]:
    """Accuracy drop beyond the precision's limit or agreement below the threshold fails the run."""
    precision = section["precision"]
    limit = cfg.drop_limit(precision)
    failures = []
    for label, head in section["accuracy"]["at_max_depth"].items():
        if head["drop"] is not None and head["drop"] > limit:
            failures.append(f"accuracy ({label}, depth {head['depth']}) {head['accuracy']:.1f}% is "
                            f"{head['drop']:.1f} points below FP32's {head['reference_accuracy']:.1f}% "
                            f"(limit {limit:g}; one puzzle is {section['accuracy']['points_per_puzzle']:.2g} points)")
        if head["agreement"] < cfg.min_agreement:
            failures.append(f"answers ({label}, depth {head['depth']}) agree with FP32 on "
                            f"{100 * head['agreement']:.1f}% of puzzles (threshold {100 * cfg.min_agreement:.0f}%)")
    worst_drop = max((h["drop"] for h in section["accuracy"]["at_max_depth"].values() if h["drop"] is not None),
                     default=None)
    return {"drop_limit": limit, "worst_drop": worst_drop, "failures": failures, "passed": not failures}
