"""Against a real tritonserver (the serve extra): a repository generated from the bundled sudoku
model, free loopback ports, and every server stopped by its pid (process group) even on failure."""
from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from eqr.contract.errors import EqRError
from eqr.runtime import Solver
from eqr.serving.client import ServerError, StreamClient, decoded, generate, generate_stream
from eqr.serving.repository import ServeConfig, write_repository
from eqr.serving.server import Ports, TritonServer, find_tritonserver, free_ports
from eqr.tasks import get_task

TASK = get_task("sudoku", 4)
SEED = 3


def _tritonserver_or_skip() -> None:
    try:
        find_tritonserver()
    except EqRError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "export"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "eqr", "export", "sudoku-small", "--out", str(out)], check=True, env=env,
                   capture_output=True)
    return out


def start_server(repository: Path, tmp: Path, exit_timeout: int = 20) -> TritonServer:
    ports = Ports(*free_ports(3))
    server = TritonServer(repository, "127.0.0.1", ports, log_file=tmp / "tritonserver.log", exit_timeout=exit_timeout)
    server.start()
    try:
        server.wait_ready("eqr", timeout=180)
    except BaseException:
        server.stop(grace=5)
        raise
    return server


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    _tritonserver_or_skip()
    tmp = tmp_path_factory.mktemp("repo")
    write_repository(export_dir, tmp / "models", ServeConfig(batch=64, max_steps=64, stream_every=2, threads=1))
    server = start_server(tmp / "models", tmp)
    try:
        yield server
    finally:
        pid = server.pid
        server.stop(grace=30)
        assert pid is not None and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def puzzles() -> list[str]:
    return [TASK.format_tokens(t) for t in TASK.generate(6, seed=11).inputs]


@pytest.fixture(scope="module")
def expected(export_dir, puzzles):
    with Solver.load(export_dir, backend="onnxruntime", threads=1) as solver:
        tokens = np.stack([TASK.parse_line(p) for p in puzzles]).astype(np.int32)
        return solver.solve(tokens, max_steps=64, seed=SEED)


def test_http_generate_and_grpc_stream_answer_like_solver_solve(server, puzzles, expected):
    answers = [TASK.format_tokens(row) for row in expected.preds]
    http = generate(server.http_url, "eqr", {"puzzle": puzzles, "seed": [SEED]})
    assert http["answer"] == answers and http["steps"] == expected.steps.tolist()
    assert http["converged"] == expected.converged.tolist() and http["error"] == [""] * len(puzzles)
    assert http["valid"] == TASK.is_valid(np.stack([TASK.parse_line(p) for p in puzzles]), expected.preds).tolist()
    with StreamClient(server.grpc_url, "eqr") as client:
        responses = client.solve(puzzles, seed=SEED, stream=True)
    final = decoded(responses[-1])
    assert final["answer"] == answers and final["converged"] == expected.converged.tolist()
    np.testing.assert_array_equal(responses[-1]["preds"], expected.preds)
    provisional = responses[:-1]
    assert len(provisional) >= 2  # anytime answers before the attractor settled (every 2 steps)
    assert all(not p["converged"].any() for p in provisional)
    assert [int(p["steps"].max()) for p in provisional] == sorted(int(p["steps"].max()) for p in provisional)


def test_http_generate_stream_sends_provisional_answers_then_the_final_one(server, puzzles):
    events = list(generate_stream(server.http_url, "eqr", {"puzzle": puzzles[:2], "seed": [SEED], "stream": [True]}))
    assert len(events) >= 3 and events[-1]["converged"] == [True, True]
    assert all(e["converged"] == [False, False] for e in events[:-1])


def test_bad_puzzles_get_their_own_error_and_the_others_are_answered(server, puzzles, expected):
    before = _metrics(server)
    body = {"puzzle": [puzzles[0], "not a sudoku", puzzles[1], "1234" * 4 + "9"], "seed": [SEED]}
    out = generate(server.http_url, "eqr", body)
    assert out["answer"][0] == TASK.format_tokens(expected.preds[0])
    assert out["answer"][1] == "" and "puzzle 1" in out["error"][1]
    with Solver.load(server.repository / "eqr" / "1" / "export", backend="onnxruntime", threads=1) as solver:
        alone = solver.solve(np.stack([TASK.parse_line(p) for p in (puzzles[0], puzzles[0], puzzles[1])]),
                             max_steps=64, seed=SEED)
    assert out["answer"][2] == TASK.format_tokens(alone.preds[2]) and out["error"][2] == ""  # seeded as puzzle 2
    assert "puzzle 3" in out["error"][3] and out["answer"][3] == ""
    tokens = np.stack([TASK.parse_line(puzzles[0]), np.full(16, 9)])  # token id 9 is outside the vocab
    with StreamClient(server.grpc_url, "eqr") as client:
        out = decoded(client.solve(tokens=tokens, seed=SEED)[-1])
    assert out["error"][0] == "" and "token ids" in out["error"][1]
    after = _metrics(server)
    assert after["eqr_puzzles_rejected:text"] - before["eqr_puzzles_rejected:text"] == 2
    assert after["eqr_puzzles_rejected:tokens"] - before["eqr_puzzles_rejected:tokens"] == 1


