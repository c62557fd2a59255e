"""Turn a finished training run into a bundled model: eqr/bundled/<name>/{model.pt, card.json, card.md}.

The held-out set is made by `eqr data generate` (the exact arguments go into the card) with a
seed no training batch used; the card's numbers are measured on it with the EMA weights:
exact accuracy by depth, steps-to-stable-answer by difficulty tier, and the steps the runtime's
gating spends by difficulty (adaptive compute). Accuracy by depth is measured from a random
initial state with path noise off (the map the runtime iterates) unless `--noise` says otherwise;
the card records the sigma, and `remeasure` keeps it.

The command is `python -m eqr.commands.bundle` (make, remeasure), which passes the held-out
set's maker (`eqr data generate` with the card's arguments).
"""
from __future__ import annotations

import json
import logging
import shlex
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from eqr.contract.bundled import BUNDLED_FILE, CARD_JSON, CARD_MD, bundled_dir
from eqr.contract.errors import EqRError
from eqr.contract.io import atomic_write_text
from eqr.model.checkpoint import read_checkpoint, save_checkpoint
from eqr.model.load import load_model
from eqr.model.network import EqRModel
from eqr.training.data import to_training_labels
from eqr.training.evaluate import evaluate
from eqr.training.loop import CHECKPOINT_NAME, METRICS_NAME

log = logging.getLogger(__name__)

# (`eqr data generate` arguments less --seed/--out, seed, directory) -> the held-out split it wrote
Heldout = Callable[[Sequence[str], int, Path], Any]
MAX_BUNDLE_BYTES = 10 * 1024 * 1024


def measure(model: EqRModel, inputs: np.ndarray, labels: np.ndarray, tiers: Sequence[str],
            depths: Sequence[int], seed: int, groups: dict[str, Sequence[str]] | None = None,
            noise: float | None = None) -> dict[str, Any]:
    return evaluate(model, torch.as_tensor(inputs).long(), to_training_labels(labels), depths, seed=seed,
                    tiers=list(tiers), groups=groups, noise=noise)


def steps_to_settle(model: EqRModel, inputs: np.ndarray, labels: np.ndarray, groups: dict[str, Sequence[str]],
                    max_steps: int, seed: int) -> dict[str, Any]:
    """Outer steps the deployed runtime spends per puzzle under its default gating (residual
    below the FP32 tol, or the answer unchanged for the window), by each labelling in `groups`:
    the adaptive-compute measure (easy puzzles should stop earlier), with the gated answer's
    exact accuracy."""
    from eqr.contract.artifact import recommended_tol
    from eqr.runtime.solver import Solver

    tol = recommended_tol("fp32")["tol"]  # what the runtime uses for a checkpoint (no measured floor)
    with Solver.from_model(model, default_tol=tol) as solver:
        result = solver.solve(inputs.astype(np.int32), max_steps=max_steps, seed=seed)
    correct = (result.preds == labels).all(-1)
    report: dict[str, Any] = {"tol": tol, "window": solver.config().window, "max_steps": max_steps,
                              "exact": float(correct.mean()), "mean_steps": float(result.steps.mean())}
    for name, labels_of_rows in groups.items():
        report[f"by_{name}"] = steps_by_label(result.steps, correct, labels_of_rows)
    return report


