"""`eqr triton` (write a Triton model repository) and `eqr serve` (run tritonserver on it)."""
from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from eqr.commands.options import batch_option
from eqr.contract.artifact import MANIFEST_FILE, PRECISIONS
from eqr.contract.errors import EqRError
from eqr.serving.repository import SERVE_BACKENDS, ServeConfig


class ServerDied(EqRError):
    """The server stopped on its own while serving: a failure, not a usage error."""

    exit_code = 1


def model_options(fn: Callable) -> Callable:
    """The flags that shape a served model (config.pbtxt), shared by `eqr triton` and `eqr serve`."""
    defaults = ServeConfig()
    options = [
        click.option("--name", default=defaults.name, show_default=True, help="Triton model name (/v2/models/NAME)."),
        click.option("--backend", type=click.Choice(SERVE_BACKENDS), default=defaults.backend, show_default=True,
                     help="eqr backend inside the model; tensorrt needs an engine built on the target (docs/serving.md)."),
        click.option("--precision", type=click.Choice(list(PRECISIONS), case_sensitive=False), default="fp32",
                     show_default=True, callback=lambda ctx, param, value: value.lower()),
        batch_option(default=defaults.batch, type=click.IntRange(min=1),
                     help="Trajectories in the working batch (settled ones are refilled)."),
        click.option("--breadth", type=click.IntRange(min=1), default=defaults.breadth, show_default=True,
                     help="Default trajectories per puzzle (a request's `breadth` overrides it)."),
        click.option("--max-steps", type=click.IntRange(min=1), default=defaults.max_steps,
                     help="Outer-step cap; a request's `max_steps` may only lower it [default: the precision's "
                          "calibrated stopping rule's (`eqr calibrate`), else 256]."),
        click.option("--agree", type=click.IntRange(min=1), default=defaults.agree, metavar="M",
                     help="Stop a puzzle once M trajectories converged to one answer; they launch in waves of "
                          "M, 2M, 4M, ... up to the breadth [default: off]."),
        click.option("--max-queue", type=click.IntRange(min=1), default=defaults.max_queue, show_default=True,
                     help="Requests waiting beyond the working batch before new ones get a busy error."),
        click.option("--instances", type=click.IntRange(min=1), default=defaults.instances, show_default=True,
                     help="Model instances (instance_group count; one per GPU is typical)."),
        click.option("--stream-every", type=click.IntRange(min=1), default=defaults.stream_every, show_default=True,
                     help="Outer steps between provisional responses of a streaming request."),
        click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                     help="onnxruntime CPU threads per instance (0: its default)."),
        click.option("--noise", type=click.FloatRange(min=0), default=defaults.noise, show_default=True,
                     metavar="SIGMA", help="Default path-noise sigma (a request's `noise` overrides it); > 0 needs "
                                           "an export made with `eqr export --noisy`."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _config(options: dict[str, Any]) -> ServeConfig:
    return ServeConfig(**{k: options[k] for k in ServeConfig.__dataclass_fields__})


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Model repository to write.")
@model_options
@click.option("--force", is_flag=True, help="Replace REPO/NAME if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def triton(export_dir: str, out: str, force: bool, as_json: bool, quiet: bool, **options: Any) -> None:
    """Write a Triton model repository serving EXPORT_DIR (an `eqr export` directory).

    REPO/NAME/config.pbtxt (Python backend, decoupled), REPO/NAME/1/model.py and the export
    itself in REPO/NAME/1/export/: copy REPO to a Triton server (NVIDIA's containers, Jetson,
    or `eqr serve` here) and serve it unchanged. docs/serving.md has the interface.

    \b
    Examples:
      eqr triton sudoku-export --out models
      eqr triton export/ --out models --backend tensorrt --precision fp16 --batch 256 --instances 2
      eqr serve models
    """
    from eqr.serving.repository import write_repository

    cfg = _config(options)
    model_dir = write_repository(export_dir, out, cfg, force=force)
    if as_json:
        click.echo(json.dumps({"repository": str(Path(out)), "model": str(model_dir), "config": vars(cfg)}, indent=2))
    elif not quiet:
        click.echo(f"wrote {model_dir}/ (config.pbtxt, 1/model.py, 1/export/); serve it with: eqr serve {out}")


@click.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False),
              help="Where to write the repository when SOURCE is an export [default: a temporary one].")
