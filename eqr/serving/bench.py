"""`measure_serving`: puzzles/s and latency through Triton against the in-process `Scheduler`.

Both serve the same puzzle stream with the same backend, threads and working batch; at each
concurrency C, C closed-loop clients send one puzzle per request and wait for its answer
(gRPC streaming for Triton, `Scheduler.submit` in process). The ratio at the highest
concurrency is `serving_vs_inprocess` (docs/performance.md, docs/serving.md).

    python -m eqr.serving.bench EXPORT_DIR [--puzzles 256] [--threads 1]   # table + RESULT line
"""
from __future__ import annotations

import itertools
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

CONCURRENCY = (1, 16, 64)
NAME = "serving_vs_inprocess"


def measure_serving(export_dir: str | Path, puzzles: int = 256, concurrency: tuple[int, ...] = CONCURRENCY,
                    batch: int = 64, threads: int = 1, seed: int = 0,
                    stage: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """-> {"value", "fields", "header", "rows", "note"}: the arguments of bench's `Measurement`."""
    from eqr.runtime import Scheduler, Solver
    from eqr.runtime.resolve import load_artifact
    from eqr.runtime.resolve import resolve_task
    from eqr.serving.repository import ServeConfig, write_repository
    from eqr.serving.server import Ports, TritonServer, free_ports

    task = resolve_task(load_artifact(export_dir), None)
    lines = [task.format_tokens(t) for t in task.generate(puzzles, seed=seed + 7).inputs]
    tokens = np.stack([task.parse_line(line) for line in lines]).astype(np.int32)
    inprocess, served = {}, {}
    stage(f"in-process Scheduler: {puzzles} puzzles at concurrency {', '.join(map(str, concurrency))}")
    solver = Solver.load(export_dir, backend="onnxruntime", batch_size=batch, threads=threads)
    with solver, Scheduler(solver, batch_size=batch, seed=seed, max_queue=4 * max(concurrency)) as scheduler:
        def local(i: int, slot: int) -> None:
            scheduler.submit(tokens[i % puzzles]).result()

        _closed_loop(local, 2 * batch, min(concurrency[-1], 2 * batch))  # warm-up: sessions, gather/concat
        for c in concurrency:
            inprocess[c] = _closed_loop(local, puzzles, c)
    with tempfile.TemporaryDirectory(prefix="eqr-serving-bench-") as tmp:
        write_repository(export_dir, Path(tmp) / "models",
                         ServeConfig(backend="onnxruntime", batch=batch, threads=threads,
                                     max_queue=4 * max(concurrency)))
        stage("tritonserver: the same stream over gRPC streaming, one client stream per concurrent client")
        with TritonServer(Path(tmp) / "models", ports=Ports(*free_ports(3)), log_file=Path(tmp) / "log") as server:
            server.wait_ready("eqr", timeout=300)
            served = _served(server, lines, concurrency, batch)
    rows, fields = [], {}
    for c in concurrency:
        (rate_s, p50_s, p99_s), (rate_i, p50_i, p99_i) = served[c], inprocess[c]
        rows.append((c, f"{rate_s:.1f}", f"{rate_i:.1f}", f"{rate_s / rate_i:.2f}", f"{p50_s * 1e3:.1f}",
                     f"{p99_s * 1e3:.1f}", f"{p50_i * 1e3:.1f}", f"{p99_i * 1e3:.1f}"))
        fields |= {f"triton_puzzles_per_s_c{c}": rate_s, f"inprocess_puzzles_per_s_c{c}": rate_i,
                   f"triton_p50_ms_c{c}": p50_s * 1e3, f"triton_p99_ms_c{c}": p99_s * 1e3,
                   f"inprocess_p50_ms_c{c}": p50_i * 1e3, f"inprocess_p99_ms_c{c}": p99_i * 1e3}
    top = concurrency[-1]
    fields |= {"concurrency": top, "puzzles": puzzles, "batch": batch, "threads": threads}
    return {"value": served[top][0] / inprocess[top][0], "fields": fields,
            "header": ("clients", "triton puzzles/s", "in-process puzzles/s", "ratio", "triton p50 ms",
                       "triton p99 ms", "in-process p50 ms", "in-process p99 ms"),
            "rows": rows,
            "note": f"closed-loop clients, one puzzle per request; onnxruntime, {threads} thread(s), working batch "
                    f"{batch}; ratio = Triton / in-process puzzles/s (the value: at {top} clients)"}


def _served(server: Any, lines: list[str], concurrency: tuple[int, ...], batch: int) -> dict[int, tuple]:
    from eqr.serving.client import StreamClient

    clients = [StreamClient(server.grpc_url, "eqr", timeout=300) for _ in range(max(concurrency))]
    try:
        def remote(i: int, slot: int) -> None:
            clients[slot].solve([lines[i % len(lines)]])  # one gRPC stream per client

        _closed_loop(remote, 2 * batch, min(concurrency[-1], 2 * batch))  # warm-up
        return {c: _closed_loop(remote, len(lines), c) for c in concurrency}
    finally:
        for client in clients:
            client.close()


def _closed_loop(request: Callable[[int, int], None], n: int, clients: int) -> tuple[float, float, float]:
    """Requests 0..n-1 from `clients` threads (slots), each waiting for its answer -> (per s, p50 s, p99 s)."""
    latencies = np.zeros(n)
    counter = itertools.count()  # next() is atomic under the GIL
    errors: list[BaseException] = []

    def worker(slot: int) -> None:
        try:
            while (i := next(counter)) < n:
                started = time.perf_counter()
                request(i, slot)
                latencies[i] = time.perf_counter() - started
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return n / seconds, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--puzzles", type=click.IntRange(min=1), default=256, show_default=True, help="Requests per concurrency.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(export_dir: str, puzzles: int, batch: int, threads: int, seed: int) -> None:
    """Measure serving_vs_inprocess on EXPORT_DIR and print its table and RESULT line."""
    result = measure_serving(export_dir, puzzles, CONCURRENCY, batch, threads, seed,
                             stage=lambda text: click.echo(text, err=True))
    click.echo(" | ".join(result["header"]))
    for row in result["rows"]:
        click.echo(" | ".join(map(str, row)))
    click.echo(result["note"])
    pairs = {NAME: result["value"]} | result["fields"]
    click.echo("RESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in pairs.items()))


if __name__ == "__main__":
    main()
