"""`eqr solve`: puzzles in, one answer per puzzle out; the loop is `eqr.runtime.loop`."""
from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import numpy as np

from eqr.commands.options import backend_option, batch_option, device_option, output_options, precision_option
from eqr.contract.artifact import CASCADES, PRECISIONS
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress
from eqr.runtime.aggregate import aggregator_names
from eqr.runtime.backends.base import backend_info, describe_run
from eqr.runtime.backends.registry import AUTO, backend_names
from eqr.runtime.metrics import DEFAULT_TOP_K, headline, official_metrics, trajectories_of

FORMATS = ("text", "csv", "hrm")
# what the served model decides: with --server these flags must stay at their defaults
SERVER_DECIDES = ("backend", "provider", "fallback", "precision", "tol", "init_std", "patience", "window", "q_halt",
                  "q_halt_threshold", "aggregate", "agree", "fixed_depth", "batch", "threads", "device")
# what a local run adds to its answers for the official metrics: (P, K, L), (P, K), (P, K)
TRAJECTORIES = ("trajectory_preds", "score", "valid")
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
@click.argument("artifact", required=False)
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
@device_option()
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
@click.option("--top-k", type=click.IntRange(min=1), default=DEFAULT_TOP_K, show_default=True,
              help="Trajectories of the official convergence top-k metrics (inputs with solutions, breadth > 1).")
@click.option("--summary", "summary_path", metavar="FILE", help="Also write the summary as JSON to FILE ('-': one "
              "line on stderr), with the official breadth metrics when the input has solutions (not with --server).")
@click.option("--agree", type=click.IntRange(min=1),
              help="Stop a puzzle once M trajectories converged to one answer; they launch in waves of M, 2M, 4M, ...")
@click.option("--fixed-depth", type=click.IntRange(min=1), metavar="D",
              help="The paper's protocol: exactly D steps, no gating.")
@click.option("--noise", type=click.FloatRange(min=0), metavar="SIGMA",
              help="Path noise: SIGMA x N(0, 1) added at every damped update, as the official evaluation "
                   "(0.01); reproducible per seed, puzzle, trajectory and step. Needs an export made with "
                   "`eqr export --noisy` (or a checkpoint) [default: 0, noise-free].")
@click.option("--seed", type=int, default=0, show_default=True)
@batch_option(default=256, type=click.IntRange(min=1),
              help="Trajectories in the working batch (settled ones are replaced from the input).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for onnxruntime.")
@click.option("--server", metavar="URL", help="Solve on a served model instead (`eqr serve`, one replica or a load "
              "balancer): http://HOST:PORT or grpc://HOST:PORT; no ARTIFACT then.")
@click.option("--name", default="eqr", show_default=True, help="With --server: the Triton model name.")
@click.option("--in-flight", type=click.IntRange(min=1), default=8, show_default=True,
              help="With --server: requests on the wire at once.")
@click.option("--request-size", type=click.IntRange(min=1, max=4096), default=16, show_default=True,
              help="With --server: puzzles per request.")
