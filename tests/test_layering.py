"""The house stays layered: every module's imports (those inside functions included) are read
with ast and checked against the floor of its folder (docs/README.md#the-house). A floor imports
only the floors listed for it, and no third-party package its floor must run without. Imports
under `if TYPE_CHECKING:` never run and are not counted. There are no exceptions by module name:
a module that needs another floor's imports belongs in that floor's folder.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"eqr": "eqr", "export": "eqr.export", "runtime": "eqr.runtime", "calibration": "eqr.calibration"}

# floor -> its folders (repository paths), bottom up
FLOORS: dict[str, tuple[str, ...]] = {
    "root": (),  # eqr/__init__.py: the version and lazily loaded public names, importing nothing
    "contract": ("eqr/contract",),
    "tasks": ("eqr/tasks",),
    "model": ("eqr/model",),
    "training": ("eqr/training",),
    "export": ("export",),
    "backends": ("runtime/backends",),
    "runtime": ("runtime",),
    "calibration": ("calibration",),
    "apps": ("eqr/serving", "eqr/bench", "eqr/bundling"),
    "commands": ("eqr/commands",),  # and eqr/__main__.py, `python -m eqr`
}
_BELOW_RUNTIME = ("root", "contract", "tasks")
# floor -> the eqr floors it may import (its own included)
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "root": ("root",),
    "contract": ("root", "contract"),
    "tasks": ("root", "contract", "tasks"),
    "model": ("root", "contract", "tasks", "model"),
    "training": ("root", "contract", "tasks", "model", "training"),
    "export": ("root", "contract", "tasks", "model", "export"),  # never the runtime or calibration
    # a backend wraps one engine; the torch backend's engine is the model itself
    "backends": (*_BELOW_RUNTIME, "model", "backends"),
    "runtime": (*_BELOW_RUNTIME, "backends", "runtime"),  # no model, training or export: no torch
    "calibration": (*_BELOW_RUNTIME, "model", "training", "export", "backends", "runtime", "calibration"),
    "apps": tuple(f for f in FLOORS if f != "commands"),
    "commands": tuple(FLOORS),
}
HEAVY = ("torch", "onnxruntime", "onnx_graphsurgeon", "matplotlib")
# floor -> third-party packages it must not import: what `pip install eqr` (the edge runtime) lacks
FORBIDDEN_PACKAGES: dict[str, tuple[str, ...]] = {
    "root": ("numpy", "onnx", *HEAVY),
    "contract": HEAVY,  # TensorRT and Polygraphy only inside functions that ask them (engine files)
    "tasks": HEAVY,
    "runtime": ("torch", "onnx_graphsurgeon", "matplotlib"),
}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if "bundled" in parts:
                continue
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


MODULES = modules()


def floor_of(path: Path) -> str:
    """The floor of a file in the repository, from its folder (the deepest folder that has one)."""
    relative = path.resolve().relative_to(ROOT).as_posix()
    if relative == "eqr/__init__.py":
        return "root"
    if relative == "eqr/__main__.py":
        return "commands"
    matches = [(len(folder), floor) for floor, folders in FLOORS.items() for folder in folders
               if relative.startswith(folder + "/")]
    if not matches:
        raise AssertionError(f"{relative}: its folder is no floor; add it to FLOORS (and docs/README.md)")
    return max(matches)[1]


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


def violations(name: str, path: Path) -> list[str]:
    floor = floor_of(path)
    bad = []
    for target in sorted(imports(path, name)):
        top = target.split(".")[0]
        if top == "eqr":
            module = next((m for m in (target, target.rpartition(".")[0]) if m in MODULES), None)
            kind = floor_of(MODULES[module]) if module else "root"
            if kind not in MAY_IMPORT[floor]:
                bad.append(f"{name} ({floor}) imports {target} ({kind})")
        elif top in FORBIDDEN_PACKAGES.get(floor, ()):
            bad.append(f"{name} ({floor}) imports {target}")
    return bad


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_import_stays_on_its_floor_or_goes_down(name: str) -> None:
    assert violations(name, MODULES[name]) == []


def test_every_folder_of_code_is_a_floor() -> None:
    assert {floor_of(path) for path in MODULES.values()} == set(FLOORS)


def test_the_checker_sees_imports_inside_functions_and_skips_type_checking(tmp_path: Path) -> None:
    probe = ROOT / "export" / "probe_for_the_layering_test.py"
    source = ("def f():\n    from eqr.runtime.solver import Solver\n    import torch\n"
              "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from eqr.calibration.record import CalibSet\n")
    found = imports(_write(tmp_path, source), "eqr.export.probe")
    assert {"eqr.runtime.solver", "torch"} <= found and "eqr.calibration.record" not in found
    MODULES["eqr.export.probe"] = probe  # as if it were in export/
    try:
        probe.write_text(source)
        assert violations("eqr.export.probe", probe) == ["eqr.export.probe (export) imports eqr.runtime.solver "
                                                         "(runtime)"]
    finally:
        probe.unlink()
        del MODULES["eqr.export.probe"]


def test_the_runtime_floor_may_import_neither_the_model_nor_torch() -> None:
    probe = ROOT / "runtime" / "probe_for_the_layering_test.py"
    MODULES["eqr.runtime.probe"] = probe
    try:
        probe.write_text("import torch\nfrom eqr.model.network import EqRModel\n")
        assert violations("eqr.runtime.probe", probe) == [
            "eqr.runtime.probe (runtime) imports eqr.model.network (model)", "eqr.runtime.probe (runtime) imports torch"]
    finally:
        probe.unlink()
        del MODULES["eqr.runtime.probe"]


def _write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(source)
    return path


def test_the_house_picture_names_every_floor_and_folder() -> None:
    picture = (ROOT / "docs" / "README.md").read_text(encoding="utf-8").split("## The house", 1)[-1]
    missing = [f"{floor} {folder}/" for floor, folders in FLOORS.items() for folder in folders
               if f"{folder}/" not in picture or floor not in picture]
    assert not missing, f"docs/README.md#the-house does not show: {missing}"
