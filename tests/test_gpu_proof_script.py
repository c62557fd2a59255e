"""scripts/gpu_proof.sh and scripts/gpu_check.sh on the CPU: syntax, the pytest-summary rule (all
skipped is never PASS), and gpu_check's agreement part failing loudly on bad input."""
from __future__ import annotations

import json
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROOF, CHECK = ROOT / "scripts" / "gpu_proof.sh", ROOT / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("script", [PROOF, CHECK])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("name", ["gpu_proof_torch.py", "gpu_proof_cuda.py"])
def test_proof_sections_compile(name, tmp_path):
    py_compile.compile(str(ROOT / "scripts" / name), cfile=str(tmp_path / "out.pyc"), doraise=True)


# pytest's last lines as `pytest -q -rs` prints them
CANNED = {
    "all_skipped": ("SKIPPED [6] tests/test_torch_cuda.py:16: needs a CUDA GPU (torch)\n6 skipped in 0.06s\n", 0,
                    "SKIP"),
    "all_skipped_banner": ("===== 12 skipped in 0.40s =====\n", 0, "SKIP"),
    "deselected": ("===== 40 deselected in 0.10s =====\n", 5, "SKIP"),
    "failures": ("FAILED tests/test_x.py::test_a - AssertionError\n1 failed, 9 passed, 2 skipped in 3.1s\n", 1, "FAIL"),
    "errors": ("ERROR tests/test_x.py\n1 error in 0.5s\n", 2, "FAIL"),
    "passes": ("29 passed in 9.48s\n", 0, "PASS"),
    "passes_and_skips": ("SKIPPED [1] a.py:3: no GPU\n3 passed, 1 skipped in 1.0s\n", 0, "PASS"),
    "passed_but_nonzero_exit": ("3 passed in 1.0s\n", 137, "FAIL"),
    "no_summary": ("Traceback (most recent call last):\nModuleNotFoundError: No module named 'click'\n", 4, "FAIL"),
}


@pytest.mark.parametrize("case", sorted(CANNED))
def test_summary_rule_on_canned_pytest_output(case, tmp_path):
    text, rc, expected = CANNED[case]
    log = tmp_path / "step.log"
    log.write_text("tests/test_a.py ....ss\n" + text)
    out = subprocess.run(["bash", str(PROOF), "--pytest-status", str(log), str(rc)], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out.split()[0] == expected, out
    if expected == "SKIP":
        assert "PASS" not in out


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _agreement(work: Path, precision: str = "fp16") -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # `python` is this interpreter
    return subprocess.run(["bash", str(CHECK), "--agreement", str(work), precision], capture_output=True, text=True,
                          env=env)


def test_gpu_check_agreement_passes_on_agreeing_solves(tmp_path):
    rows = [{"answer": f"{i}", "steps": 5, "correct": True} for i in range(10)]
    _jsonl(tmp_path / "trt.fp16.jsonl", rows)
    _jsonl(tmp_path / "ort.fp16.jsonl", rows)
    done = _agreement(tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("PASS answers equal 100.0%"), done.stdout + done.stderr


def test_gpu_check_agreement_exits_non_zero_when_it_raises_or_disagrees(tmp_path):
    good = [{"answer": f"{i}", "steps": 5} for i in range(10)]
    _jsonl(tmp_path / "ort.fp16.jsonl", good)
    (tmp_path / "trt.fp16.jsonl").write_text('{"answer": "0", "steps": 5}\nnot json\n')  # the heredoc raises
    raised = _agreement(tmp_path)
    assert raised.returncode != 0
    assert raised.stdout.startswith("FAIL the agreement check raised (exit 1)") and "JSONDecodeError" in raised.stdout
    _jsonl(tmp_path / "trt.fp16.jsonl", [{"answer": "x", "steps": 9} for _ in range(10)])  # runs, disagrees
    disagree = _agreement(tmp_path)
    assert disagree.returncode != 0 and disagree.stdout.startswith("FAIL answers equal 0.0%")
    missing = _agreement(tmp_path, "int8")  # no int8 files at all
    assert missing.returncode != 0 and "FileNotFoundError" in missing.stdout