def test_malformed_requests_get_an_error_response_and_the_server_keeps_serving(server, puzzles):
    before = _metrics(server)
    for body, why in (({"seed": [1]}, "exactly one of"), ({"puzzle": puzzles[:1], "breadth": [0]}, "breadth")):
        with pytest.raises(ServerError, match=why):
            generate(server.http_url, "eqr", body)
    import tritonclient.grpc as grpcclient

    wrong_dtype = grpcclient.InferInput("tokens", [1, 16], "FP32")  # config.pbtxt says INT32
    wrong_dtype.set_data_from_numpy(np.ones((1, 16), np.float32))
    with StreamClient(server.grpc_url, "eqr") as client:
        with pytest.raises(ServerError, match="(?i)data.?type|FP32"):
            list(client.receive(client.send_inputs([wrong_dtype])))
        with pytest.raises(ServerError, match="max_steps"):
            client.solve(puzzles[:1], max_steps=10_000)
        with pytest.raises(ServerError, match="exactly one of"):
            client.solve(puzzles[:1], tokens=np.ones((1, 16), np.int32))
        with pytest.raises(ServerError):  # wrong L: refused by Triton (dims [-1, 16])
            client.solve(tokens=np.ones((1, 5), np.int32))
        assert decoded(client.solve(puzzles[:1])[-1])["error"] == [""]  # the same stream still works
    assert server.model_ready("eqr")
    after = _metrics(server)  # what reached the model is counted by reason (Triton refuses bad dtypes/shapes itself)
    assert {r: after[f"eqr_requests_rejected:{r}"] - before[f"eqr_requests_rejected:{r}"]
            for r in ("inputs", "value", "busy")} == {"inputs": 2, "value": 2, "busy": 0}


def test_several_puzzles_as_tokens_over_http_generate(server, puzzles, expected):
    tokens = np.stack([TASK.parse_line(p) for p in puzzles]).astype(np.int32)
    flat = generate(server.http_url, "eqr", {"tokens": tokens, "seed": [SEED]})  # the client sends [P, L] flat
    assert flat["answer"] == [TASK.format_tokens(row) for row in expected.preds]
    assert np.array_equal(np.reshape(flat["preds"], tokens.shape), expected.preds)
    with pytest.raises(ServerError, match="convert input 'tokens'"):  # nested lists: refused by Triton itself
        _post_json(server, {"tokens": tokens.tolist()})


def _post_json(server: TritonServer, body: dict) -> None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{server.http_url}/v2/models/eqr/generate", data=json.dumps(body).encode())
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as e:
        raise ServerError(json.loads(e.read())["error"], e.code) from None


def test_64_concurrent_clients_times_8_requests_each_answered_exactly_once(server, puzzles):
    def client(c: int) -> list:
        with StreamClient(server.grpc_url, "eqr", timeout=120) as stream:
            ids = [stream.send([puzzles[(c + r) % len(puzzles)]], seed=c * 8 + r) for r in range(8)]  # all in flight
            got = [(rid, list(stream.receive(rid))) for rid in ids]
            time.sleep(0.2)  # a duplicate response would land in strays meanwhile
            return got + [("stray", s) for s in stream.strays]

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(client, range(64)))
    assert all(len(r) == 8 for r in results)  # no strays: nothing answered twice
    for got in results:
        for _, responses in got:
            assert len(responses) == 1 and decoded(responses[0])["error"] == [""]
    metrics = _metrics(server)
    assert metrics["eqr_puzzles_answered"] >= 512 and metrics["eqr_outer_steps"] >= 512
    assert metrics["eqr_ready"] == 1 and metrics["eqr_puzzles_failed"] == 0 and 0 < metrics["eqr_converged_fraction"] <= 1