def steps_by_label(steps: np.ndarray, correct: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per label (in first-seen order): puzzles, mean and median gated steps, exact accuracy."""
    labels = np.asarray(labels)
    return [{"tier": str(label), "n": int(mask.sum()), "mean_steps": float(steps[mask].mean()),
             "median_steps": float(np.median(steps[mask])), "exact": float(correct[mask].mean())}
            for label in dict.fromkeys(labels.tolist()) for mask in [labels == label]]


def calibrated_gating(model: str, inputs: np.ndarray, labels: np.ndarray, tiers: Sequence[str],
                      seed: int) -> dict[str, Any]:
    """Outer steps the runtime spends per puzzle on the model as deployed: exported, calibrated
    with `eqr calibrate`'s defaults (its stopping rules are fitted on puzzles it generates itself,
    not on these), and solved with each precision's rule from the manifest, by tier."""
    from eqr.calibration.calibrate import DEFAULT_CALIBRATED, run_calibrate
    from eqr.calibration.config import CalibConfig
    from eqr.contract.artifact import BASE_PRECISIONS
    from eqr.export.config import ExportConfig
    from eqr.export.exporter import export_model
    from eqr.runtime.solver import Solver
    from eqr.runtime.stopping_rules import describe_rule

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = str(Path(tmp) / "export")
        export_model(load_model(model), export_dir, ExportConfig(precision=("fp32",), engine="never"))
        run_calibrate(export_dir, None, CalibConfig(precisions=()))  # () as `eqr calibrate`: every graph it builds
        # the export's graph and what calibrate built (int8 runs the CPU variant on this CPU provider)
        for precision in ("fp32", *(p for p in DEFAULT_CALIBRATED if p in BASE_PRECISIONS)):
            with Solver.load(export_dir, backend="onnxruntime", precision=precision) as solver:
                rule = describe_rule(solver.config().to_dict())
                result = solver.solve(inputs.astype(np.int32), seed=seed)
            correct = (result.preds == labels).all(-1)
            rows.append({"precision": precision, "rule": rule,
                         "exact": float(correct.mean()), "mean_steps": float(result.steps.mean()),
                         "by_tier": steps_by_label(result.steps, correct, tiers)})
    # the same work as these commands (what a reader of the card would run)
    commands = [f"eqr export {model} --out EXPORT --engine never --precision fp32 -q", "eqr calibrate EXPORT -q"]
    return {"commands": commands, "by_precision": rows}


def difficulty_groups(task: Any, inputs: np.ndarray) -> dict[str, list[str]]:
    """Finer difficulty labels than the tiers where the task has them: maze S-G path length bands."""
    if not hasattr(task, "path_lengths"):
        return {}
    bands = [(1, 3), (4, 6), (7, 10), (11, 16), (17, 10_000)]
    lengths = [int(x) for x in task.path_lengths(inputs)]

    def label(n: int) -> str:
        return next((f"{lo}-{hi}" if hi < 10_000 else f"{lo}+" for lo, hi in bands if lo <= n <= hi), "no path")

    return {"path_length": [label(n) for n in lengths]}


def claim_from(by_depth: list[dict[str, float]]) -> dict[str, float]:
    """The best exact accuracy and the smallest depth that reaches it."""
    best = max(r["exact"] for r in by_depth)
    row = next(r for r in by_depth if r["exact"] == best)
    return {"depth": row["depth"], "exact": row["exact"]}


def training_curve(run_dir: Path) -> list[dict[str, Any]]:
    """(step, wall time, exact by depth) of every periodic evaluation in the run's log."""
    path = run_dir / METRICS_NAME
    if not path.exists():
        return []
    curve = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("type") == "eval":
            curve.append({"step": record["step"], "wall_time_s": record["wall_time_s"], "stage": record["stage"],
                          "exact_by_depth": {str(r["depth"]): round(r["exact"], 4) for r in record["by_depth"]}})
    return curve


