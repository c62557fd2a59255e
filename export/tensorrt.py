"""TensorRT engines from the step graphs, built through Polygraphy's loaders.

`NetworkFromOnnxBytes(strongly_typed=True)` -> `CreateConfig` (one `Profile`, the workspace
limit, the machine's timing cache) -> `EngineBytesFromNetwork`, which merges the new timings into
the cache file under a file lock. Polygraphy tracks every TensorRT release's API, so this file
only states what eqr wants. TensorRT 10.1 or newer: precision lives in the ONNX graph (FP16
casts, INT8 Q/DQ), so the network is strongly typed and no precision builder flag is set (TF32
stays off for FP32: it would round matmuls to 10 mantissa bits, and the FP32 residual floor and
tol with them). TensorRT 11 removed the precision flags and types every network strongly.

DLA (`eqr export --dla-core N`, Jetson AGX Orin / Xavier): FP16 and INT8 engines only, static
shapes (`--batch N`), layers the DLA cannot run fall back to the GPU. TensorRT 10's DLA builds
are weakly typed with the FP16 (and INT8) flags; on 11 the strongly typed graph decides
(docs/jetson.md). The FP32 engine stays a GPU engine.

Engine names, sidecars and the machine checks live in `eqr.contract.trt_engine` (the runtime reads them
too); they are re-exported here.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from eqr.contract.artifact import NOISE_INPUT, NOISY_KEY, PRECISIONS, engine_file, noisy_engine_key
from eqr.contract.errors import EqRError
from eqr.contract.io import atomic_write_bytes, atomic_write_text, sha256_file
from eqr.contract.progress import Progress
# check_engine, GpuInfo and sidecar_path are re-exported: export's public engine API
from eqr.contract.trt_engine import (INSTALL_HINT, SIDECAR_FORMAT, SIDECAR_VERSION, GpuInfo, check_engine, cuda_gpu,
                                     quiet_polygraphy, rebuild_hint, sidecar_path, tensorrt_version, trt_logger)
from eqr.export.config import DLA_PRECISIONS

log = logging.getLogger(__name__)

MIN_TENSORRT = (10, 1)  # create_execution_context(strategy), set_device_memory(ptr, size), *_v2 sizes


class EngineBuildError(EqRError):
    """TensorRT could not build an engine (exit 1): the graph or the builder failed, not the input."""

    exit_code = 1


def engine_support(device: int = 0) -> tuple[GpuInfo | None, str | None, str]:
    """(gpu, tensorrt version, why not): both set and an empty reason when engines can be built."""
    version = tensorrt_version()
    gpu = cuda_gpu(device)
    if version is None:
        return gpu, None, f"tensorrt is not installed ({INSTALL_HINT})"
    if version_tuple(version) < MIN_TENSORRT:
        return gpu, version, (f"tensorrt {version} is too old: eqr builds strongly typed engines with TensorRT "
                              f"{'.'.join(map(str, MIN_TENSORRT))} or newer")
    if gpu is None:
        return None, version, f"no CUDA device {device} found (tensorrt {version} is installed)"
    return gpu, version, ""


def version_tuple(version: str) -> tuple[int, int]:
    """'10.3.0.30' -> (10, 3)."""
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:2]] + [0, 0]
    return parts[0], parts[1]


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
    updates: int | None = None  # U of the noisy graphs' noise input (None: no noisy engines)

    def shapes(self, noisy: bool = False) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        tails = {"tokens": (self.seq_len,), "z_H": (self.seq_len, self.hidden), "z_L": (self.seq_len, self.hidden),
                 "done": ()}
        if noisy:
            tails[NOISE_INPUT] = (self.updates, self.seq_len, self.hidden)
        return {name: tuple((b, *tail) for b in self.batch) for name, tail in tails.items()}  # type: ignore[misc]


@dataclass(frozen=True)
class BuildPlan:
    """How one engine is built: network typing, Polygraphy `CreateConfig` options, DLA core."""

    strongly_typed: bool
    config: dict[str, Any]
    dla_core: int | None


def build_plan(precision: str, trt_major: int, dla_core: int | None = None) -> BuildPlan:
    """Network typing and builder options of a `precision` engine on TensorRT `trt_major`."""
    if dla_core is None or precision == "fp32":
        return BuildPlan(True, {"tf32": False}, None)
    if precision not in ("fp16", "int8"):
        raise EqRError(f"--dla-core: DLA runs fp16 and int8 engines only, not {precision}")
    if trt_major >= 11:  # precision flags removed: the strongly typed graph decides
        return BuildPlan(True, {"tf32": False, "use_dla": True, "allow_gpu_fallback": True}, dla_core)
    return BuildPlan(False, {"tf32": False, "fp16": True, "int8": precision == "int8", "use_dla": True,
                             "allow_gpu_fallback": True}, dla_core)


class EngineFromOnnx:
    """Loader: ONNX bytes -> serialized TensorRT plan (bytes), through Polygraphy's loaders."""

    def __init__(self, onnx_bytes: bytes, precision: str, profile: EngineProfile, workspace_mib: int,
                 cache_path: Path | None, dla_core: int | None = None, noisy: bool = False) -> None:
        self.onnx_bytes = onnx_bytes
        self.noisy = noisy  # a noisy step graph: the profile covers its noise input too
        self.precision = precision
        self.profile = profile
        self.workspace_mib = workspace_mib
        self.cache_path = cache_path
        self.dla_core = dla_core

    def __call__(self) -> bytes:
        import tensorrt as trt
        from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxBytes,
                                            PostprocessConfig, Profile)
        from polygraphy.exception import PolygraphyException

        plan = build_plan(self.precision, version_tuple(trt.__version__)[0], self.dla_core)
        profile = Profile()
        for name, (lo, opt, hi) in self.profile.shapes(self.noisy).items():
            profile.add(name, lo, opt, hi)
        cache = self.cache_path
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
        config = CreateConfig(profiles=[profile], memory_pool_limits={trt.MemoryPoolType.WORKSPACE: self.workspace_mib << 20},
                              load_timing_cache=str(cache) if cache is not None and cache.is_file() else None,
                              **plan.config)
        config = PostprocessConfig(config, lambda builder, network, cfg: finish_config(trt, builder, cfg, plan.dla_core))
        network = NetworkFromOnnxBytes(self.onnx_bytes, strongly_typed=plan.strongly_typed)
        trt_logger()  # Polygraphy's logger is the process's one (eqr.contract.trt_engine)
        try:
            with quiet_polygraphy():
                return bytes(EngineBytesFromNetwork(network, config=config,
                                                    save_timing_cache=None if cache is None else str(cache))())
        except PolygraphyException as e:
            raise EngineBuildError(f"engine: TensorRT could not build the {self.precision} engine: "
                                   f"{str(e).strip().splitlines()[-1]}") from None


