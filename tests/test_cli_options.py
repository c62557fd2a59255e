"""The shared flag vocabulary (eqr/commands/options.py): list flags, one spelling each, progress
without a terminal, exit codes (130 on Ctrl-C), and one-line errors for bad data files."""
from __future__ import annotations

import io

import click
import numpy as np
import pytest
from click.testing import CliRunner

from eqr.commands import cli
from eqr.commands.options import (backend_option, batch_option, calib_data_option, output_options, precision_option,
                                  run_command)
from eqr.contract.errors import EqRError
from eqr.contract.io import read_npz
from eqr.contract.progress import Progress
from eqr.model.checkpoint import save_checkpoint


@click.command()
@precision_option(default=("fp32",))
@backend_option(choices=("onnxruntime", "torch"), default=("onnxruntime",), multiple=True)
@calib_data_option(help="calibration data")
@batch_option(default=8, type=int, help="batch")
@output_options
def probe(precision, backend, calib_data, batch, as_json, quiet, verbose) -> None:
    click.echo(f"{','.join(precision)}|{','.join(backend)}|{calib_data}|{batch}|{as_json}|{quiet}|{verbose}")


def invoke(*args: str) -> "click.testing.Result":
    return CliRunner().invoke(probe, list(args))


def test_precision_is_repeatable_comma_separated_and_case_insensitive() -> None:
    assert invoke().stdout == "fp32|onnxruntime|None|8|False|False|0\n"
    result = invoke("--precision", "FP16,int8", "--precision", "fp16", "--backend", "Torch,onnxruntime")
    assert result.exit_code == 0 and result.stdout.startswith("fp16,int8|torch,onnxruntime|")
    bad = invoke("--precision", "fp8")
    assert bad.exit_code == 2 and "'fp8': choose from fp32, fp16, int8" in bad.stderr


@pytest.mark.parametrize("old", ["--precisions", "--backends", "--data", "--calib", "--batch-size"])
def test_one_spelling_per_flag(old: str) -> None:
    """The pre-release spellings are gone: each is an unknown option (exit 2), not a silent alias."""
    result = invoke(old, "x")
    assert result.exit_code == 2 and f"No such option '{old}'" in result.stderr


def test_quiet_verbose_and_json_flags() -> None:
    assert invoke("-q", "-vv", "--json").stdout.endswith("|True|True|2\n")


def test_progress_without_a_terminal_prints_one_line_per_bar_and_nothing_when_quiet() -> None:
    stream = io.StringIO()
    progress = Progress(stream=stream)
    progress.stage("export")
    with progress.bar("solving", 5) as advance:
        advance(2)
        advance(3)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("] export") and lines[1].startswith("solving: 5/5 in ") and len(lines) == 2
    quiet = io.StringIO()
    with Progress(quiet=True, stream=quiet).bar("solving", 5) as advance:
        advance(5)
    Progress(quiet=True, stream=quiet).note("summary")
    assert quiet.getvalue() == ""


def test_ctrl_c_exits_130_without_aborted(monkeypatch: pytest.MonkeyPatch) -> None:
    import eqr.commands.models

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(eqr.commands.models, "bundled_cards", interrupted)
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 130 and result.stderr == "interrupted\n" and "Aborted" not in result.output


def test_a_command_on_its_own_keeps_the_exit_codes() -> None:
    @click.command()
    @click.option("--what", default="ok")
    def standalone(what: str) -> None:
        if what == "interrupt":
            raise KeyboardInterrupt
        if what == "input":
            raise EqRError("bad input")

    for what, code in (("ok", 0), ("input", 2), ("interrupt", 130)):
        with pytest.raises(SystemExit) as exit_:
            run_command(standalone, "standalone", ["--what", what])
        assert exit_.value.code == code
    with pytest.raises(SystemExit) as exit_:
        run_command(standalone, "standalone", ["--nope"])
    assert exit_.value.code == 2


def test_eqr_help_lists_the_exit_codes() -> None:
    text = CliRunner().invoke(cli, ["--help"]).stdout
    for line in ("0    ok", "1    a check or a puzzle failed", "2    usage or input error", "130  interrupted"):
        assert line in text


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    (b"tokens\n1,2,3\n", "is not an .npz archive"),
    ("npy", "is a .npy file (one unnamed array), not an .npz archive"),
    ("pickle", "holds pickled Python objects, which eqr never loads"),
    (b"PK\x03\x04broken", "damaged .npz archive"),
])
def test_bad_npz_gets_one_line_naming_the_file_and_the_problem(tmp_path, content, problem) -> None:
    path = tmp_path / "calib.npz"
    if content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif content == "pickle":
        np.savez(path, tokens=np.array([{"a": 1}], dtype=object))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(EqRError) as error:
        read_npz(path, f"--calib-data {path}")
    message = str(error.value)
    assert message.startswith(f"--calib-data {path}: {problem}") and "\n" not in message
    assert "allow_pickle" not in message and "eqr calibrate" not in message


def test_int8_export_says_what_it_calibrated_on_and_the_parity_limit(tmp_path) -> None:
    from conftest import contracting_model

    model = contracting_model()
    save_checkpoint(tmp_path / "tiny.pt", model.config, model.state_dict(),
                    metadata={"task": {"name": "sudoku", "size": 4}})
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "tiny.pt"), "--precision", "INT8", "--engine", "never",
                                      "--check-steps", "4", "--check-batch", "2", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "fp32: step error vs torch" in result.stderr and "(limit 0.0001: passed)" in result.stderr
    assert "runtime convergence tol" in result.stderr
    assert "int8: calibrated on 4 built-in sudoku puzzles" in result.stderr
    assert "pass --calib-data PUZZLES.npz" in result.stderr
    again = CliRunner().invoke(cli, ["export", str(tmp_path / "tiny.pt"), "--out", str(tmp_path / "e")])
    assert again.exit_code == 2 and "pass --force to replace the export there" in again.stderr


def test_data_commands_share_quiet_and_the_progress_lines(tmp_path) -> None:
    import json

    args = ["data", "generate", "--task", "sudoku", "--size", "4", "--n", "3", "--out", str(tmp_path / "d")]
    loud = CliRunner().invoke(cli, args)
    assert loud.exit_code == 0 and "generating sudoku 4x4 train: 3/3 in " in loud.stderr
    quiet = CliRunner().invoke(cli, [*args, "--split", "test", "-q", "--json"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and json.loads(quiet.stdout)["puzzles"] == 3
    checked = CliRunner().invoke(cli, ["data", "check", str(tmp_path / "d"), "-q"])
    assert checked.exit_code == 0 and checked.stderr == "" and "train: ok" in checked.stdout
