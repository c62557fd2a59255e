"""Clients of a served eqr model (docs/serving.md): HTTP generate / generate_stream and gRPC streaming.

    answer = generate("127.0.0.1:8000", "eqr", {"puzzle": [line], "seed": [3]})
    for partial in generate_stream("127.0.0.1:8000", "eqr", {"puzzle": [line], "stream": [True]}): ...
    with StreamClient("127.0.0.1:8001", "eqr") as client:
        responses = client.solve(puzzles=[line], seed=3, stream=True)   # provisional ..., final

HTTP bodies are JSON objects mapping input names to lists; responses map output names to lists.
gRPC responses come back as numpy arrays keyed by output name.
"""
from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np

from eqr.contract.errors import EqRError
from eqr.serving.protocol import INPUTS, OUTPUTS


class ServerError(EqRError):
    """Triton answered a request with an error (HTTP 400, or a gRPC stream error); status: the HTTP one."""

    exit_code = 1

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def generate(url: str, model: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """POST /v2/models/MODEL/generate: exactly one response (the request must not stream).

    `tokens` may be [P, L]: it is sent flat, as Triton's generate endpoint takes only flat lists
    (it reshapes them to the model's [-1, L]).
    """
    with _post(url, model, "generate", _flat_tokens(body), timeout) as response:
        return json.loads(response.read())


def _flat_tokens(body: dict[str, Any]) -> dict[str, Any]:
    if "tokens" not in body:
        return body
    return body | {"tokens": np.asarray(body["tokens"]).reshape(-1).tolist()}


def generate_stream(url: str, model: str, body: dict[str, Any], timeout: float = 60.0) -> Iterator[dict[str, Any]]:
    """POST /v2/models/MODEL/generate_stream: one dict per server-sent event, the final one last."""
    with _post(url, model, "generate_stream", _flat_tokens(body), timeout) as response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if isinstance(event.get("error"), str):  # Triton's error event (our `error` output is a list)
                    raise ServerError(event["error"])
                yield event


def _post(url: str, model: str, route: str, body: dict[str, Any], timeout: float) -> Any:
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise ServerError(_error_text(e), e.code) from None


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read()).get("error", str(error))
    except ValueError:
        return str(error)


class StreamClient:
    """One gRPC bidirectional stream; `solve` sends a request and collects its responses in order."""

    def __init__(self, url: str, model: str, timeout: float = 60.0) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc, self.model, self.timeout = grpcclient, model, timeout
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: dict[str, queue.Queue] = {}
        self.strays: list[Any] = []  # responses for no waiting request (would be a duplicate answer)
        self.ids = iter(range(1 << 62))
        self.client.start_stream(callback=self._on_response)

    def _on_response(self, result: Any, error: Any) -> None:
        if error is not None:  # the request id rides on the error only in newer clients
            request_id = getattr(error, "request_id", None)
            # without one the stream itself broke: every request in flight on it gets the error
            for waiting in [self.responses[request_id]] if request_id in self.responses else list(self.responses.values()):
                waiting.put((None, error))
            return
        response = result.get_response()
        waiting = self.responses.get(response.id)
        if waiting is None:
            self.strays.append(result)
        else:
            waiting.put((result, None))

    def solve(self, puzzles: list[str] | None = None, tokens: np.ndarray | None = None, seed: int | None = None,
              breadth: int | None = None, max_steps: int | None = None, stream: bool = False,
              offset: int | None = None, noise: float | None = None) -> list[dict[str, np.ndarray]]:
        """Send one request; return its responses (provisional ones first, the final one last)."""
        request_id = self.send(puzzles, tokens, seed, breadth, max_steps, stream, offset, noise)
        return list(self.receive(request_id))

    def send(self, puzzles: list[str] | None = None, tokens: np.ndarray | None = None, seed: int | None = None,
             breadth: int | None = None, max_steps: int | None = None, stream: bool = False,
             offset: int | None = None, noise: float | None = None) -> str:
        values = {"puzzle": None if puzzles is None else np.array([p.encode() for p in puzzles], np.object_),
                  "tokens": None if tokens is None else np.asarray(tokens, np.int32),
                  "breadth": breadth, "max_steps": max_steps, "seed": seed, "offset": offset, "stream": stream or None,
                  "noise": noise}
        inputs = []
        for name, dtype, triton_type, _ in INPUTS:
            value = values[name]
            if value is None:
                continue
            array = value if isinstance(value, np.ndarray) else np.array([value], dtype)
            tensor = self.grpc.InferInput(name, list(array.shape), triton_type.removeprefix("TYPE_").replace("STRING", "BYTES"))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return self.send_inputs(inputs)

    def send_inputs(self, inputs: list[Any]) -> str:
        """Send ready `tritonclient.grpc.InferInput`s as one request -> its request id."""
        request_id = str(next(self.ids))
        self.responses[request_id] = queue.Queue()
        try:
            self.client.async_stream_infer(self.model, inputs, request_id=request_id, enable_empty_final_response=True)
        except Exception:
            self.responses.pop(request_id, None)  # never sent: nothing will answer it
            raise
        return request_id

    def receive(self, request_id: str) -> Iterator[dict[str, np.ndarray]]:
        """The responses of one sent request, until its final one; ServerError for an error response."""
        try:
            while True:
                result, error = self.responses[request_id].get(timeout=self.timeout)
                if error is not None:
                    raise _stream_error(error)
                final = result.get_response().parameters["triton_final_response"].bool_param
                arrays = {name: result.as_numpy(name) for name, *_ in OUTPUTS}
                if arrays["answer"] is not None:  # the empty final marker carries no outputs
                    yield arrays
                if final:
                    return
        finally:
            self.responses.pop(request_id, None)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()

    def __enter__(self) -> "StreamClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stream_error(error: Any) -> Exception:
    """A gRPC error -> ConnectionError when the stream itself broke (the server went away), else ServerError."""
    message = str(error.message() if hasattr(error, "message") else error)
    status = str(error.status() if callable(getattr(error, "status", None)) else "")
    if any(code in status for code in ("UNAVAILABLE", "CANCELLED")):
        return ConnectionError(f"{status}: {message}")
    return ServerError(message)


def decoded(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """gRPC arrays -> plain lists, strings decoded (the shape HTTP responses have)."""
    return {k: [x.decode() if isinstance(x, bytes) else x for x in v.tolist()] for k, v in arrays.items()}
