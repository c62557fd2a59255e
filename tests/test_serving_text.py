"""One parse path: every bundled model's held-out puzzles, as text, give the same answers through
HTTP generate, the gRPC stream, `eqr solve ARTIFACT` and `eqr solve --server` (HTTP and gRPC).

Mazes are the sharp case: a generated maze often has an open square (a space) at the start or
end of its line, which a server that strips its input lines would reject.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eqr.contract.bundled import bundled_dir, bundled_names
from eqr.contract.errors import EqRError
from eqr.serving.client import StreamClient, decoded, generate
from eqr.serving.repository import ServeConfig, write_repository
from eqr.serving.server import Ports, TritonServer, find_tritonserver, free_ports
from eqr.tasks import get_task

PUZZLES = 64  # a prefix of each card's held-out set (generate gives prefixes)
SEED = 7


def _heldout_lines(name: str) -> list[str]:
    from tests.test_bundled import _options_from_args

    card = json.loads((bundled_dir() / name / "card.json").read_text())
    task = get_task(card["task"]["name"], card["task"]["size"])
    options = _options_from_args(card["heldout"]["generate_args"])
    return [task.format_tokens(row) for row in task.generate(PUZZLES, seed=card["heldout"]["seed"], **options).inputs]


@pytest.fixture(scope="module")
def fleet_of_models(tmp_path_factory):
    """One tritonserver serving every bundled model (model name = bundle name), and their exports."""
    try:
        find_tritonserver()
    except EqRError as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("text")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    exports = {}
    for name in bundled_names():
        exports[name] = tmp / name
        subprocess.run([sys.executable, "-m", "eqr", "export", name, "--out", str(exports[name]), "-q"], check=True,
                       env=env, capture_output=True)
        write_repository(exports[name], tmp / "models", ServeConfig(name=name, batch=64, threads=1))
    server = TritonServer(tmp / "models", "127.0.0.1", Ports(*free_ports(3)), log_file=tmp / "tritonserver.log")
    server.start()
    try:
        for name in exports:
            server.wait_ready(name, timeout=180)
        yield server, exports, tmp
    finally:
        server.stop(grace=30)


def _solve_cli(args: list[str], lines: list[str], tmp: Path) -> list[dict]:
    source = tmp / "puzzles.txt"
    source.write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "eqr", "solve", *args, "-i", str(source), "--json", "--seed", str(SEED),
                          "-q"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize("name", bundled_names())
def test_held_out_text_answers_alike_through_every_path(fleet_of_models, name):
    server, exports, tmp = fleet_of_models
    lines = _heldout_lines(name)
    if name.startswith("maze"):  # the case the one parse path is for
        assert any(line[0] == " " or line[-1] == " " for line in lines)
    local = _solve_cli([str(exports[name]), "--threads", "1"], lines, tmp)
    answers = [r["answer"] for r in local]
    assert len(answers) == len(lines) and all("error" not in r for r in local)

    http = generate(server.http_url, name, {"puzzle": lines, "seed": [SEED], "breadth": [1]}, timeout=300)
    assert http["error"] == [""] * len(lines) and http["answer"] == answers
    with StreamClient(server.grpc_url, name, timeout=300) as client:
        grpc = decoded(client.solve(lines, seed=SEED, breadth=1)[-1])
    assert grpc["error"] == [""] * len(lines) and grpc["answer"] == answers
    np.testing.assert_array_equal(np.asarray(grpc["steps"]), [r["steps"] for r in local])  # breadth 1: one trajectory

    for url in (f"http://{server.http_url}", f"grpc://{server.grpc_url}"):
        remote = _solve_cli(["--server", url, "--name", name, "--request-size", "8"], lines, tmp)
        assert remote == local, url  # the same JSONL, record for record


def test_solver_task_parse_reads_what_the_server_reads():
    task = get_task("maze", 9)
    lines = [task.format_tokens(row) for row in task.generate(32, seed=3).inputs]
    edged = [line for line in lines if line[0] == " " or line[-1] == " "]
    assert edged, "no maze with an open square at a line end: pick another seed"
    np.testing.assert_array_equal(task.parse(edged), np.stack([task.parse_line(line) for line in edged]))
    assert all(not isinstance(row, str) for row in task.parse_each(line + "\r\n" for line in edged))