@output_options
def solve(artifact: str | None, source: str, fmt: str, task_name: str | None, backend: str, provider: str | None,
          fallback: bool, device: str | None, precision: str | None, max_steps: int | None, tol: float | None,
          init_std: str | None, patience: int | None, window: int | None, q_halt: bool | None, q_halt_threshold: float | None,
          breadth: int, aggregate: str, agree: int | None, fixed_depth: int | None, noise: float | None, seed: int,
          batch: int,
          threads: int | None, server: str | None, name: str, in_flight: int, request_size: int,
          as_json: bool, quiet: bool, verbose: int, top_k: int, summary_path: str | None) -> None:
    """Solve puzzles with ARTIFACT, giving each puzzle only the outer steps it needs.

    ARTIFACT is an export directory, an ONNX step file, a TensorRT engine, a checkpoint or a
    bundled model name; with --server URL the puzzles go to a served model instead (the same
    inputs and output; the served model decides backend, precision and stopping rule; a broken
    connection or a busy server is retried). Each input puzzle gets one result: the answer (in
    the input's text format), steps used, whether it converged and, for Sudoku and mazes, whether the answer obeys
    the rules and the givens (reported only; it never picks answers). A malformed line gets an
    error record and the others are still solved; the exit code is then 1. The summary on
    stderr, and with --json every record's "backend", name the backend and the execution
    provider(s) that ran the steps.

    \b
    Examples:
      eqr solve sudoku-small-eqr --input puzzles.txt
      cat puzzles.txt | eqr solve export/ --backend onnxruntime --json
      eqr solve export/ -i test.csv --format csv --breadth 8 --aggregate converged --agree 3
      eqr solve export/ -i data/sudoku --format hrm --breadth 8 --fixed-depth 16 --summary metrics.json
      eqr solve export/ --provider cuda --precision fp16 -i puzzles.txt
      eqr solve ckpt.pt -i data/sudoku --format hrm --fixed-depth 16 --json
      eqr solve noisy-eqr/ -i data/sudoku --format hrm --fixed-depth 16 --noise 0.01   # the official protocol
      eqr solve maze-small-eqr/ -i mazes.txt --precision int8+fp32
      eqr solve --server http://127.0.0.1:8000 -i puzzles.txt --json

    \b
    Exit status: 0 every puzzle solved; 1 an input line was malformed (or the server failed a
    request); 2 usage or input error (artifact, flags, a requested provider missing, no server
    answering); 130 interrupted.
    """
    from eqr.tasks.io import read_puzzles

    progress = Progress(quiet)
    if server is not None:
        _check_server_flags(artifact)
        solve_on = _RemoteRun(server, name, in_flight, request_size, task_name)
    elif artifact is None:
        raise EqRError("eqr solve needs ARTIFACT (an export, model or bundled name) or --server URL")
    else:
        solve_on = _LocalRun(artifact, task_name, init_std, tol, backend, provider, fallback, threads, precision, batch,
                             device)
    task = solve_on.task
    if fmt == "hrm" and source == "-":
        raise EqRError("--format hrm reads a data set directory; pass it with --input DIR")
    if source == "-" and sys.stdin.isatty():
        progress.note(f"reading {task.name} {task.size}x{task.size} puzzles from stdin, one per line "
                      "(end with Ctrl-D); or pass --input FILE")
    stream = sys.stdin if source == "-" else source
    entries = read_puzzles(stream, fmt, task, with_solutions=True)
    good = [(line, tokens, solution) for line, tokens, solution in entries if not isinstance(tokens, str)]
    flags = {"patience": patience, "window": None if window is None else window or None, "q_halt": q_halt,
             "q_halt_threshold": q_halt_threshold}
    rule = {k: v for k, v in flags.items() if v is not None or (k == "window" and window == 0)}
    rule |= {"tol": tol, "fixed_depth": fixed_depth, "agree": agree} | ({} if noise is None else {"noise": noise})
    started = time.perf_counter()
    answers, ran = None, None
    labelled = any(solution is not None for _, _, solution in good)
    if good:
        tokens = np.stack([t for _, t, _ in good]).astype(np.int32)  # (P, L)
        with progress.bar("solving", len(good) * breadth) as advance:
            answers, ran = solve_on.run(tokens, max_steps, rule, breadth, aggregate, seed, advance, labelled)
    records = _records(entries, good, answers, task, ran)
    for record in records:
        click.echo(json.dumps(record) if as_json else _text_line(record))
    fields = _summary_fields(records, answers, time.perf_counter() - started, ran)
    fields |= {"breadth": breadth, "aggregate": aggregate, "official_metrics": _official_metrics(good, answers, top_k)}
    progress.note(_summary(fields) + solve_on.via)
    if summary_path == "-":
        click.echo(json.dumps(fields), err=True)
    elif summary_path is not None:
        from eqr.contract.io import atomic_write_text

        atomic_write_text(summary_path, json.dumps(fields, indent=2) + "\n")
    if any("error" in r for r in records):
        sys.exit(1)