def finish_config(trt: Any, builder: Any, config: Any, dla_core: int | None) -> None:
    """What `CreateConfig` leaves open: a refused timing cache (another TensorRT or GPU wrote the
    file) is replaced by an empty one, checked, instead of failing after a good build; and the DLA
    core is the one asked for (CreateConfig picks core 0)."""
    if config.get_timing_cache() is None:
        log.warning("the TensorRT timing cache was refused (written by another TensorRT or GPU); starting an empty one")
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise EngineBuildError("engine: TensorRT refused an empty timing cache")
    if dla_core is not None:
        cores = int(builder.num_DLA_cores)
        if dla_core >= cores:
            raise EqRError(f"--dla-core {dla_core}: this device has {cores} DLA core(s)"
                           + (f" (0..{cores - 1})" if cores else "; drop --dla-core"))
        config.DLA_core = dla_core


def sidecar(precision: str, gpu: GpuInfo, trt_version: str, onnx_name: str, onnx_sha256: str,
            profile: EngineProfile, workspace_mib: int, plan: BuildPlan | None = None) -> dict[str, Any]:
    plan = plan or build_plan(precision, version_tuple(trt_version)[0])
    return {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "precision": precision,
        "tensorrt": trt_version, "gpu": asdict(gpu) | {"tag": gpu.tag},
        "onnx": onnx_name, "onnx_sha256": onnx_sha256,
        "batch": dict(zip(("min", "opt", "max"), profile.batch)), "workspace_mib": workspace_mib,
        "strongly_typed": plan.strongly_typed, "tf32": False, "dla_core": plan.dla_core,
    }


