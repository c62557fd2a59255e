"""memory: peak RSS of a fresh process solving one working batch at batch 64 and 256."""
from __future__ import annotations

import contextlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from eqr.bench.config import MEMORY_BATCHES
from eqr.bench.result import Measurement
from eqr.bench.setting import Setting, puzzle_set


def memory(setting: Setting) -> Measurement:
    c = setting.config
    rows, fields = [], {}
    puzzles = puzzle_set(setting)
    with tempfile.TemporaryDirectory(prefix="eqr-bench-mem-") as tmp:
        for B in MEMORY_BATCHES:
            tokens = np.resize(puzzles.inputs, (B, puzzles.inputs.shape[1]))  # B trajectories, one working batch
            np.save(Path(tmp) / "tokens.npy", tokens)
            setting.report.stage(f"memory: fresh process, onnxruntime fp32 solve at batch {B}")
            probe = {"export_dir": str(setting.export_dir), "tokens": str(Path(tmp) / "tokens.npy"), "batch": B,
                     "steps": min(c.depth, 4), "threads": c.threads}
            done = subprocess.run([sys.executable, "-c", "from eqr.bench.memory import memory_probe; memory_probe()",
                                   json.dumps(probe)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory probe at batch {B} failed: {done.stderr.strip().splitlines()[-1:]}")
            report = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((B, f"{report['loaded_mib']:.1f}", f"{report['after_mib']:.1f}", f"{report['peak_mib']:.1f}"))
            fields[f"peak_rss_mib_b{B}"] = report["peak_mib"]
            fields[f"batch_rss_mib_b{B}"] = report["after_mib"] - report["loaded_mib"]
    return Measurement("memory", fields[f"peak_rss_mib_b{MEMORY_BATCHES[-1]}"], fields,
                       ("batch", "RSS loaded MiB", "RSS after solve MiB", "peak RSS MiB"), rows,
                       "a fresh Python process: imports, ONNX Runtime session and a 1-row warm-up solve (loaded), "
                       "then one solve of a full working batch; peak = ru_maxrss")


def memory_probe() -> None:
    """Child process of `memory`: load, solve one working batch, print RSS figures as JSON."""
    from eqr.runtime import Solver

    probe = json.loads(sys.argv[1])
    with contextlib.suppress(ImportError):  # the runtime may not use torch at all
        import torch

        torch.set_num_threads(probe["threads"])
    tokens = np.load(probe["tokens"])
    solver = Solver.load(probe["export_dir"], backend="onnxruntime", batch_size=probe["batch"],
                         threads=probe["threads"])
    solver.backend.activate()
    solver.solve(tokens[:1], fixed_depth=1)  # warm-up: lazily loaded kernels count as "loaded", not as the batch
    loaded = _current_rss_mib()
    solver.solve(tokens, fixed_depth=probe["steps"])
    print(json.dumps({"loaded_mib": loaded, "after_mib": _current_rss_mib(), "peak_mib": _peak_rss_mib()}))


def _current_rss_mib() -> float:
    """Resident set size now (Linux /proc); the peak so far where /proc is missing."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0  # kB
    return _peak_rss_mib()


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0 if platform.system() != "Darwin" else kib / 2**20


