"""Solving on a server: `eqr solve --server URL` (docs/serving.md#solving-on-a-server).

`RemoteSolver` cuts the puzzles into requests of `request_size`, keeps `in_flight` of them on
the wire, and returns one answer per puzzle in input order, as `Solver.run` would: a request
carries the seed and its first puzzle's number (`offset`), so puzzle p starts from the states
(seed, p, k) wherever, and however often, it runs. That makes a request idempotent: a broken
connection, a "busy" or a shutting-down answer is retried with backoff, on the same server or,
behind a load balancer, another replica, and a retry cannot change an answer.
"""
from __future__ import annotations

import http.client
import json
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from eqr.contract.errors import EqRError
from eqr.serving.client import ServerError, StreamClient, generate
from eqr.serving.repository import TASK_PARAMETER
from eqr.runtime.solver import PER_PUZZLE
from eqr.tasks import Task, task_from_spec

SCHEMES = ("http", "grpc")
# the output that fills each SolveResult per-puzzle field (its `steps` is summed over trajectories)
FIELDS = {field: "total_steps" if field == "steps" else field for field in PER_PUZZLE}
# error responses that a later try (here or on another replica) can answer (eqr/serving/triton_model.py)
RETRY_MESSAGES = ("is busy", "is shutting down", "not ready", "the backend failed on this puzzle", "Server is stopping")
RETRY_STATUS = (502, 503, 504)  # a load balancer with no replica up, or one that timed out
# tritonclient's words for sending on a gRPC stream that an error ended: the next try opens a new one
STREAM_ENDED = "stream is no longer in valid state"


class Unreachable(EqRError):
    """Nothing answered after every retry."""


@dataclass(frozen=True)
class Endpoint:
    """Where the model is served: protocol and host:port."""

    scheme: str
    address: str

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        """'http://host:8000', 'grpc://host:8001' or 'host:port' (HTTP)."""
        scheme, sep, rest = url.partition("://")
        scheme, address = (scheme.lower(), rest) if sep else ("http", url)
        host, _, port = address.rstrip("/").rpartition(":")
        if scheme not in SCHEMES or not host or not port.isdigit():
            raise EqRError(f"--server {url!r}: give http://HOST:PORT (Triton's HTTP port, 8000) or grpc://HOST:PORT "
                           "(its gRPC port, 8001)")
        return cls(scheme, address.rstrip("/"))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}"


@dataclass(frozen=True)
class Retry:
    """Backoff for idempotent requests: `tries` in all, waits doubling from `first_wait` up to `max_wait`."""

    tries: int = 8
    first_wait: float = 0.1
    max_wait: float = 4.0

    def waits(self) -> list[float]:
        return [min(self.max_wait, self.first_wait * 2 ** n) * random.uniform(0.5, 1.0) for n in range(self.tries - 1)]


