"""TensorRT engines from the step graphs: strongly typed builds, named and checked by a sidecar.

Precision lives in the ONNX graph (FP16 casts, INT8 Q/DQ), so the build is strongly typed on
TensorRT 10 (the STRONGLY_TYPED network flag) and 11 (always strongly typed; the flag is a
deprecated no-op there); FP16/INT8 builder flags are used only on TensorRT 8, which has no
strong typing. Engines are tied to the TensorRT version and the GPU: the file name says both,
and a sidecar `<engine>.json` (no header inside the plan, so trtexec and C++ loaders read it
as is) lets `check_engine` refuse a mismatched engine before TensorRT does.

`tensorrt` is imported only inside functions; the GPU is queried through the CUDA driver
(libcuda), so no CUDA Python package is needed.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eqr.artifact import engine_file
from eqr.errors import EqRError
from eqr.io import atomic_write_bytes, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "eqr-engine"
SIDECAR_VERSION = 1
INSTALL_HINT = "pip install 'eqr[tensorrt]' on a CUDA machine (JetPack ships it on Jetson)"


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # e.g. "9.0"

    @property
    def tag(self) -> str:
        return gpu_tag(self.name, self.compute_capability)


def gpu_tag(name: str, compute_capability: str) -> str:
    """'NVIDIA H100 80GB HBM3', '9.0' -> 'h100-80gb-hbm3-sm90' (safe in file names)."""
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    words = re.sub(r"^(nvidia-)?(geforce-)?", "", words) or "gpu"
    return f"{words}-sm{compute_capability.replace('.', '')}"


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    return Path(f"{engine_path}.json")


def cuda_gpu() -> GpuInfo | None:
    """Device 0 through the CUDA driver API, or None without a driver or device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, device = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    if cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDeviceGetName(name, 256, device)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # ..._MINOR
    return GpuInfo(name.value.decode(errors="replace"), f"{major.value}.{minor.value}")


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except Exception:  # ImportError, or a broken install missing its libraries
        return None
    return str(tensorrt.__version__)


def engine_support() -> tuple[GpuInfo | None, str | None, str]:
    """(gpu, tensorrt version, why not): both set and an empty reason when engines can be built."""
    version = tensorrt_version()
    gpu = cuda_gpu()
    if version is None:
        return gpu, None, f"tensorrt is not installed ({INSTALL_HINT})"
    if gpu is None:
        return None, version, f"no CUDA device found (tensorrt {version} is installed)"
    return gpu, version, ""


def timing_cache_path(tag: str, trt_version: str) -> Path:
    """One timing cache per GPU and TensorRT version, shared by every build on this machine."""
    root = os.environ.get("EQR_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eqr"
    return Path(root) / "tensorrt" / f"timing.{tag}.trt{trt_version}.cache"


@dataclass(frozen=True)
class EngineProfile:
    """The one optimization profile: batch range, fixed L and D."""

    batch: tuple[int, int, int]
    seq_len: int
    hidden: int

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        tails = {"tokens": (self.seq_len,), "z_H": (self.seq_len, self.hidden), "z_L": (self.seq_len, self.hidden)}
        return {name: tuple((b, *tail) for b in self.batch) for name, tail in tails.items()}  # type: ignore[misc]


def network_flags(trt) -> int:
    """STRONGLY_TYPED where the enum has it (TRT 9.1+; a no-op kept for compatibility on 11);
    EXPLICIT_BATCH on TRT 8; nothing once both are gone (strong typing is then the default)."""
    flags = trt.NetworkDefinitionCreationFlag
    for name in ("STRONGLY_TYPED", "EXPLICIT_BATCH"):
        if hasattr(flags, name):
            return 1 << int(getattr(flags, name))
    return 0


class EngineFromOnnx:
    """Loader: ONNX bytes -> serialized strongly typed TensorRT plan (bytes), timing cache reused."""

    def __init__(self, onnx_bytes: bytes, precision: str, profile: EngineProfile, workspace_mib: int,
                 cache_path: Path | None) -> None:
        self.onnx_bytes = onnx_bytes
        self.precision = precision
        self.profile = profile
        self.workspace_mib = workspace_mib
        self.cache_path = cache_path

    def __call__(self) -> bytes:
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        strongly_typed = int(trt.__version__.split(".")[0]) >= 9
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(self.onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse the {self.precision} graph: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mib << 20)
        if self.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            # TF32 matmuls round to 10 mantissa bits: the FP32 residual floor (and tol) would be FP16's.
            config.clear_flag(trt.BuilderFlag.TF32)
        if not strongly_typed:  # TensorRT 8: no strong typing, precision by builder flags
            if self.precision in ("fp16", "int8"):
                config.set_flag(trt.BuilderFlag.FP16)
            if self.precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in self.profile.shapes().items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        cached = self.cache_path.read_bytes() if self.cache_path and self.cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build the {self.precision} engine (see the log above)")
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.cache_path, bytes(config.get_timing_cache().serialize()))
        return bytes(plan)