class _LocalRun:
    """`eqr solve ARTIFACT`: a Solver in this process."""

    def __init__(self, artifact: str, task_name: str | None, init_std: str | None, tol: float | None, backend: str,
                 provider: str | None, fallback: bool, threads: int | None, precision: str | None, batch: int,
                 device: str | None = None) -> None:
        from eqr.runtime.resolve import load_artifact, resolve_task
        from eqr.runtime.solver import Solver

        art = load_artifact(artifact, parse_init_std(init_std), tol)
        self.task, self.via = resolve_task(art, task_name), ""
        backend, options = _backend_options(backend, provider, fallback, threads)
        if device is not None:
            options["device"] = device  # the registry parses it and refuses a backend it does not apply to
        self.solver = Solver.load(art, backend=backend, precision=precision, batch_size=batch, **options)

    def run(self, tokens: np.ndarray, max_steps: int | None, rule: dict[str, Any], breadth: int, aggregate: str,
            seed: int, advance: Any, trajectories: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """trajectories: the answers also hold TRAJECTORIES, every trajectory's preds, score and valid."""
        from eqr.runtime.solver import PER_PUZZLE

        cfg = self.solver.config(max_steps, **rule)
        with self.solver:
            result = self.solver.run(tokens, cfg, breadth, aggregate, seed, progress=advance,
                                     keep_trajectories=trajectories)
            ran = backend_info(self.solver.backend)
        answers = {field: getattr(result, field) for field in PER_PUZZLE}
        if trajectories:
            answers |= dict(zip(TRAJECTORIES, trajectories_of(result)))
        return answers, ran


class _RemoteRun:
    """`eqr solve --server URL`: the served model; the same seeds, so the same answers."""

    def __init__(self, server: str, name: str, in_flight: int, request_size: int, task_name: str | None) -> None:
        from eqr.serving.remote import RemoteSolver
        from eqr.tasks import task_from_spec

        self.remote = RemoteSolver(server, name, in_flight=in_flight, request_size=request_size)
        self.task = task_from_spec(task_name) if task_name else self.remote.task()
        self.via = f" via {self.remote.endpoint} (model {name})"

    def run(self, tokens: np.ndarray, max_steps: int | None, rule: dict[str, Any], breadth: int, aggregate: str,
            seed: int, advance: Any, trajectories: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """trajectories is not served: a served answer holds the chosen trajectory only."""
        answers = self.remote.solve(tokens, seed=seed, breadth=breadth, max_steps=max_steps, progress=advance,
                                    noise=rule.get("noise"))
        return answers, self.remote.backend


def _check_server_flags(artifact: str | None) -> None:
    """--server: ARTIFACT and the flags the served model decides are refused, not ignored."""
    if artifact is not None:
        raise EqRError(f"--server solves on the served model; drop ARTIFACT {artifact!r} (or drop --server)")
    ctx = click.get_current_context()
    given = [p for p in ctx.command.params if p.name in SERVER_DECIDES
             and ctx.get_parameter_source(p.name) is not click.core.ParameterSource.DEFAULT]
    if given:
        flags = ", ".join(p.opts[0] for p in given)
        raise EqRError(f"with --server the served model decides {flags}: set them with `eqr triton`/`eqr serve` "
                       "(docs/serving.md), or solve locally with ARTIFACT")


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


def _records(entries: list, good: list, answers: dict[str, np.ndarray] | None, task: Any,
             ran: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One record per input entry, in input order; "correct" only where the input has a solution."""
    by_line: dict[int, dict[str, Any]] = {}
    if answers is not None:
        inputs = np.stack([t for _, t, _ in good])
        valid = task.is_valid(inputs, answers["preds"])
        for p, (line, _, solution) in enumerate(good):
            record = {
                "line": line, "answer": task.format_tokens(answers["preds"][p]), "steps": int(answers["steps"][p]),
                "converged": bool(answers["converged"][p]), "valid": bool(valid[p]),
                "residual": _finite(answers["residual"][p]), "agreement": float(answers["agreement"][p]),
                "depth": int(answers["depth"][p]), "diverged": bool(answers["diverged"][p])}
            if solution is not None:
                record["correct"] = bool((answers["preds"][p] == solution).all())
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


def _summary_fields(records: list[dict[str, Any]], answers: dict[str, np.ndarray] | None, seconds: float,
                    ran: dict[str, Any] | None) -> dict[str, Any]:
    """The summary's counts (the stderr line and --summary's JSON)."""
    solved = [r for r in records if "error" not in r]
    graded = [r["correct"] for r in solved if "correct" in r]
    steps = int(answers["steps"].sum()) if solved and answers is not None else 0
    return {"puzzles": len(solved), "input_errors": len(records) - len(solved),
            "valid": sum(r["valid"] for r in solved), "graded": len(graded), "correct": sum(graded),
            "converged": sum(r["converged"] for r in solved), "outer_steps": steps, "seconds": seconds, "backend": ran}


def _official_metrics(good: list, answers: dict[str, np.ndarray] | None, top_k: int) -> dict[str, Any] | None:
    """eqr.runtime.metrics over the puzzles that came with a solution; None without one (or per-trajectory answers)."""
    rows = [p for p, (_, _, solution) in enumerate(good) if solution is not None]
    if not rows or answers is None or TRAJECTORIES[0] not in answers:
        return None
    labels = np.stack([good[p][2] for p in rows])  # (P', L)
    return official_metrics(*(answers[key][rows] for key in TRAJECTORIES), labels, top_k)


def _summary(fields: dict[str, Any]) -> str:
    n, errors = fields["puzzles"], fields["input_errors"]
    parts = [f"{n} puzzles solved" + (f", {errors} input errors" if errors else "")]
    if n:
        parts.append(f"{fields['valid']} valid")
        if fields["graded"]:
            parts.append(f"{fields['correct']}/{fields['graded']} correct")
        parts.append(f"{fields['converged']} converged")
        parts.append(f"{fields['outer_steps']} outer steps ({fields['outer_steps'] / n:.1f}/puzzle)")
    metrics = fields.get("official_metrics")
    if metrics and fields["breadth"] > 1:
        parts.append(headline(metrics))
    parts.append(f"{fields['seconds']:.2f}s on {describe_run(fields['backend'])}")
    return "; ".join(parts)
