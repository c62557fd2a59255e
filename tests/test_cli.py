"""`eqr` command line: version, info on every kind of model source, one-line errors with exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import tiny_config
from official import write_official_checkpoint

from eqr import __version__
from eqr.commands import cli
from eqr.model.checkpoint import save_checkpoint
from eqr.model.network import EqRModel


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_version() -> None:
    result = _run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_info_on_a_preset_reports_fresh_init_and_cost() -> None:
    result = _run("info", "paper-sudoku", "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["parameters"] == 4_855_298
    assert abs(info["flops_per_outer_step_per_sample"] / 1e9 - 18.73) < 0.01
    assert info["source"]["kind"] == "init" and info["source"]["weights"] == "init"
    assert info["config"]["mlp_t"] is True and info["config"]["hidden_size"] == 512


def test_info_on_an_official_checkpoint(tmp_path: Path) -> None:
    write_official_checkpoint(tmp_path / "eqr.pth", tiny_config(seq_len=81, vocab_size=11, hidden_size=32))
    result = _run("info", str(tmp_path / "eqr.pth"), "--json")
    info = json.loads(result.output)
    assert info["source"]["kind"] == "official" and info["source"]["weights"] == "ema"
    assert len(info["source"]["sha256"]) == 64
    model_weights = json.loads(_run("info", str(tmp_path / "eqr.pth"), "--weights", "model", "--json").output)
    assert model_weights["source"]["weights"] == "model"
    text = _run("info", str(tmp_path / "eqr.pth")).output
    assert "official EqR checkpoint" in text and "weights       ema" in text


def test_info_on_our_checkpoint(tmp_path: Path) -> None:
    model = EqRModel(tiny_config())
    save_checkpoint(tmp_path / "m.pt", model.config, model.state_dict(), None, {"train_command": "eqr train x"})
    info = json.loads(_run("info", str(tmp_path / "m.pt"), "--json").output)
    assert info["source"]["kind"] == "eqr" and info["source"]["weights"] == "model"
    assert info["parameters"] == model.num_parameters()
    assert info["metadata"]["train_command"] == "eqr train x"


def test_bad_inputs_print_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    for target in [str(tmp_path / "missing.pt"), str(tmp_path / "junk.pt"), "no-such-model", str(tmp_path)]:
        proc = subprocess.run([sys.executable, "-m", "eqr", "info", target], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
