"""README.md runs as written: every bash and python block, in order, in one fresh directory, as a
newcomer would paste them. A block may be skipped only when the README marks it so, for a reason
this machine cannot meet (a GPU with TensorRT, an official checkpoint) or because it is the
set-up itself (it runs this suite)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?:skip \((?P<skip>[^)]*)\)|needs \((?P<needs>[^)]*)\)) -->\n)?"
                   r"```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)
ALLOWED_SKIPS = ("needs an NVIDIA GPU and TensorRT", "needs an official EqR checkpoint",
                 "sets up .venv and runs the whole test suite")


NEEDS = {"the serve extra: tritonserver": "serving"}  # what a `needs (...)` block requires -> its probe


def blocks() -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason or None) of every fenced bash/python block, in order. A block
    marked `needs (X)` runs where X is installed and is skipped, naming X, where it is not."""
    return [(m["lang"], m["code"], m["skip"] if m["needs"] is None else _unmet(m["needs"]))
            for m in BLOCK.finditer(README.read_text(encoding="utf-8"))]


def _unmet(needs: str) -> str | None:
    assert needs in NEEDS, f"README block needs {needs!r}, which tests/test_readme.py cannot probe"
    from eqr.contract.errors import EqRError
    from eqr.serving.server import find_tritonserver

    try:
        find_tritonserver()
    except EqRError:
        return f"needs {needs}"
    return None


def test_only_blocks_this_machine_cannot_run_are_marked_skipped() -> None:
    found = blocks()
    assert sum(lang == "bash" for lang, _, _ in found) >= 2 and sum(lang == "python" for lang, _, _ in found) >= 3
    for _, code, skip in found:
        if skip is not None:
            assert skip.startswith(ALLOWED_SKIPS + tuple(f"needs {n}" for n in NEEDS)), \
                f"README skips a block for {skip!r}:\n{code}"
    setup = next(code for _, code, skip in found if skip and skip.startswith(ALLOWED_SKIPS[2]))
    assert setup.splitlines()[:2] == [
        "./scripts/demo.sh    # creates/reuses .venv, installs eqr, runs the main job on the default model",
        "./scripts/test.sh    # creates/reuses .venv, installs eqr, runs the test suite"]


def test_readme_blocks_run_verbatim_in_order(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    skipped = []
    for i, (lang, code, skip) in enumerate(blocks()):
        if skip is not None:
            skipped.append(skip)
            continue
        command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (f"README block {i} ({lang}) failed with exit {done.returncode}:\n{code}\n"
                                      f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
        assert "Traceback" not in done.stderr, done.stderr
    answers = (tmp_path / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 50 and all('"backend"' in line for line in answers)
    if skipped:
        print("skipped README blocks:", *skipped, sep="\n  ")