def sidecar(precision: str, gpu: GpuInfo, trt_version: str, onnx_name: str, onnx_sha256: str,
            profile: EngineProfile, workspace_mib: int) -> dict[str, Any]:
    return {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "precision": precision,
        "tensorrt": trt_version, "gpu": asdict(gpu) | {"tag": gpu.tag},
        "onnx": onnx_name, "onnx_sha256": onnx_sha256,
        "batch": dict(zip(("min", "opt", "max"), profile.batch)), "workspace_mib": workspace_mib,
        "strongly_typed": trt_version.split(".")[0] not in ("8",), "tf32": precision != "fp32",
    }


def build_engine(onnx_path: Path, out_dir: Path, precision: str, gpu: GpuInfo, trt_version: str,
                 profile: EngineProfile, workspace_mib: int) -> dict[str, Any]:
    """Build, write the engine and its sidecar (atomically) -> the manifest's engine entry."""
    name = engine_file(precision, gpu.tag, trt_version)
    plan = EngineFromOnnx(onnx_path.read_bytes(), precision, profile, workspace_mib,
                          timing_cache_path(gpu.tag, trt_version))()
    meta = sidecar(precision, gpu, trt_version, onnx_path.name, sha256_file(onnx_path), profile, workspace_mib)
    atomic_write_bytes(out_dir / name, plan)
    atomic_write_text(sidecar_path(out_dir / name), json.dumps(meta, indent=2) + "\n")
    return {"engine": name, "precision": precision, "sidecar": sidecar_path(name).name, "tensorrt": trt_version,
            "gpu": gpu.tag}


def check_engine(engine_path: str | os.PathLike[str], trt_version: str | None = None,
                 gpu: GpuInfo | None = None) -> dict[str, Any]:
    """Refuse (EqRError) an engine whose sidecar names another TensorRT version or GPU, or whose
    ONNX source changed since the build; returns the sidecar. Defaults: this machine."""
    engine = Path(engine_path)
    meta_path = sidecar_path(engine)
    rebuild = f"rebuild it: eqr export MODEL --precision <p> --out {engine.parent} --engine always --force"
    if not engine.is_file():
        raise EqRError(f"{engine}: no such engine file; {rebuild}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise EqRError(f"{engine}: missing or unreadable sidecar {meta_path.name}; {rebuild}") from None
    if meta.get("format") != SIDECAR_FORMAT:
        raise EqRError(f"{meta_path}: not an eqr engine sidecar; {rebuild}")
    trt_version = trt_version if trt_version is not None else tensorrt_version()
    gpu = gpu if gpu is not None else cuda_gpu()
    if trt_version is not None and meta.get("tensorrt") != trt_version:
        raise EqRError(f"{engine}: built with TensorRT {meta.get('tensorrt')}, this machine has {trt_version}; {rebuild}")
    built_on = (meta.get("gpu") or {}).get("tag")
    if gpu is not None and built_on != gpu.tag:
        raise EqRError(f"{engine}: built for GPU {built_on}, this machine has {gpu.tag}; {rebuild}")
    source = engine.parent / str(meta.get("onnx", ""))
    if source.is_file() and meta.get("onnx_sha256") and sha256_file(source) != meta["onnx_sha256"]:
        raise EqRError(f"{engine}: {source.name} changed since the engine was built; {rebuild}")
    return meta


def load_engine(engine_path: str | os.PathLike[str]):
    """Check the sidecar, then deserialize (tensorrt.ICudaEngine) for this machine's TensorRT."""
    import tensorrt as trt

    check_engine(engine_path)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise EqRError(f"{engine_path}: TensorRT refused the plan (version or GPU mismatch); rebuild it with eqr export")
    return engine
