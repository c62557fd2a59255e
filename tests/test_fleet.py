"""A local fleet, for real: two `eqr serve` replicas behind haproxy (deploy/haproxy/haproxy.cfg),
`hey` as the outside load, and a replica killed by SIGKILL or drained by SIGTERM mid-load.

Every process is started here, on loopback, in its own process group, and stopped by its pid.
`scripts/fleet_check.sh` runs this file by hand, with its log lines shown.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from eqr.contract.errors import EqRError
from eqr.runtime import Solver
from eqr.serving.client import generate_stream
from eqr.serving.server import find_tritonserver, free_ports
from eqr.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
TASK = get_task("maze", 9)
SEED = 5
MARKED_DOWN_S = 2.0  # docs/serving.md#a-fleet-behind-haproxy: a dead replica is out of rotation within this


def _needs(*programs: str) -> None:
    try:
        find_tritonserver()
    except EqRError as e:
        pytest.skip(str(e))
    for program in programs:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (.ci/run installs it: apt-get install {program})")


@dataclass
class Replica:
    """One `eqr serve` process (and the tritonserver it runs), in its own process group."""

    repository: Path
    log: Path
    http: int = 0
    grpc: int = 0
    metrics: int = 0
    process: subprocess.Popen | None = None
    triton_pid: int = 0

    def start(self) -> "Replica":
        self.http, self.grpc, self.metrics = free_ports(3)
        command = [sys.executable, "-m", "eqr", "serve", str(self.repository), "--json", "--http-port", str(self.http),
                   "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=open(self.log, "ab"), text=True,
                                        start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        line = self.process.stdout.readline()  # one JSON line once the model is ready
        if not line:
            raise RuntimeError(f"eqr serve exited ({self.process.wait()}): {self.log.read_text()[-2000:]}")
        self.triton_pid = json.loads(line)["pid"]
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/models/eqr/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        for pid in (self.process.pid, self.triton_pid):  # eqr serve's group, then tritonserver's own
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process.wait(timeout=30)
        self.process = None


@dataclass
class Balancer:
    """haproxy in the foreground on the shipped configuration, replicas' ports from the environment."""

    replicas: list[Replica]
    log: Path
    http: int = 0
    grpc: int = 0
    stats: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "Balancer":
        self.http, self.grpc, self.stats = free_ports(3)
        env = dict(os.environ, EQR_LISTEN="127.0.0.1", EQR_HTTP_PORT=str(self.http), EQR_GRPC_PORT=str(self.grpc),
                   EQR_STATS_PORT=str(self.stats), EQR_MODEL="eqr")
        for i, replica in enumerate(self.replicas, start=1):
            env |= {f"EQR_REPLICA_{i}": "127.0.0.1", f"EQR_HTTP_{i}": str(replica.http),
                    f"EQR_GRPC_{i}": str(replica.grpc)}
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CFG)], env=env, start_new_session=True,
                                        stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        self.wait_status({f"replica{i}": "UP" for i in range(1, len(self.replicas) + 1)}, timeout=30)
        return self

    def status(self) -> dict[str, str]:
        """Server name -> UP / DOWN / ... of the HTTP backend, from haproxy's stats CSV."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats}/stats;csv", timeout=2) as response:
            rows = csv.DictReader(io.StringIO(response.read().decode().lstrip("# ")))
            return {row["svname"]: row["status"].split()[0] for row in rows
                    if row["pxname"] == "replicas_http" and row["svname"].startswith("replica")}

    def wait_status(self, wanted: dict[str, str], timeout: float) -> float:
        """Seconds until every named server has its wanted status; AssertionError after `timeout`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if all(self.status().get(name) == state for name, state in wanted.items()):
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"haproxy did not reach {wanted} in {timeout} s: {self.status()}")

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    _needs("haproxy", "hey")
    tmp = tmp_path_factory.mktemp("fleet")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "eqr"]
    subprocess.run([*run, "export", "maze-small", "--out", str(tmp / "export"), "-q"], check=True, env=env,
                   capture_output=True)
    subprocess.run([*run, "triton", str(tmp / "export"), "--out", str(tmp / "models"), "--batch", "64",
                    "--threads", "1", "--stream-every", "1", "-q"], check=True, env=env, capture_output=True)
    return tmp / "models"


@pytest.fixture()
def fleet(repository, tmp_path):
    replicas = [Replica(repository, tmp_path / f"replica{i}.log") for i in (1, 2)]
    balancer = None
    try:
        for replica in replicas:
            replica.start()
        balancer = Balancer(replicas, tmp_path / "haproxy.log").start()
        yield balancer
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            replica.stop()


@pytest.fixture(scope="module")
def mazes() -> np.ndarray:
    return TASK.generate(200, seed=17).inputs.astype(np.int32)