def run_chain(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs behind a checkpoint, oldest first: this one and every --init-from ancestor."""
    chain = []
    node: dict[str, Any] | None = meta
    while node is not None:
        chain.append({"command": node.get("train_command"), "preset": node.get("preset"),
                      "steps": node.get("steps", (node.get("metrics") or {}).get("step")),
                      "wall_time_s": round(float(node.get("wall_time_s") or 0.0), 1),
                      "train_config": node.get("train_config")})
        node = node.get("init_from")
    return chain[::-1]


def make_bundle(run_dir: Path, name: str, heldout: Heldout, heldout_args: Sequence[str], heldout_seed: int,
                depths: Sequence[int], summary: str, notes: Sequence[str] = (), force: bool = False,
                root: Path | None = None, noise: float = 0.0, calibrated: bool = True) -> dict[str, Any]:
    """Bundle `run_dir`'s EMA model as `name` with its measured card (`calibrated`: also export and
    calibrate it to measure the deployed runtime's gated steps)."""
    ckpt = read_checkpoint(run_dir / CHECKPOINT_NAME)
    meta = ckpt.metadata
    if ckpt.ema is None:
        raise EqRError(f"{run_dir / CHECKPOINT_NAME}: has no EMA weights; bundles ship the EMA model")
    target = (root or bundled_dir()) / name
    if (target / BUNDLED_FILE).exists() and not force:
        raise EqRError(f"{target} already holds a bundled model; pass --force to replace it")
    model = ema_model(ckpt)
    train_config = meta.get("train_config", {})
    chain = run_chain(meta)
    card = {
        "name": name,
        "summary": summary,
        "notes": list(notes),
        "model": {"parameters": model.num_parameters(), "preset": meta.get("preset"), "config": ckpt.config.to_dict(),
                  "weights": "EMA (rate %s)" % train_config.get("ema_rate")},
        "training": {
            "command": " && ".join(str(run["command"]) for run in chain),
            "runs": chain,
            "seed": train_config.get("seed"),
            "steps": sum(int(run["steps"] or 0) for run in chain),
            "final_curriculum_stage": (meta.get("metrics") or {}).get("stage"),
            "wall_time_s": round(sum(run["wall_time_s"] for run in chain), 1),
            "machine": "2 CPU cores shared with other jobs, torch CPU, 1 thread",
            "data": meta.get("data"),
            "train_config": train_config,
            "curve": training_curve(run_dir),
        },
    } | measure_card(model, name, heldout, heldout_args, heldout_seed, depths, noise,
                   str(run_dir / CHECKPOINT_NAME) if calibrated else None)
    generate_args = card["heldout"]["generate_args"]
    metadata = meta | {"task": dict(meta.get("task") or {}) | {"generate_args": generate_args}, "card": card["claim"]}
    target.mkdir(parents=True, exist_ok=True)
    save_checkpoint(target / BUNDLED_FILE, ckpt.config, ckpt.model, ckpt.ema, metadata)
    size = (target / BUNDLED_FILE).stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise EqRError(f"{target / BUNDLED_FILE} is {size / 2**20:.1f} MiB, over the 10 MiB bundle limit; "
                       "use a smaller model")
    card["model"]["file_bytes"] = size
    _write_card(target, card, render_card(card))
    load_model(target / BUNDLED_FILE)  # the bundle must load
    return card


def ema_model(ckpt: Any) -> EqRModel:
    """The checkpoint's EMA weights in an eval-mode model (what bundles ship and cards measure)."""
    model = EqRModel(ckpt.config)
    model.load_state_dict(ckpt.ema)
    return model.eval()


def measure_card(model: EqRModel, name: str, make_heldout: Heldout, heldout_args: Sequence[str],
                 heldout_seed: int, depths: Sequence[int], noise: float, deployed: str | None) -> dict[str, Any]:
    """The card's measured part, on a held-out set made by `eqr data generate ARGS --seed SEED`:
    accuracy by depth and steps to a stable answer (path noise sigma `noise`), and the runtime's
    gated steps by difficulty (always noise-free: the exported step has no noise), from the
    checkpoint and, given `deployed` (what `eqr export` names the checkpoint by), from its calibrated export."""
    with tempfile.TemporaryDirectory() as tmp:
        heldout = make_heldout(heldout_args, heldout_seed, Path(tmp))
    task = heldout.task
    tiers = [str(t) for t in task.tier_of(heldout.inputs)]
    groups = difficulty_groups(task, heldout.inputs)
    report = measure(model, heldout.inputs, heldout.labels, tiers, depths, seed=heldout_seed, groups=groups,
                     noise=noise)
    settle = steps_to_settle(model, heldout.inputs, heldout.labels, {"tier": tiers} | groups, max(depths),
                             heldout_seed)
    order = {tier: i for i, tier in enumerate(task.tiers)}
    settle["by_tier"].sort(key=lambda row: order.get(row["tier"], len(order)))
    generate_args = list(heldout_args)
    return {
        "task": task.describe(),
        "heldout": {"generate_args": generate_args, "seed": heldout_seed, "n": len(heldout.inputs),
                    "data_command": " ".join(["eqr data generate", *map(shlex.quote, generate_args),
                                              "--seed", str(heldout_seed), "--out", f"heldout/{name}"])},
        "evaluation": {"noise_scale": noise, "initial_state_std": model.config.H_init_std,
                       "breadth": 1, "seed": heldout_seed,
                       "loop": "eqr.training.evaluate: exactly D outer steps of model.step from a random state"},
        "accuracy_by_depth": report["by_depth"],
        "claim": claim_from(report["by_depth"]),
        "steps_to_stable_by_tier": report["steps_to_stable_by_tier"],
        "steps_to_stable_by_path_length": report.get("steps_to_stable_by_path_length"),
        "steps_to_stable_max_depth": report["max_depth"],
        "steps_to_settle": settle,
    } | ({"steps_calibrated": calibrated_gating(deployed, heldout.inputs, heldout.labels, tiers, heldout_seed)}
         if deployed is not None else {})


def remeasure(name: str, heldout: Heldout, root: Path | None = None, noise: float | None = None,
              calibrated: bool = True) -> dict[str, Any]:
    """Re-run the measured part of a bundle's card from its shipped weights (same held-out
    arguments, seed, depths and, unless `noise` is given, the path noise the card records), e.g.
    after the evaluation gained a measure. The training record and the precision report section
    are kept."""
    from eqr.calibration.card import with_precision_section

    target = (root or bundled_dir()) / name
    card = json.loads((target / CARD_JSON).read_text(encoding="utf-8"))
    ckpt = read_checkpoint(target / BUNDLED_FILE)
    depths = [int(row["depth"]) for row in card["accuracy_by_depth"]]
    recorded = card["heldout"]
    noise = float(card["evaluation"]["noise_scale"]) if noise is None else noise
    card |= measure_card(ema_model(ckpt), name, heldout, recorded["generate_args"], int(recorded["seed"]), depths, noise,
                         (name if root is None else str(target / BUNDLED_FILE)) if calibrated else None)
    if ckpt.metadata.get("card") != card["claim"]:
        save_checkpoint(target / BUNDLED_FILE, ckpt.config, ckpt.model, ckpt.ema, ckpt.metadata | {"card": card["claim"]})
    text = render_card(card)
    if card.get("precision_report"):
        text = with_precision_section(text, card["precision_report"])
    _write_card(target, card, text)
    return card


def _write_card(target: Path, card: dict[str, Any], markdown: str) -> None:
    atomic_write_text(target / CARD_JSON, json.dumps(card, indent=2) + "\n")
    atomic_write_text(target / CARD_MD, markdown)
    for path in (target / BUNDLED_FILE, target / CARD_JSON, target / CARD_MD):
        path.chmod(0o644)  # package data: readable by everyone (temp files are created 0600)


def render_card(card: dict[str, Any]) -> str:
    t, tr, h = card["task"], card["training"], card["heldout"]
    lines = [
        f"# {card['name']}", "", card["summary"], "",
        "## Task", "",
        f"{t['name']} {t['size']}x{t['size']} (seq_len {t['seq_len']}, vocab {t['vocab_size']}, tiers "
        f"{', '.join(t['tiers'])}).", "",
        "## Data", "",
        f"Training: puzzles generated on the fly, seeded by (seed, step), curriculum stages "
        f"{json.dumps((tr['data'] or {}).get('curriculum'))}." if (tr["data"] or {}).get("source") == "generated"
        else f"Training: {json.dumps(tr['data'])}.",
        "", f"Held-out ({h['n']} puzzles, a seed no training batch used):", "", "```", h["data_command"], "```", "",
        "## Training", "",
        "```", "\n".join(str(run["command"]) for run in tr["runs"]), "```", "",
        *([f"{len(tr['runs'])} runs, each starting from the previous one's weights (--init-from): "
           + "; ".join(f"{run['steps']} steps / {run['wall_time_s'] / 60:.1f} min" for run in tr["runs"]), ""]
          if len(tr["runs"]) > 1 else []),
        f"- seed {tr['seed']}, {tr['steps']} optimizer steps, final curriculum stage {tr['final_curriculum_stage']}",
        f"- wall time {tr['wall_time_s'] / 60:.1f} min of training in total ({tr['machine']})",
        f"- model: {card['model']['parameters']:,} parameters, preset {card['model']['preset']}, "
        f"weights {card['model']['weights']}, file {card['model'].get('file_bytes', 0) / 1024:.0f} KiB",
        "", f"## Exact accuracy by depth (held-out, breadth 1, {_noise_words(card['evaluation'])})", "",
        "| depth | exact | cell |", "|---:|---:|---:|",
    ]
    lines += [f"| {r['depth']} | {100 * r['exact']:.1f}% | {100 * r['cell']:.1f}% |" for r in card["accuracy_by_depth"]]
    claim = card["claim"]
    lines += ["", f"Claim: **{100 * claim['exact']:.1f}% exact at depth {claim['depth']}**.", "",
              f"## Steps to a stable answer by tier (depth {card['steps_to_stable_max_depth']})", "",
              "The first outer step from which the predicted answer no longer changes.", "",
              "| tier | n | mean steps | median steps | exact at max depth |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['tier']} | {r['n']} | {r['mean_steps_to_stable']:.2f} | {r['median_steps_to_stable']:.0f} | "
              f"{100 * r['exact_at_max_depth']:.1f}% |" for r in card["steps_to_stable_by_tier"]]
    if card.get("steps_to_stable_by_path_length"):
        lines += ["", "By S-G path length (moves):", "",
                  "| path length | n | mean steps | median steps | exact at max depth |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['tier']} | {r['n']} | {r['mean_steps_to_stable']:.2f} | {r['median_steps_to_stable']:.0f} | "
                  f"{100 * r['exact_at_max_depth']:.1f}% |"
                  for r in sorted(card["steps_to_stable_by_path_length"], key=_band_start)]
    if card.get("steps_to_settle"):
        lines += _settle_lines(card["steps_to_settle"])
    if card.get("steps_calibrated"):
        lines += _calibrated_lines(card["steps_calibrated"], card["task"]["tiers"])
    if card.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in card["notes"]]
    if tr["curve"]:
        depths = list(tr["curve"][-1]["exact_by_depth"])
        lines += ["", "## Training curve (periodic held-out evaluation during training, EMA weights)", "",
                  "| step | min | stage | " + " | ".join(f"D{d}" for d in depths) + " |",
                  "|---:|---:|---:|" + "---:|" * len(depths)]
        lines += [f"| {c['step']} | {c['wall_time_s'] / 60:.1f} | {c['stage']} | "
                  + " | ".join(f"{100 * c['exact_by_depth'].get(d, float('nan')):.1f}" for d in depths) + " |"
                  for c in tr["curve"]]
    return "\n".join(lines) + "\n"


