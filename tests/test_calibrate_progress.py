"""Calibrate's progress: the bar counts the row-steps of the stopping-rule recordings (the long
part at paper size), shows an ETA without a terminal and under -q, and a long estimate gives one
note offering a smaller --rule-puzzles. The clock is injected: nothing here is timed."""
from __future__ import annotations

import io
import logging
from pathlib import Path

from eqr.calibration.calibrate import rule_fit_note, run_calibrate
from eqr.calibration.config import CalibConfig
from eqr.contract.progress import Progress, eta_text
from eqr.export import ExportConfig
from eqr.export.exporter import export_model
from eqr.model.checkpoint import save_checkpoint
from eqr.model.load import load_model
from tests.conftest import contracting_model


def export_tiny(out: Path) -> None:
    """The contracting tiny model (a 4x4 Sudoku checkpoint) exported to `out` in FP32."""
    model = contracting_model()
    save_checkpoint(out.parent / "tiny.pt", model.config, model.state_dict(),
                    metadata={"task": {"name": "sudoku", "size": 4}})
    export_model(load_model(out.parent / "tiny.pt"), out, ExportConfig(engine="never", check_batch=2, check_steps=4))


def test_a_long_rule_fit_gives_one_note_with_a_smaller_rule_puzzles(tmp_path: Path) -> None:
    export_tiny(tmp_path / "export")
    ticks = iter(range(0, 10**9, 60))  # every clock read: a minute later, so the estimate reads long
    stream = io.StringIO()
    progress = Progress(stream=stream, clock=lambda: float(next(ticks)), every_s=1e9)
    cfg = CalibConfig(puzzles=2, starts=1, depths=(0, 1, 2), rule_puzzles=256, rule_steps=4, precisions=("int8",))
    run_calibrate(str(tmp_path / "export"), None, cfg, progress)
    lines = stream.getvalue().splitlines()
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "--rule-puzzles 64" in notes[0] and "(now 256)" in notes[0]
    # fp32, int8 and int8-cpu (int8 brings it), each 256 puzzles x 4 recorded steps: the bar's units are row-steps
    assert any("fitting stopping rules: 3072/3072" in line for line in lines), lines


def test_without_a_terminal_the_bar_reports_an_eta_and_under_quiet_logs_it(caplog) -> None:
    ticks = iter(range(0, 10**9, 40))
    stream = io.StringIO()
    with Progress(stream=stream, clock=lambda: float(next(ticks)), every_s=30).bar("fitting", 10) as advance:
        for _ in range(3):
            advance(1)
    assert "fitting: 1/10" in stream.getvalue() and "ETA" in stream.getvalue()
    with caplog.at_level(logging.INFO, logger="eqr.progress"):
        quiet = Progress(quiet=True, clock=lambda: float(next(ticks)), every_s=30)
        with quiet.bar("fitting", 100, long_note=lambda eta: rule_fit_note(eta, 128)) as advance:
            for _ in range(3):
                advance(1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "--rule-puzzles 32" in warned[0]
    assert any("ETA" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_short_estimate_gives_no_note() -> None:
    ticks = iter(range(0, 10**6))  # a second per read: 100 units take ~100 s, under 2 minutes
    stream = io.StringIO()
    with Progress(stream=stream, clock=lambda: float(next(ticks))).bar(
            "fitting", 100, long_note=lambda eta: rule_fit_note(eta, 128)) as advance:
        for _ in range(100):
            advance(1)
    assert "note:" not in stream.getvalue() and "fitting: 100/100" in stream.getvalue()
    assert "--rule-puzzles" not in rule_fit_note(300.0, 32)  # nothing smaller to offer
    assert (eta_text(12), eta_text(90), eta_text(3725)) == ("12s", "1m30s", "1h02m")


def test_rules_fitted_at_a_breadth_record_that_many_trajectories_per_puzzle(tmp_path: Path) -> None:
    import pytest

    from eqr.contract.errors import EqRError

    export_tiny(tmp_path / "export")
    stream = io.StringIO()
    cfg = CalibConfig(puzzles=2, starts=1, depths=(0, 1, 2), rule_puzzles=4, rule_steps=4, rule_breadth=2,
                      precisions=("fp16",))
    entries, _ = run_calibrate(str(tmp_path / "export"), None, cfg, Progress(stream=stream, every_s=1e9))
    assert entries["fp32"]["stopping"]["breadth"] == entries["fp16"]["stopping"]["breadth"] == 2
    assert entries["fp32"]["stopping"]["fit"]["puzzles"] == 2  # halves of puzzles, not of trajectories
    # fp32 and fp16, each 4 puzzles x 2 trajectories x 4 recorded steps
    assert "fitting stopping rules: 64/64" in stream.getvalue(), stream.getvalue()
    with pytest.raises(EqRError, match="--rule-breadth must be >= 1"):
        CalibConfig(rule_breadth=0)