def _metrics(server: TritonServer) -> dict[str, float]:
    """eqr's custom series on Triton's /metrics (Prometheus text), by name; a series with a reason
    label as 'name:reason'."""
    import urllib.request

    with urllib.request.urlopen(f"http://{server.address}:{server.ports.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    series = {}
    for line in text.splitlines():
        if line.startswith("eqr_"):
            reason = re.search(r'reason="([^"]+)"', line)
            series[line.split("{")[0] + (f":{reason.group(1)}" if reason else "")] = float(line.rsplit(" ", 1)[1])
    return series


def test_a_client_that_disconnects_mid_stream_does_not_disturb_the_others(server, puzzles):
    connection = http.client.HTTPConnection(server.address, server.ports.http, timeout=60)
    many = (puzzles * 100)[:400]
    connection.request("POST", "/v2/models/eqr/generate_stream",
                       json.dumps({"puzzle": many, "stream": [True], "breadth": [2]}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.readline().startswith(b"data:")  # the first provisional answer arrived ...
    connection.close()  # ... and the client hangs up
    out = generate(server.http_url, "eqr", {"puzzle": puzzles[:2], "seed": [SEED]})
    assert out["error"] == ["", ""] and all(out["answer"])
    assert server.model_ready("eqr")


def test_stopping_the_server_answers_or_fails_every_request_in_flight(export_dir, tmp_path):
    _tritonserver_or_skip()
    write_repository(export_dir, tmp_path / "models", ServeConfig(batch=8, threads=1))
    server = start_server(tmp_path / "models", tmp_path, exit_timeout=3)  # then model.py cancels what is left
    outcomes: list[str] = []
    lines = [TASK.format_tokens(t) for t in TASK.generate(64, seed=5).inputs]

    def request(i: int) -> None:
        try:
            out = generate(server.http_url, "eqr", {"puzzle": lines, "breadth": [8], "seed": [i]}, timeout=60)
            outcomes.append("answered" if all(out["answer"]) else "partial")
        except (ServerError, OSError) as e:
            outcomes.append(f"error: {e}")

    threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)  # requests are in the working batch / queue now
        started = time.monotonic()
        code = server.stop(grace=30)
        elapsed = time.monotonic() - started
    finally:
        server.stop(grace=5)
        for t in threads:
            t.join(timeout=60)
    assert elapsed < 30 and code is not None
    assert len(outcomes) == 8 and "partial" not in outcomes  # none hung, none half-answered


FAULT = '''

# --- injected by tests/test_serving.py: the backend's step raises while FLAG exists
import os as _os
from eqr.runtime.backends.ort_backend import OrtBackend as _Ort

_step = _Ort.step_impl


def _faulty(self, feeds, _flag={flag!r}):
    if _os.path.exists(_flag):
        raise RuntimeError("injected device fault")
    return _step(self, feeds)


_Ort.step_impl = _faulty
'''


def test_backend_faults_fail_only_their_requests_and_repeated_ones_make_the_model_not_ready(export_dir, tmp_path):
    _tritonserver_or_skip()
    flag = tmp_path / "fault"
    model = write_repository(export_dir, tmp_path / "models", ServeConfig(batch=8, threads=1))
    with open(model / "1" / "model.py", "a") as f:
        f.write(FAULT.format(flag=str(flag)))
    server = start_server(tmp_path / "models", tmp_path)
    try:
        line = TASK.format_tokens(TASK.generate(1, seed=2).inputs[0])
        # (HTTP generate gives a one-element output as a bare value, not a list)
        assert generate(server.http_url, "eqr", {"puzzle": [line]})["error"] == ""
        flag.touch()  # every step fails from now on: the first request fails, the server lives on
        failed = generate(server.http_url, "eqr", {"puzzle": [line]})
        assert "injected device fault" in failed["error"] and failed["answer"] == ""
        outcomes = [generate(server.http_url, "eqr", {"puzzle": [line]}) for _ in range(2)]  # 3 failed steps in a row
        assert all("injected device fault" in o["error"] for o in outcomes)
        deadline = time.monotonic() + 30
        while server.model_ready("eqr") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not server.model_ready("eqr")  # a load balancer stops sending it work
        with pytest.raises(ServerError):
            generate(server.http_url, "eqr", {"puzzle": [line]})
    finally:
        server.stop(grace=10)


def test_eqr_serve_prints_a_working_curl_line_and_stops_on_ctrl_c(export_dir, tmp_path):
    _tritonserver_or_skip()
    import re
    import signal

    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "eqr", "serve", str(export_dir), "--out", str(tmp_path / "models"), "--threads", "1",
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        printed = ""
        deadline = time.monotonic() + 180
        while "Ctrl-C" not in printed and time.monotonic() < deadline and process.poll() is None:
            printed += process.stdout.readline()
        body = re.search(r"-d '(.*)'", printed).group(1)  # the printed curl line, run as printed
        assert f"127.0.0.1:{http}/v2/models/eqr/generate" in printed
        assert generate(f"127.0.0.1:{http}", "eqr", json.loads(body))["error"] == ""
        servers = subprocess.run(["pgrep", "-P", str(process.pid), "-x", "tritonserver"], capture_output=True,
                                 text=True).stdout.split()
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=40) == 130 and time.monotonic() - started < 30
        assert servers and not any(_alive(int(pid)) for pid in servers)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_broken_grpc_stream_fails_every_request_on_it_and_the_next_try_opens_a_new_one() -> None:
    """An error without a request id (the stream itself ended, as a draining replica's RST_STREAM)
    reaches every request in flight on that stream, so none waits for an answer that cannot come;
    sending on the ended stream afterwards is a retryable error, not a failed solve."""
    import queue

    InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException  # the serve extra

    from eqr.serving.remote import _retryable

    client = StreamClient.__new__(StreamClient)  # no server: only the response routing is exercised
    client.responses, client.strays = {"1": queue.Queue(), "2": queue.Queue()}, []
    ended = InferenceServerException("Stream removed", status="StatusCode.UNAVAILABLE")
    client._on_response(None, ended)
    assert [client.responses[r].get_nowait() for r in ("1", "2")] == [(None, ended), (None, ended)]
    sent_late = InferenceServerException("The stream is no longer in valid state, the error detail is reported "
                                         "through provided callback.")
    assert _retryable(sent_late) and _retryable(ended)
    assert not _retryable(InferenceServerException("unknown model 'eqr2'", status="StatusCode.NOT_FOUND"))