@pytest.fixture(scope="module")
def maze_file(mazes, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mazes") / "mazes.txt"
    path.write_text("".join(TASK.format_tokens(row) + "\n" for row in mazes))
    return path


def _solve(args: list[str], maze_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eqr", "solve", *args, "-i", str(maze_file), "--json", "--seed",
                           str(SEED), "-q"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def expected(repository, maze_file) -> str:
    """Local `eqr solve` on the served export: the JSONL every remote solve must reproduce."""
    local = _solve([str(repository / "eqr" / "1" / "export"), "--threads", "1"], maze_file)
    assert local.returncode == 0, local.stderr
    return local.stdout


def _hey(url: str, body: Path, seconds: int, concurrency: int) -> subprocess.Popen:
    return subprocess.Popen(["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json",
                             "-D", str(body), url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _hey_counts(output: str) -> dict[str, int]:
    """hey's status code distribution ('[200] 812 responses') and its errors, as counts."""
    counts = {f"status {code}": int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", output)}
    errors = output.split("Error distribution:")[1] if "Error distribution:" in output else ""
    counts["errors"] = sum(int(n) for n in re.findall(r"\[(\d+)\]\s", errors))
    return counts


def _remote_solve(url: str, maze_file: Path, results: dict) -> None:
    results["solve"] = _solve(["--server", url, "--request-size", "2", "--in-flight", "8"], maze_file)


def _assert_same_answers(results: dict, expected: str) -> None:
    remote = results["solve"]
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == expected  # one record per puzzle, each as a local solve gives it


def _load(fleet: Balancer, mazes: np.ndarray, maze_file: Path, tmp_path: Path, seconds: int,
          scheme: str = "http") -> tuple[subprocess.Popen, threading.Thread, dict]:
    """hey on one maze plus `eqr solve --server` on 200 distinct ones, both through the balancer."""
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"puzzle": [TASK.format_tokens(mazes[0])], "seed": [SEED]}))
    hey = _hey(f"http://127.0.0.1:{fleet.http}/v2/models/eqr/generate", body, seconds, concurrency=8)
    results: dict = {}
    port = fleet.http if scheme == "http" else fleet.grpc
    client = threading.Thread(target=_remote_solve, args=(f"{scheme}://127.0.0.1:{port}", maze_file, results))
    client.start()
    return hey, client, results


def test_a_replica_killed_mid_load_loses_no_request_and_is_marked_down_quickly(fleet, mazes, maze_file, expected,
                                                                               tmp_path):
    hey, client, results = _load(fleet, mazes, maze_file, tmp_path, seconds=8)
    time.sleep(2.0)
    victim = fleet.replicas[0]
    os.kill(victim.triton_pid, signal.SIGKILL)
    down_after = fleet.wait_status({"replica1": "DOWN"}, timeout=10)
    client.join(timeout=120)
    output = hey.communicate(timeout=60)[0]
    counts = _hey_counts(output)
    print(f"fleet: replica1 SIGKILLed mid-load, marked DOWN after {down_after:.2f} s; hey: {counts}")
    assert down_after <= MARKED_DOWN_S
    assert counts["errors"] == 0 and set(counts) == {"status 200", "errors"} and counts["status 200"] > 0, output
    _assert_same_answers(results, expected)
    assert fleet.status()["replica2"] == "UP"


def test_a_draining_replica_stops_being_ready_before_it_stops_answering(fleet, mazes, maze_file, expected, tmp_path):
    """A streaming request in flight on the replica when SIGTERM comes: its provisional answers keep
    arriving after the replica reads not ready (every outer step: --stream-every 1), then its final."""
    draining = fleet.replicas[1]
    events: list[tuple[float, dict]] = []
    body = {"tokens": mazes[:16], "seed": [SEED], "breadth": [4], "stream": [True]}

    def hold() -> None:
        for event in generate_stream(f"127.0.0.1:{draining.http}", "eqr", body, timeout=120):
            events.append((time.monotonic(), event))

    holder = threading.Thread(target=hold)
    hey, client, results = _load(fleet, mazes, maze_file, tmp_path, seconds=8, scheme="grpc")
    holder.start()
    while not events and holder.is_alive():
        time.sleep(0.005)
    draining.process.send_signal(signal.SIGTERM)  # as Kubernetes or systemd stop it
    sent = time.monotonic()
    while draining.ready() and time.monotonic() - sent < 5:
        time.sleep(0.01)
    not_ready_at = time.monotonic()
    down_after = fleet.wait_status({"replica2": "DOWN"}, timeout=10)
    holder.join(timeout=120)
    client.join(timeout=120)
    counts = _hey_counts(hey.communicate(timeout=60)[0])
    answered_after = sum(at > not_ready_at for at, _ in events)
    print(f"fleet: replica2 SIGTERMed: not ready after {not_ready_at - sent:.2f} s, DOWN after {down_after:.2f} s, "
          f"{answered_after} streamed answers after it read not ready; hey: {counts}")
    assert not_ready_at - sent < 1.0
    assert answered_after >= 1 and events[-1][1]["converged"] == [True] * 16  # it kept answering, then finished
    with Solver.load(fleet.replicas[0].repository / "eqr" / "1" / "export", backend="onnxruntime", threads=1) as solver:
        want = solver.solve(mazes[:16], seed=SEED, breadth=4)
    assert events[-1][1]["answer"] == [TASK.format_tokens(row) for row in want.preds]
    assert counts["errors"] == 0 and set(counts) == {"status 200", "errors"}, counts
    _assert_same_answers(results, expected)
    assert draining.process.wait(timeout=60) == 130  # eqr serve: stopped by the signal, cleanly
