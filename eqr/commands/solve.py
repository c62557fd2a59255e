"""`eqr solve`: puzzles in, one answer per puzzle out; the loop is `eqr.runtime.loop`."""
from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import numpy as np

from eqr.commands.options import backend_option, batch_option, output_options, precision_option
from eqr.contract.artifact import CASCADES, PRECISIONS
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress
from eqr.runtime.aggregate import aggregator_names
from eqr.runtime.backends.base import backend_info, describe_run
from eqr.runtime.backends.registry import AUTO, backend_names

FORMATS = ("text", "csv", "hrm")
# --provider: ONNX Runtime execution providers by short name
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def parse_init_std(text: str | None) -> tuple[float, float] | None:
    """'0.1' -> (0.1, 0.1); '0.1,0.2' -> (z_H std, z_L std)."""
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(v >= 0 for v in values):
        raise EqRError(f"--init-std {text!r}: give one std, or two (z_H,z_L), each >= 0")
    return (values[0], values[-1])


@click.command()
@click.argument("artifact")
@click.option("--input", "-i", "source", default="-", show_default=True,
              help="Puzzle file (a data set directory for --format hrm); '-' reads stdin.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True,
              help="text: one puzzle per line; csv: puzzle,solution rows; hrm: an HRM/EqR data set.")
@click.option("--task", "task_name", metavar="NAME[:SIZE]", help="Puzzle task (default: from the artifact).")
@backend_option(choices=[AUTO, *backend_names()], default=AUTO,
                help="auto: TensorRT, else ONNX Runtime (its best provider), else torch, as available.")
@click.option("--provider", type=click.Choice(sorted(PROVIDERS), case_sensitive=False), default=None,
              help="ONNX Runtime execution provider to require (implies --backend onnxruntime); "
                   "exit 2 when it is not available, unless --fallback.")
@click.option("--fallback", is_flag=True, help="With --provider: fall back to the CPU provider when it is missing.")
@precision_option(default=None, choices=(*PRECISIONS, *CASCADES), multiple=False,
                  help="A precision, or a cascade LOW+HIGH (low-precision steps to the residual floor, then "
                       "high-precision ones under the high precision's rule) [default: the file's own for a .onnx "
                       "or engine path (model.step.int8.onnx: int8), else fp32]")
@click.option("--max-steps", type=click.IntRange(min=1), help="Outer-step cap per trajectory [default: the "
              "precision's calibrated stopping rule (`eqr calibrate`), else 256].")
@click.option("--tol", type=float, help="Relative-residual tolerance [default: the calibrated rule's, else the "
              "artifact's per-precision tol].")
@click.option("--init-std", metavar="STD[,STD]", default=None,
              help="Initial-state std of z_H (and z_L) for a foreign .onnx without eqr metadata (needs --tol too).")
@click.option("--patience", type=click.IntRange(min=1), help="Steps the residual (or q_halt) must stay below "
              "--tol (above --q-halt-threshold) [default: the calibrated rule's, else 2].")
@click.option("--window", type=click.IntRange(min=0), help="Stop when the answer is unchanged this many steps, "
              "0: off [default: the calibrated rule's, else 16].")
@click.option("--q-halt/--no-q-halt", default=None, help="Also stop when the q_halt head says halt for --patience "
              "steps [default: the calibrated rule's, else off].")
@click.option("--q-halt-threshold", type=float, help="q_halt logit above which a step says halt [default: the "
              "calibrated rule's, else 0].")