class RemoteSolver:
    """One served model, as a solver: `task`, then `solve(tokens, ...)` -> per-puzzle arrays."""

    def __init__(self, url: str, model: str = "eqr", in_flight: int = 8, request_size: int = 16,
                 timeout: float = 300.0, retry: Retry | None = None) -> None:
        self.endpoint, self.model = Endpoint.parse(url), model
        self.in_flight, self.request_size, self.timeout = in_flight, request_size, timeout
        self.retry = retry or Retry()
        self._local = threading.local()  # one gRPC stream per worker thread
        self._streams: list[StreamClient] = []
        self._lock = threading.Lock()
        self.backend: dict[str, Any] | None = None  # what ran the steps, from the first answer

    def task(self) -> Task:
        """The served puzzle task, from the model configuration `eqr triton` wrote."""
        config = self._with_retries(self._model_config, "reading the model configuration")
        spec = config.get("parameters", {}).get(TASK_PARAMETER, {}).get("string_value", "")
        if not spec:
            raise EqRError(f"{self.endpoint} model {self.model!r} does not say its task (not written by "
                           "`eqr triton`?); pass --task NAME[:SIZE]")
        return task_from_spec(spec)

    def solve(self, tokens: np.ndarray, seed: int = 0, breadth: int = 1, max_steps: int | None = None,
              progress: Callable[[int], None] | None = None, noise: float | None = None) -> dict[str, np.ndarray]:
        """Puzzles int [P, L] -> {field of FIELDS: array (P, ...)}; progress(n) per answered request
        gets its trajectories (puzzles x breadth). noise: path-noise sigma (None: the served model's)."""
        starts = range(0, len(tokens), self.request_size)

        def one(start: int) -> dict[str, np.ndarray]:
            chunk = tokens[start:start + self.request_size]
            inputs = {"tokens": chunk, "seed": seed, "offset": start, "breadth": breadth, "max_steps": max_steps,
                      "noise": noise}
            what = f"puzzles {start}..{start + len(chunk) - 1}"
            answer = self._with_retries(lambda: self._send(inputs, len(chunk)), what)
            if progress is not None:
                progress(len(chunk) * breadth)
            return answer

        try:
            with ThreadPoolExecutor(self.in_flight, thread_name_prefix="eqr-remote") as pool:
                parts = list(pool.map(one, starts))
        finally:
            self.close()
        return {field: np.concatenate([part[field] for part in parts]) for field in FIELDS}

    def close(self) -> None:
        with self._lock:
            streams, self._streams = self._streams, []
        for stream in streams:
            _close_quietly(stream)

    # ------------------------------------------------------------------ one request, with retries
    def _with_retries(self, call: Callable[[], Any], what: str) -> Any:
        last: BaseException | None = None
        started = time.monotonic()
        for wait in [*self.retry.waits(), None]:
            try:
                return call()
            except Exception as e:  # noqa: BLE001 - sorted into retryable or not just below
                if not _retryable(e):
                    raise ServerError(f"{self.endpoint} ({what}): {e}") from None
                last = e
                self._drop_stream()
            if wait is not None:
                time.sleep(wait)
        raise Unreachable(f"no answer from {self.endpoint} ({what}) after {self.retry.tries} tries over "
                          f"{time.monotonic() - started:.0f} s: {_describe(last)}; check that `eqr serve` (or the load "
                          f"balancer) runs there and serves model {self.model!r}")

    def _send(self, inputs: dict[str, Any], puzzles: int) -> dict[str, np.ndarray]:
        if self.endpoint.scheme == "http":
            scalars = {k: [float(v) if k == "noise" else int(v)] for k, v in inputs.items()
                       if k != "tokens" and v is not None}
            body = {"tokens": inputs["tokens"]} | scalars
            arrays = generate(self.endpoint.address, self.model, body, timeout=self.timeout)
        else:
            stream = self._stream()
            arrays = stream.solve(tokens=inputs["tokens"], seed=inputs["seed"], breadth=inputs["breadth"],
                                  max_steps=inputs["max_steps"], offset=inputs["offset"], noise=inputs["noise"])[-1]
        return self._answer(arrays, puzzles)

    def _answer(self, arrays: dict[str, Any], puzzles: int) -> dict[str, np.ndarray]:
        """A final response (HTTP JSON, where one-element outputs come back bare, or gRPC arrays) ->
        FIELDS arrays; ServerError for a failed puzzle."""
        errors = [e.decode() if isinstance(e, bytes) else e for e in np.atleast_1d(np.asarray(arrays["error"], object))]
        failed = [(p, e) for p, e in enumerate(errors) if e]
        if failed:  # a backend fault on its batch: retryable (the same seeds give the same answer)
            raise ServerError(f"puzzle {failed[0][0]}: {failed[0][1]}")
        if self.backend is None:
            backend = np.atleast_1d(np.asarray(arrays["backend"], object))[0]
            self.backend = json.loads(backend.decode() if isinstance(backend, bytes) else backend)
        answer = {field: np.atleast_1d(np.asarray(arrays[name])) for field, name in FIELDS.items()}
        answer["preds"] = answer["preds"].reshape(puzzles, -1)
        return answer

    def _model_config(self) -> dict[str, Any]:
        if self.endpoint.scheme == "http":
            url = f"http://{self.endpoint.address}/v2/models/{self.model}/config"
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                raise ServerError(f"HTTP {e.code}: {e.read().decode(errors='replace').strip()}", e.code) from None
        return self._stream().client.get_model_config(self.model, as_json=True)["config"]

    def _stream(self) -> StreamClient:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = StreamClient(self.endpoint.address, self.model, self.timeout)
            with self._lock:
                self._streams.append(stream)
        return stream

    def _drop_stream(self) -> None:
        """A broken gRPC stream is not reused: the next try opens a new one."""
        stream = getattr(self._local, "stream", None)
        if stream is not None:
            self._local.stream = None
            with self._lock:
                if stream in self._streams:
                    self._streams.remove(stream)
            _close_quietly(stream)


def _retryable(error: BaseException) -> bool:
    if isinstance(error, ServerError):
        return error.status in RETRY_STATUS or any(m in str(error) for m in RETRY_MESSAGES)
    if isinstance(error, (OSError, http.client.HTTPException, queue.Empty)):  # URLError, resets, timeouts
        return True
    return type(error).__name__ == "InferenceServerException" and (_grpc_transient(error) or STREAM_ENDED in str(error))


def _grpc_transient(error: Any) -> bool:
    status = str(error.status() if callable(getattr(error, "status", None)) else "")
    return any(code in status for code in ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED"))


def _describe(error: BaseException | None) -> str:
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}" if error is not None else "no try was made"


def _close_quietly(stream: StreamClient) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - a dead stream may fail to close; nothing is left to save
        pass