def _calibrated_lines(calibrated: dict[str, Any], tiers: Sequence[str]) -> list[str]:
    """The deployed model's gated steps: one row per precision, mean steps per tier, hardest / easiest."""
    lines = ["", "## Steps the deployed runtime spends, by difficulty (calibrated export)", "",
             "The same held-out puzzles through ONNX Runtime, each precision stopping by the rule "
             "`eqr calibrate` fitted for it (the rule `eqr solve`, `Solver` and `Scheduler` then use by default): "
             + "; ".join(f"`{c}`" for c in calibrated["commands"]) + ".", "",
             "| precision | rule | exact | " + " | ".join(tiers) + f" | {tiers[-1]} / {tiers[0]} |",
             "|---|---|---:|" + "---:|" * len(tiers) + "---:|"]
    for row in calibrated["by_precision"]:
        steps = {r["tier"]: r["mean_steps"] for r in row["by_tier"]}
        ratio = steps[tiers[-1]] / steps[tiers[0]] if tiers[0] in steps and tiers[-1] in steps else float("nan")
        lines.append(f"| {row['precision']} | {row['rule']} | {100 * row['exact']:.1f}% | "
                     + " | ".join(f"{steps[t]:.2f}" if t in steps else "-" for t in tiers) + f" | {ratio:.2f}x |")
    return lines


