"""The import layering stays true: every module's imports (including those inside functions)
are read with ast and checked against the layers, bottom up:

    floor        eqr.contract.artifact, eqr.contract.errors, eqr.contract.io, eqr.contract.config, eqr.contract.trt_engine   (the export contract; no torch, no engine)
    tasks        eqr.tasks.*
    model        eqr.model.network, eqr.model.step_graph, eqr.model.checkpoint, eqr.model.load
    training     eqr.training.*
    export       eqr.export.*
    runtime      eqr.runtime.*  (eqr solve included: it must run without torch)
    calibration  eqr.calibration.*
    tools        the command lines (*.cli, eqr.cli, eqr.train, eqr.models_cli, eqr.bench.*), eqr.training.bundle,
                 and serving (eqr.serving.*: the Triton model repository, model.py, server and clients)

A module may import its own layer and the layers below, except the arrows in FORBIDDEN. Imports
under `if TYPE_CHECKING:` never run and are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"eqr": "eqr", "export": "eqr.export", "runtime": "eqr.runtime", "calibration": "eqr.calibration"}
LAYERS = ("floor", "tasks", "model", "training", "export", "runtime", "calibration", "tools")
FLOOR = ("eqr.contract.artifact", "eqr.contract.errors", "eqr.contract.io", "eqr.contract.config", "eqr.contract.trt_engine")
MODEL = ("eqr.model.network", "eqr.model.step_graph", "eqr.model.checkpoint", "eqr.model.load")
TOOLS = ("eqr.cli", "eqr.__main__", "eqr.train", "eqr.models_cli", "eqr.bench", "eqr.training.bundle", "eqr.serving")
HEAVY = ("torch", "onnx", "onnxruntime", "tensorrt", "polygraphy", "onnx_graphsurgeon", "matplotlib")

# layer -> what it must not import: layers, or top-level third-party packages
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "floor": ("tasks", "model", "training", "export", "runtime", "calibration", "tools", *HEAVY),
    "tasks": ("model", "training", "export", "runtime", "calibration", "tools", "torch"),
    "model": ("training", "export", "runtime", "calibration", "tools"),
    "training": ("export", "runtime", "calibration", "tools"),
    "export": ("runtime", "calibration", "tools"),
    "runtime": ("model", "training", "export", "calibration", "tools", "torch"),
    "calibration": ("tools",),
    "tools": (),
}
# The runtime's one door to torch and the model: the torch backend. The engine-file contract
# (sidecars, the GPU's identity, the one TensorRT logger), which export and runtime share, asks
# TensorRT its version and takes Polygraphy's logger where it is installed, inside functions.
ALLOWED = {"eqr.runtime.backends.torch_backend": ("model", "torch"), "eqr.contract.trt_engine": ("tensorrt", "polygraphy")}
# Known exceptions, each until the change named beside it lands.
KNOWN: dict[str, str] = {}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def layer_of(name: str) -> str | None:
    """The layer of an eqr module (None outside eqr)."""
    if name == "eqr":
        return "floor"  # the package root's imports are lazy strings
    if any(name == t or name.startswith(t + ".") for t in TOOLS) or name.endswith(".cli") \
            and not name.startswith("eqr.runtime"):
        return "tools"
    if name in FLOOR:
        return "floor"
    if name in MODEL:
        return "model"
    for prefix, layer in (("eqr.tasks", "tasks"), ("eqr.training", "training"), ("eqr.export", "export"),
                          ("eqr.runtime", "runtime"), ("eqr.calibration", "calibration")):
        if name == prefix or name.startswith(prefix + "."):
            return layer
    return "floor" if name.startswith("eqr.") else None


def imports(path: Path, name: str) -> set[str]:
    """Modules `path` imports anywhere (functions included), resolved to absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = {id(node) for n in ast.walk(tree) if isinstance(n, ast.If) and _is_type_checking(n.test)
               for child in n.body for node in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


MODULES = modules()


def violations(name: str) -> list[str]:
    layer = layer_of(name)
    allowed = ALLOWED.get(name, ())
    bad = []
    for target in sorted(imports(MODULES[name], name)):
        top = target.split(".")[0]
        kind = layer_of(target) if top == "eqr" else top
        if kind in FORBIDDEN[layer] and kind not in allowed:
            bad.append(f"{name} ({layer}) imports {target} ({kind})")
    return bad


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_forbidden_import(name: str) -> None:
    if name in KNOWN:
        pytest.skip(f"known exception until {KNOWN[name]}")
    assert violations(name) == []


def test_known_exceptions_still_need_their_exception() -> None:
    """Once an exception's module obeys the rules, it leaves KNOWN (so the list never goes stale)."""
    for name in KNOWN:
        assert violations(name), f"{name} obeys the layering now: remove it from KNOWN"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from eqr.runtime.solver import Solver\n    import torch\n"
                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from eqr.model.network import EqRModel\n")
    found = imports(source, "eqr.export.probe")
    assert {"eqr.runtime.solver", "torch"} <= found and "eqr.model.network" not in found
    assert layer_of("eqr.runtime.solver") in FORBIDDEN["export"]
    assert layer_of("eqr.export.cli") == "tools" and layer_of("eqr.runtime.cli") == "runtime"