@click.option("--breadth", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trajectories per puzzle from independent seeded initial states.")
@click.option("--aggregate", type=click.Choice(aggregator_names()), default="converged", show_default=True,
              help="How one answer is chosen from the breadth trajectories.")
@click.option("--agree", type=click.IntRange(min=1), help="Stop a puzzle once M trajectories converged to one answer.")
@click.option("--fixed-depth", type=click.IntRange(min=1), metavar="D",
              help="The paper's protocol: exactly D steps, no gating.")
@click.option("--seed", type=int, default=0, show_default=True)
@batch_option(default=256, type=click.IntRange(min=1),
              help="Trajectories in the working batch (settled ones are replaced from the input).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for onnxruntime.")
@output_options
def solve(artifact: str, source: str, fmt: str, task_name: str | None, backend: str, provider: str | None,
          fallback: bool, precision: str | None, max_steps: int | None, tol: float | None, init_std: str | None,
          patience: int | None, window: int | None, q_halt: bool | None, q_halt_threshold: float | None,
          breadth: int, aggregate: str, agree: int | None, fixed_depth: int | None, seed: int, batch: int,
          threads: int | None, as_json: bool, quiet: bool, verbose: int) -> None:
    """Solve puzzles with ARTIFACT, giving each puzzle only the outer steps it needs.

    ARTIFACT is an export directory, an ONNX step file, a TensorRT engine, a checkpoint or a
    bundled model name. Each input puzzle gets one result: the answer (in the input's text
    format), steps used, whether it converged and, for Sudoku and mazes, whether the answer obeys
    the rules and the givens (reported only; it never picks answers). A malformed line gets an
    error record and the others are still solved; the exit code is then 1. The summary on
    stderr, and with --json every record's "backend", name the backend and the execution
    provider(s) that ran the steps.

    \b
    Examples:
      eqr solve sudoku-small-eqr --input puzzles.txt
      cat puzzles.txt | eqr solve export/ --backend onnxruntime --json
      eqr solve export/ -i test.csv --format csv --breadth 8 --aggregate converged --agree 3
      eqr solve export/ --provider cuda --precision fp16 -i puzzles.txt
      eqr solve ckpt.pt -i data/sudoku --format hrm --fixed-depth 16 --json
      eqr solve maze-small-eqr/ -i mazes.txt --precision int8+fp32

    \b
    Exit status: 0 every puzzle solved; 1 an input line was malformed; 2 usage or input
    error (artifact, flags, a requested provider missing); 130 interrupted.
    """
    from eqr.runtime.resolve import load_artifact, resolve_task
    from eqr.runtime.solver import Solver
    from eqr.tasks.io import read_puzzles

    progress = Progress(quiet)
    art = load_artifact(artifact, parse_init_std(init_std), tol)
    task = resolve_task(art, task_name)
    if fmt == "hrm" and source == "-":
        raise EqRError("--format hrm reads a data set directory; pass it with --input DIR")
    if source == "-" and sys.stdin.isatty():
        progress.note(f"reading {task.name} {task.size}x{task.size} puzzles from stdin, one per line "
                      "(end with Ctrl-D); or pass --input FILE")
    stream = sys.stdin if source == "-" else source
    entries = read_puzzles(stream, fmt, task, with_solutions=True)
    good = [(line, tokens, solution) for line, tokens, solution in entries if not isinstance(tokens, str)]
    backend, options = _backend_options(backend, provider, fallback, threads)
    solver = Solver.load(art, backend=backend, precision=precision, batch_size=batch, **options)
    flags = {"patience": patience, "window": None if window is None else window or None, "q_halt": q_halt,
             "q_halt_threshold": q_halt_threshold}
    given = {k: v for k, v in flags.items() if v is not None or (k == "window" and window == 0)}
    cfg = solver.config(max_steps, tol, fixed_depth=fixed_depth, agree=agree, **given)
    started = time.perf_counter()
    result, ran = None, None
    if good:
        tokens = np.stack([t for _, t, _ in good]).astype(np.int32)  # (P, L)
        with solver, progress.bar("solving", len(good) * breadth) as advance:
            result = solver.run(tokens, cfg, breadth, aggregate, seed, progress=advance)
            ran = backend_info(solver.backend)
    records = _records(entries, good, result, task, ran)
    for record in records:
        click.echo(json.dumps(record) if as_json else _text_line(record))
    progress.note(_summary(records, result, time.perf_counter() - started, ran))
    if any("error" in r for r in records):
        sys.exit(1)


def _backend_options(backend: str, provider: str | None, fallback: bool,
                     threads: int | None) -> tuple[str, dict[str, Any]]:
    """--backend/--provider/--fallback/--threads -> (backend name, its options)."""
    options: dict[str, Any] = {"threads": threads} if threads else {}
    if provider is None:
        if fallback:
            raise EqRError("--fallback goes with --provider (--backend auto already picks what is available)")
        return backend, options
    if backend not in (AUTO, "onnxruntime"):
        raise EqRError(f"--provider selects an ONNX Runtime provider; it does not apply to --backend {backend}")
    wanted = PROVIDERS[provider.lower()]
    fallbacks = [p for p in ("CPUExecutionProvider",) if p != wanted] if fallback else []
    return "onnxruntime", options | {"providers": [wanted, *fallbacks], "require_provider": not fallback}


def _records(entries: list, good: list, result: Any, task: Any, ran: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One record per input entry, in input order; "correct" only where the input has a solution."""
    by_line: dict[int, dict[str, Any]] = {}
    if result is not None:
        inputs = np.stack([t for _, t, _ in good])
        valid = task.is_valid(inputs, result.preds)
        for p, (line, _, solution) in enumerate(good):
            record = {
                "line": line, "answer": task.format_tokens(result.preds[p]), "steps": int(result.steps[p]),
                "converged": bool(result.converged[p]), "valid": bool(valid[p]),
                "residual": _finite(result.residual[p]), "agreement": float(result.agreement[p]),
                "depth": int(result.depth[p]), "diverged": bool(result.diverged[p])}
            if solution is not None:
                record["correct"] = bool((result.preds[p] == solution).all())
            by_line[p] = record | {"backend": ran}
    records, p = [], 0
    for line, tokens, _ in entries:
        if isinstance(tokens, str):
            records.append({"line": line, "error": tokens})
        else:
            records.append(by_line[p])
            p += 1
    return records


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _text_line(record: dict[str, Any]) -> str:
    if "error" in record:
        return f"line {record['line']}: error: {record['error']}"
    valid = {True: "valid", False: "invalid", None: "unchecked"}[record["valid"]]
    state = "diverged" if record["diverged"] else ("converged" if record["converged"] else "not converged")
    correct = {True: "\tcorrect", False: "\twrong", None: ""}[record.get("correct")]
    return f"{record['answer']}\tline {record['line']}\tsteps {record['steps']}\t{state}\t{valid}{correct}"


def _summary(records: list[dict[str, Any]], result: Any, seconds: float, ran: dict[str, Any] | None) -> str:
    solved = [r for r in records if "error" not in r]
    errors = len(records) - len(solved)
    parts = [f"{len(solved)} puzzles solved" + (f", {errors} input errors" if errors else "")]
    if solved:
        parts.append(f"{sum(r['valid'] for r in solved)} valid")
        graded = [r["correct"] for r in solved if "correct" in r]
        if graded:
            parts.append(f"{sum(graded)}/{len(graded)} correct")
        parts.append(f"{sum(r['converged'] for r in solved)} converged")
        parts.append(f"{result.stats.total_steps} outer steps ({result.stats.total_steps / len(solved):.1f}/puzzle)")
    parts.append(f"{seconds:.2f}s on {describe_run(ran)}")
    return "; ".join(parts)