def _noise_words(evaluation: dict[str, Any]) -> str:
    """How a card names its accuracy measurement's path noise."""
    return "noise on" if float(evaluation["noise_scale"]) else "noise off"


def _settle_lines(settle: dict[str, Any]) -> list[str]:
    lines = ["", "## Steps the runtime spends, by difficulty (adaptive compute)", "",
             f"`Solver.solve` with its default gating: a puzzle stops once its relative residual stays below "
             f"{settle['tol']:g} or its answer is unchanged for {settle['window']} steps (cap {settle['max_steps']}). "
             f"Gated exact accuracy {100 * settle['exact']:.1f}%, {settle['mean_steps']:.2f} steps per puzzle.", ""]
    for key, heading in (("by_tier", "tier"), ("by_path_length", "path length")):
        rows = settle.get(key)
        if rows:
            lines += [f"| {heading} | n | mean steps | median steps | exact |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['tier']} | {r['n']} | {r['mean_steps']:.2f} | {r['median_steps']:.0f} | "
                      f"{100 * r['exact']:.1f}% |" for r in sorted(rows, key=_band_start)]
            lines.append("")
    return lines[:-1]


def _band_start(row: dict[str, Any]) -> int:
    head = row["tier"].split("-")[0].rstrip("+")
    return int(head) if head.isdigit() else 10**9
