"""Start and stop `tritonserver` on a model repository (docs/serving.md).

The binary is the one on PATH (NVIDIA's containers) or the `serve` extra's: nvidia-pytriton
ships Triton Inference Server with its Python backend and one backend stub per Python version.
For the latter, `TritonServer` assembles a backend directory holding the stub of the running
interpreter, puts the wheel's libraries on LD_LIBRARY_PATH and this environment's bin first on
PATH (so model.py imports numpy and eqr from here). The server runs in its own process group;
`stop` ends that group (SIGINT, then SIGKILL after the grace time) and always reaps it.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eqr.contract.errors import EqRError

MISSING = ("tritonserver not found: install the serve extra (pip install 'eqr[cpu,serve]') or run inside "
           "NVIDIA's Triton Inference Server container")
EXIT_TIMEOUT_S = 20  # Triton's own wait for in-flight requests at shutdown; then model.py cancels the rest


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclass(frozen=True)
class Install:
    """Where a tritonserver lives: its binary, the backend directory to pass, extra env."""

    binary: Path
    backends: Path | None  # None: the binary's default (/opt/tritonserver/backends in containers)
    lib_dir: Path | None  # nvidia-pytriton's bundled shared libraries


def find_tritonserver() -> Install:
    """The tritonserver on PATH, else the serve extra's; EqRError naming the extra when neither."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Install(Path(on_path), None, None)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise EqRError(MISSING)
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise EqRError(f"{binary} is missing; reinstall the serve extra (pip install --force-reinstall 'eqr[serve]')")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return Install(binary, root / "backends", libs if libs.is_dir() else None)


def free_ports(n: int = 3, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports on `host` (bound together, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class TritonServer:
    """One tritonserver process on `repository`; a context manager that always stops it."""

    def __init__(self, repository: str | os.PathLike[str], address: str = "127.0.0.1", ports: Ports = Ports(),
                 log_file: str | os.PathLike[str] | None = None, verbose: bool = False,
                 exit_timeout: int = EXIT_TIMEOUT_S) -> None:
        self.repository = Path(repository)
        self.address, self.ports, self.verbose, self.exit_timeout = address, ports, verbose, exit_timeout
        self.install = find_tritonserver()
        self.process: subprocess.Popen | None = None
        self._scratch: Path | None = None
        self.log_path = Path(log_file) if log_file else None

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.ports.grpc}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> "TritonServer":
        if not self.repository.is_dir():
            raise EqRError(f"{self.repository}: no such model repository; write one with `eqr triton EXPORT --out REPO`")
        self._scratch = Path(tempfile.mkdtemp(prefix="eqr-triton-"))
        if self.log_path is None:
            self.log_path = self._scratch / "tritonserver.log"
        command = [str(self.install.binary), "--model-repository", str(self.repository.resolve()),
                   "--http-address", self.address, "--grpc-address", self.address,
                   "--http-port", str(self.ports.http), "--grpc-port", str(self.ports.grpc),
                   "--metrics-port", str(self.ports.metrics), "--exit-timeout-secs", str(self.exit_timeout),
                   "--log-verbose", "1" if self.verbose else "0",
                   # explicit: a model may unload itself after repeated faults (model.py), so its
                   # /v2/models/NAME/ready turns false; every model of the repository loads at start
                   "--model-control-mode", "explicit", "--load-model", "*"]
        if self.install.backends is not None:
            command += ["--backend-directory", str(self._backend_dir())]
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self._env(), start_new_session=True,  # its own process group
                                            preexec_fn=_die_with_parent())
        finally:
            log.close()
        return self

    def _backend_dir(self) -> Path:
        """The wheel's backends with the running Python's stub beside libtriton_python.so."""
        source = self.install.backends
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = source.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise EqRError(f"the serve extra has no Python-backend stub for Python {version} ({stub}); "
                           "use a Python it ships a stub for (see python_backend_stubs/)")
        backends = self._scratch / "backends"
        python = backends / "python"
        python.mkdir(parents=True)
        for item in (source / "python").iterdir():
            if item.is_file():
                (python / item.name).symlink_to(item)
        shutil.copy2(stub, python / stub.name)
        return backends

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if self.install.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.install.lib_dir),
                                                                    env.get("LD_LIBRARY_PATH")]))
        return env

    def wait_ready(self, model: str, timeout: float = 120.0) -> None:
        """Block until /v2/models/MODEL/ready answers 200; EqRError (with the log's tail) otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EqRError(f"tritonserver exited with code {self.process.returncode} before {model} was ready; "
                               f"its log ends: {self.log_tail()}")
            if self.model_ready(model):
                return
            time.sleep(0.25)
        raise EqRError(f"{model} not ready after {timeout:.0f} s; tritonserver's log ends: {self.log_tail()}")

    def model_ready(self, model: str) -> bool:
        return _http_status(f"http://{self.http_url}/v2/models/{model}/ready") == 200

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except (OSError, AttributeError):
            return "(no log)"
        return " | ".join(text[-lines:])

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGINT the process group (Triton finishes in-flight work), SIGKILL after `grace` s; reap it."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            code = _stop_group(process, grace)
        if self._scratch is not None:  # the backend directory (and the log, unless given a log_file)
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _die_with_parent() -> Any:
    """Linux: SIGINT the server when the thread that started it dies, even by SIGKILL (no orphans).

    The kernel ties this to the starting *thread*, so it is set only when starting from the main thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return lambda: libc.prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def _stop_group(process: subprocess.Popen, grace: float) -> int:
    _signal_group(process.pid, signal.SIGINT)
    try:
        code = process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        code = process.wait()
    _signal_group(process.pid, signal.SIGKILL)  # stragglers of the group (stub processes)
    return code


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None
