"""TensorRT engine files as export writes and the runtime reads them: the sidecar check, the
GPU's identity, and the process's one `trt.Logger` (the file names are `eqr.contract.artifact.engine_file`).

Bottom floor (export and runtime both read it): imports neither torch nor TensorRT at import
time. Engines are tied to the TensorRT version and the GPU: the file name says both, and a
sidecar `<engine>.json` (no header inside the plan, so trtexec and C++ loaders read it as is)
lets `check_engine` refuse a mismatched engine before TensorRT does. The GPU is queried through
the CUDA driver (libcuda) with ctypes, so neither torch nor a CUDA Python package is needed.

Jetson modules share one name per generation ("Orin" is an AGX Orin, an Orin NX and an Orin
Nano alike, all SM 8.7) but not their SM counts, and an engine tuned for 16 SMs is not the one
for 4: on integrated GPUs the tag carries the SM count too (docs/jetson.md).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from eqr.contract.errors import EqRError
from eqr.contract.io import sha256_file

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "eqr-engine"
SIDECAR_VERSION = 2  # 2: gpu sm_count / integrated, dla_core
INSTALL_HINT = ("pip install 'eqr[tensorrt]' on a CUDA machine (on Jetson, JetPack's tensorrt in a venv made with "
                "--system-site-packages: docs/jetson.md)")
# CUdevice_attribute values (cuda.h)
_MULTIPROCESSOR_COUNT, _INTEGRATED, _CC_MAJOR, _CC_MINOR = 16, 18, 75, 76


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3", "Orin"
    compute_capability: str  # e.g. "9.0"
    sm_count: int = 0  # streaming multiprocessors (0: unknown)
    integrated: bool = False  # Jetson / DRIVE: the GPU shares the SoC's memory

    @property
    def tag(self) -> str:
        return gpu_tag(self.name, self.compute_capability, self.sm_count if self.integrated else 0)


def gpu_tag(name: str, compute_capability: str, sm_count: int = 0) -> str:
    """'NVIDIA H100 80GB HBM3', '9.0' -> 'h100-80gb-hbm3-sm90'; 'Orin', '8.7', 8 -> 'orin-8sm-sm87'."""
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    words = re.sub(r"^(nvidia-)?(geforce-)?", "", words) or "gpu"
    sms = f"-{sm_count}sm" if sm_count else ""
    return f"{words}{sms}-sm{compute_capability.replace('.', '')}"


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    return Path(f"{engine_path}.json")


def cuda_gpu(device: int = 0) -> GpuInfo | None:
    """CUDA device `device` through the driver API, or None without a driver or that device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, handle = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or not 0 <= device < count.value:
        return None
    if cuda.cuDeviceGet(ctypes.byref(handle), device) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, handle)

    def attribute(code: int) -> int:
        value = ctypes.c_int(0)
        cuda.cuDeviceGetAttribute(ctypes.byref(value), code, handle)
        return value.value

    return GpuInfo(name.value.decode(errors="replace"), f"{attribute(_CC_MAJOR)}.{attribute(_CC_MINOR)}",
                   attribute(_MULTIPROCESSOR_COUNT), bool(attribute(_INTEGRATED)))


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except Exception:  # ImportError, or a broken install missing its libraries
        return None
    return str(tensorrt.__version__)


_LOGGER: Any = None
TRT_LOG = logging.getLogger("eqr.tensorrt")  # TensorRT's own messages on an edge runtime without Polygraphy


def trt_logger() -> Any:
    """The process's one TensorRT logger (TensorRT keeps the first logger a builder or runtime is
    given and warns about every other one). Builds go through Polygraphy's loaders, which log to
    Polygraphy's global logger: where Polygraphy is installed that logger is the one, sent to
    Python logging by `polygraphy_logging`; on an edge runtime without Polygraphy it is an
    `ILogger` that forwards to the `eqr.tensorrt` Python logger. Either way no TensorRT message
    reaches stdout, which is for results (`--json`)."""
    global _LOGGER
    if _LOGGER is None:
        try:
            from polygraphy.backend.trt import get_trt_logger
        except ImportError:
            _LOGGER = _logging_trt_logger()
        else:
            polygraphy_logging()
            _LOGGER = get_trt_logger()
    return _LOGGER