@model_options
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to bind (HTTP and gRPC); 0.0.0.0 exposes the server beyond this machine.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--timeout", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Seconds to wait for the model to become ready.")
@click.option("--force", is_flag=True, help="Replace --out/NAME if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Once ready, print the endpoints as one JSON line.")
@click.option("-v", "--verbose", is_flag=True, help="Triton's verbose log.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def serve(source: str, out: str | None, address: str, http_port: int, grpc_port: int, metrics_port: int,
          timeout: float, force: bool, as_json: bool, verbose: bool, quiet: bool, **options: Any) -> None:
    """Serve SOURCE (an export directory, or a repository from `eqr triton`) on tritonserver.

    Uses the tritonserver on PATH, else the one of the serve extra (pip install 'eqr[cpu,serve]').
    Waits until the model is ready, prints its endpoints and a curl line, and serves until
    Ctrl-C, which stops the server cleanly (in-flight requests are answered or get an error).

    \b
    Examples:
      eqr serve sudoku-export
      eqr serve models --name eqr --http-port 9000 --grpc-port 9001 --metrics-port 9002
      curl -s 127.0.0.1:8000/v2/models/eqr/generate -d '{"puzzle": ["2..1.........42."]}'
    """
    from eqr.serving.repository import write_repository
    from eqr.serving.server import Ports, TritonServer, find_tritonserver

    cfg = _config(options)
    find_tritonserver()  # before writing anything: one line naming the serve extra when it is missing
    scratch = None
    if (Path(source) / MANIFEST_FILE).is_file():  # an export: write its repository first
        if out is None:
            scratch = Path(tempfile.mkdtemp(prefix="eqr-repo-"))
        repository = Path(out) if out else scratch
        write_repository(source, repository, cfg, force=force)
    else:
        repository = Path(source)
        if not (repository / cfg.name / "config.pbtxt").is_file():
            raise EqRError(f"{source}: neither an export ({MANIFEST_FILE}) nor a repository with {cfg.name}/config.pbtxt; "
                           "pass --name to pick the model, or write one with `eqr triton`")
    server = TritonServer(repository, address, Ports(http_port, grpc_port, metrics_port), verbose=verbose)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, systemd and Kubernetes stop it like Ctrl-C
    try:
        server.start()
        server.wait_ready(cfg.name, timeout)
        if as_json:
            click.echo(json.dumps({"model": cfg.name, "repository": str(repository), "pid": server.pid,
                                   "http": server.http_url, "grpc": server.grpc_url,
                                   "metrics": f"{server.address}:{server.ports.metrics}"}))
        elif not quiet:
            _announce(server, cfg.name, repository)
        while server.process.poll() is None:
            time.sleep(0.5)
        raise ServerDied(f"tritonserver exited with code {server.process.returncode}; its log ends: {server.log_tail()}")
    except KeyboardInterrupt:
        if not quiet:
            click.echo("stopping tritonserver (in-flight requests are answered or cancelled) ...", err=True)
        code = server.stop()
        if not quiet:
            click.echo(f"tritonserver exited ({code})", err=True)
        sys.exit(130)
    finally:
        server.stop()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _announce(server: Any, name: str, repository: Path) -> None:
    example = _example_puzzle(repository / name)
    host = server.address
    click.echo(f"serving {name} from {repository}\n"
               f"  HTTP     http://{host}:{server.ports.http}/v2/models/{name}  (generate, generate_stream)\n"
               f"  gRPC     {host}:{server.ports.grpc}  (streaming: start_stream / async_stream_infer)\n"
               f"  metrics  http://{host}:{server.ports.metrics}/metrics\n"
               f"  ready    http://{host}:{server.ports.http}/v2/health/ready\n"
               f"try:\n  curl -s {host}:{server.ports.http}/v2/models/{name}/generate -d "
               f"'{json.dumps({'puzzle': [example]})}'\n"
               "Ctrl-C stops the server.")


def _example_puzzle(model_dir: Path) -> str:
    from eqr.runtime.resolve import load_artifact, resolve_task

    task = resolve_task(load_artifact(model_dir / "1" / "export"), None)
    return task.format_tokens(task.generate(1, seed=0).inputs[0])