def build_engine(onnx_path: Path, out_dir: Path, precision: str, gpu: GpuInfo, trt_version: str,
                 profile: EngineProfile, workspace_mib: int, dla_core: int | None = None,
                 timing_cache: Path | None = None, noisy: bool = False) -> dict[str, Any]:
    """Build, write the engine and its sidecar (atomically) -> the manifest's engine entry.
    `timing_cache` defaults to this machine's (`timing_cache_path`); `noisy`: `onnx_path` is the
    precision's noisy step graph."""
    plan = build_plan(precision, version_tuple(trt_version)[0], dla_core)
    name = engine_file(precision, gpu.tag, trt_version, plan.dla_core, noisy)
    start = time.perf_counter()
    engine = EngineFromOnnx(onnx_path.read_bytes(), precision, profile, workspace_mib,
                            timing_cache or timing_cache_path(gpu.tag, trt_version), plan.dla_core, noisy)()
    seconds = time.perf_counter() - start
    meta = sidecar(precision, gpu, trt_version, onnx_path.name, sha256_file(onnx_path), profile, workspace_mib, plan)
    atomic_write_bytes(out_dir / name, engine)
    atomic_write_text(sidecar_path(out_dir / name), json.dumps(meta, indent=2) + "\n")
    entry = {"engine": name, "precision": precision, "sidecar": sidecar_path(name).name, "tensorrt": trt_version,
             "gpu": gpu.tag, "dla_core": plan.dla_core, "build_seconds": round(seconds, 1)}
    return entry | ({NOISY_KEY: True} if noisy else {})


@dataclass(frozen=True)
class EngineBuild:
    """What `eqr export --engine` and `eqr engine` both build: the engines of `precisions` from
    the step graphs in one directory, on one GPU and TensorRT."""

    precisions: tuple[str, ...]
    profile: EngineProfile
    workspace_mib: int
    gpu: GpuInfo
    trt_version: str
    dla_core: int | None = None  # fp16/int8 engines only: an fp32 engine stays a GPU engine
    timing_cache: Path | None = None  # None: this machine's, per GPU and TensorRT version

    def built(self) -> dict[str, Any]:
        """The manifest's "engine_build" entry after these engines were built."""
        return {"status": "built", "reason": "", "tensorrt": self.trt_version, "gpu": self.gpu.tag}


def build_engines(directory: Path, build: EngineBuild, progress: Progress,
                  on_built: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Every engine of `build` from `directory`'s step graphs, written beside them -> {precision:
    the manifest's engine entry}. `on_built(precision, entry)` runs after each engine is written."""
    engines = {}
    for precision in build.precisions:
        progress.stage(f"{precision}: TensorRT {build.trt_version} engine for {build.gpu.tag}")
        dla_core = build.dla_core if precision in DLA_PRECISIONS else None
        engines[precision] = build_engine(directory / PRECISIONS[precision].onnx, directory, precision, build.gpu,
                                          build.trt_version, build.profile, build.workspace_mib, dla_core,
                                          build.timing_cache)
        if on_built is not None:
            on_built(precision, engines[precision])
        progress.done(f"{precision}: wrote {engines[precision]['engine']}")
        noisy = PRECISIONS[precision].noisy_onnx
        if noisy and build.profile.updates and (directory / noisy).is_file():
            key = noisy_engine_key(precision)
            engines[key] = build_engine(directory / noisy, directory, precision, build.gpu, build.trt_version,
                                        build.profile, build.workspace_mib, dla_core, build.timing_cache, noisy=True)
            if on_built is not None:
                on_built(key, engines[key])
            progress.done(f"{precision}: wrote {engines[key]['engine']} (noisy step graph)")
    return engines


def load_engine(engine_path: str | Path, device: int = 0):
    """Check the sidecar, then deserialize (tensorrt.ICudaEngine) for this machine's TensorRT."""
    import tensorrt as trt

    meta = check_engine(engine_path, device=device)
    runtime = trt.Runtime(trt_logger())
    if meta.get("dla_core") is not None:
        runtime.DLA_core = int(meta["dla_core"])
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise EqRError(f"{engine_path}: TensorRT refused the plan (version or GPU mismatch); "
                       f"{rebuild_hint(Path(engine_path), meta.get('precision'))}")
    return engine