def _logging_trt_logger() -> Any:
    import tensorrt as trt

    levels = {trt.Logger.INTERNAL_ERROR: logging.ERROR, trt.Logger.ERROR: logging.ERROR,
              trt.Logger.WARNING: logging.WARNING, trt.Logger.INFO: logging.DEBUG, trt.Logger.VERBOSE: logging.DEBUG}

    class LoggingTrtLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # the binding's trampoline needs it

        def log(self, severity: Any, msg: str) -> None:  # called by TensorRT, which it must not raise into
            TRT_LOG.log(levels.get(severity, logging.DEBUG), "%s", msg)

    return LoggingTrtLogger()


def polygraphy_logging() -> Any:
    """Polygraphy's global logger, made to emit through Python logging (the "Polygraphy" logger,
    stderr) instead of print() on stdout, without colors (nor the notice that `colored` is
    missing, itself printed on stdout). Polygraphy releases without that switch keep printing;
    `quiet_polygraphy` keeps their stdout clean while they run."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False
    if hasattr(G_LOGGER, "use_python_logging_system"):
        G_LOGGER.use_python_logging_system = True
    return G_LOGGER


@contextlib.contextmanager
def quiet_polygraphy() -> Iterator[None]:
    """Polygraphy at errors only, and anything it still prints sent to stderr, while it runs a
    pass or a build (it logs every pass)."""
    logger = polygraphy_logging()
    with logger.verbosity(logger.ERROR), contextlib.redirect_stdout(sys.stderr):
        yield


def read_sidecar(engine_path: str | os.PathLike[str]) -> dict[str, Any]:
    engine = Path(engine_path)
    meta_path = sidecar_path(engine)
    if not engine.is_file():
        raise EqRError(f"{engine}: no such engine file; {rebuild_hint(engine)}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise EqRError(f"{engine}: missing or unreadable sidecar {meta_path.name}; {rebuild_hint(engine)}") from None
    if meta.get("format") != SIDECAR_FORMAT:
        raise EqRError(f"{meta_path}: not an eqr engine sidecar; {rebuild_hint(engine)}")
    return meta


def rebuild_hint(engine: Path, precision: str | None = None) -> str:
    return f"rebuild it on this machine: eqr engine {engine.parent} --precision {precision or '<p>'} --force"


def check_engine(engine_path: str | os.PathLike[str], trt_version: str | None = None,
                 gpu: GpuInfo | None = None, device: int = 0) -> dict[str, Any]:
    """Refuse (EqRError) an engine whose sidecar names another TensorRT version or GPU, or whose
    ONNX source changed since the build; returns the sidecar. Defaults: this machine's TensorRT
    and CUDA device `device`."""
    engine = Path(engine_path)
    meta = read_sidecar(engine)
    rebuild = rebuild_hint(engine, meta.get("precision"))
    trt_version = trt_version if trt_version is not None else tensorrt_version()
    gpu = gpu if gpu is not None else cuda_gpu(device)
    if trt_version is not None and meta.get("tensorrt") != trt_version:
        raise EqRError(f"{engine}: built with TensorRT {meta.get('tensorrt')}, this machine has {trt_version}; {rebuild}")
    built_on = (meta.get("gpu") or {}).get("tag")
    if gpu is not None and built_on != gpu.tag:
        raise EqRError(f"{engine}: built for GPU {built_on}, CUDA device {device} is {gpu.tag}; {rebuild}")
    source = engine.parent / str(meta.get("onnx", ""))
    if source.is_file() and meta.get("onnx_sha256") and sha256_file(source) != meta["onnx_sha256"]:
        raise EqRError(f"{engine}: {source.name} changed since the engine was built; {rebuild}")
    return meta
