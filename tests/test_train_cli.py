"""`eqr train` end to end on the tiny preset: runs, resumes, refuses bad input, and torchrun matches."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from eqr.commands import cli
from eqr.model.load import load_model

TINY = ["--preset", "tiny", "--task", "sudoku", "--size", "4", "--quiet"]


def _run(*args: str):
    return CliRunner().invoke(cli, ["train", *args])


def test_train_tiny_preset_writes_checkpoint_metrics_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _run(*TINY, "--out", str(out), "--steps", "4")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in records if r["type"] == "eval"]
    assert evals and [d["depth"] for d in evals[-1]["by_depth"]] == [1, 2]
    model = load_model(out / "last.pt")
    assert model.source.weights == "ema"
    meta = model.metadata
    assert meta["task"]["name"] == "sudoku" and meta["task"]["size"] == 4
    assert meta["train_config"]["epochs"] == 4 and meta["train_command"].startswith("eqr train")
    assert meta["wall_time_s"] > 0


def test_resume_continues_and_refuses_changed_settings(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _run(*TINY, "--out", str(out), "--steps", "2").exit_code == 0
    result = _run("--out", str(out), "--resume", "--steps", "4", "--quiet")
    assert result.exit_code == 0, result.output
    assert torch.load(out / "last.pt", weights_only=True)["train_state"]["step"] == 4
    assert _run("--out", str(out), "--resume", "--eval-interval", "1", "--quiet").exit_code == 0
    bad = _run("--out", str(out), "--resume", "--lr", "1")
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "error: --resume" in bad.output


def test_existing_run_needs_force_and_missing_run_cannot_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _run(*TINY, "--out", str(out), "--steps", "1").exit_code == 0
    again = _run(*TINY, "--out", str(out), "--steps", "1")
    assert again.exit_code == 2 and "--force" in again.output and "Traceback" not in again.output
    assert _run(*TINY, "--out", str(out), "--steps", "1", "--force").exit_code == 0
    missing = _run("--out", str(tmp_path / "nothing"), "--resume")
    assert missing.exit_code == 2 and "nothing to resume" in missing.output


def test_batch_must_split_over_processes_and_help_has_examples(tmp_path: Path) -> None:
    help_text = _run("--help").output
    assert "Examples:" in help_text and "torchrun" in help_text
    no_data = _run("--preset", "paper-sudoku", "--out", str(tmp_path / "x"))
    assert no_data.exit_code == 2 and "--data" in no_data.output


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    """Same global batch, path noise off: gradients summed over 2 gloo ranks equal one process's."""
    args = [*TINY, "--steps", "3", "--batch", "8", "--noise-scale", "0", "--eval-interval", "100"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "eqr.commands.train", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for attempt in range(2):  # gloo can abort a rank while tearing its sockets down (a race in gloo, not eqr)
        two = tmp_path / f"two-{attempt}"
        double = subprocess.run([*torchrun, "-m", "eqr.commands.train", *args, "--out", str(two)],
                                capture_output=True, text=True, env=env, timeout=300)
        if double.returncode == 0 or "SIGABRT" not in double.stderr:
            break
    assert double.returncode == 0, double.stderr
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    b = torch.load(two / "last.pt", weights_only=True)
    assert b["train_state"]["world_size"] == 2 and b["train_state"]["step"] == 3
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=2e-5, rtol=1e-4, msg=key)
    for key in ("inputs", "steps", "halted"):
        assert torch.equal(a["train_state"]["carry"][key], b["train_state"]["carry"][key]), key
    torch.testing.assert_close(a["train_state"]["carry"]["z_H"], b["train_state"]["carry"]["z_H"], atol=1e-4, rtol=1e-3)
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for x, y in zip(lines("one"), lines(two.name)):
        if x["type"] == "train":
            assert x["lm_loss"] == pytest.approx(y["lm_loss"], rel=1e-5)


def test_train_on_a_generated_data_set_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for split, n in (("train", 16), ("test", 8)):
        made = CliRunner().invoke(cli, ["data", "generate", "--task", "sudoku", "--size", "4", "--n", str(n),
                                        "--seed", "5", "--out", str(data), "--split", split])
        assert made.exit_code == 0, made.output
    out = tmp_path / "run"
    result = _run("--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "3", "--quiet")
    assert result.exit_code == 0, result.output
    meta = load_model(out / "last.pt").metadata
    assert meta["data"]["source"] == "dataset" and meta["data"]["rows"] == 16
    assert meta["task"]["name"] == "sudoku"
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals and evals[-1]["n"] == 8  # the test split is the held-out set


def test_make_bundle_writes_a_measured_card(tmp_path: Path) -> None:
    from eqr.bundling.card import make_bundle
    from eqr.commands.bundle import generate_heldout

    out = tmp_path / "run"
    assert _run(*TINY, "--out", str(out), "--steps", "2").exit_code == 0
    args = ["--task", "sudoku", "--size", "4", "--blanks", "2:4", "--n", "8", "--split", "test"]
    card = make_bundle(out, "toy", generate_heldout, args, heldout_seed=99, depths=[1, 2], summary="toy", notes=["a note"],
                       root=tmp_path / "bundled")
    folder = tmp_path / "bundled" / "toy"
    assert json.loads((folder / "card.json").read_text()) == json.loads(json.dumps(card))
    assert [r["depth"] for r in card["accuracy_by_depth"]] == [1, 2] and card["heldout"]["n"] == 8
    assert card["claim"]["exact"] == max(r["exact"] for r in card["accuracy_by_depth"])
    assert card["heldout"]["generate_args"] == args and "--seed 99" in card["heldout"]["data_command"]
    assert "a note" in (folder / "card.md").read_text()
    model = load_model(folder / "model.pt")
    assert model.metadata["task"]["generate_args"] == args
    settle = card["steps_to_settle"]  # the runtime's gated steps, per tier, over every puzzle
    assert sum(row["n"] for row in settle["by_tier"]) == 8 and settle["max_steps"] == 2
    assert all(1 <= row["mean_steps"] <= 2 for row in settle["by_tier"])
    assert "Steps the runtime spends, by difficulty" in (folder / "card.md").read_text()
    deployed = card["steps_calibrated"]  # the same puzzles through the calibrated export, per precision
    assert [row["precision"] for row in deployed["by_precision"]] == ["fp32", "fp16", "int8"]
    assert all(sum(t["n"] for t in row["by_tier"]) == 8 for row in deployed["by_precision"])
    assert all(1 <= row["mean_steps"] for row in deployed["by_precision"])
    assert "(calibrated export)" in (folder / "card.md").read_text()
    with pytest.raises(Exception, match="--force"):
        make_bundle(out, "toy", generate_heldout, args, 99, [1], "toy", root=tmp_path / "bundled", calibrated=False)


def test_remeasure_reproduces_the_card_and_keeps_its_precision_section(tmp_path: Path) -> None:
    from eqr.bundling.card import make_bundle, remeasure
    from eqr.calibration.card import BEGIN, END
    from eqr.commands.bundle import generate_heldout

    out = tmp_path / "run"
    assert _run(*TINY, "--out", str(out), "--steps", "2").exit_code == 0
    args = ["--task", "sudoku", "--size", "4", "--blanks", "2:4", "--n", "8", "--split", "test"]
    card = make_bundle(out, "toy", generate_heldout, args, heldout_seed=99, depths=[1, 2], summary="toy", root=tmp_path / "bundled",
                       calibrated=False)
    folder = tmp_path / "bundled" / "toy"
    with (folder / "card.md").open("a") as f:
        f.write(f"{BEGIN}\nold precision table\n{END}\n")
    summary = {"puzzles": 8, "depth": 2, "reference": "torch-fp32", "passed": True, "runs": {}}
    (folder / "card.json").write_text(json.dumps(card | {"precision_report": summary}))
    again = remeasure("toy", generate_heldout, root=tmp_path / "bundled", calibrated=False)
    card = json.loads(json.dumps(card))  # as stored
    assert again["accuracy_by_depth"] == card["accuracy_by_depth"]  # same seed, same weights: same numbers
    assert again["steps_to_settle"] == card["steps_to_settle"] and again["training"] == card["training"]
    text = (folder / "card.md").read_text()
    assert text.count(BEGIN) == 1 and "old precision table" not in text and "8 puzzles, depth 2" in text


def test_card_accuracy_is_noise_free_by_default_and_remeasure_keeps_the_cards_noise(tmp_path: Path) -> None:
    from eqr.bundling.card import ema_model, make_bundle, remeasure
    from eqr.commands.bundle import generate_heldout
    from eqr.model.checkpoint import read_checkpoint
    from eqr.training.data import to_training_labels
    from eqr.training.evaluate import evaluate

    out = tmp_path / "run"
    assert _run(*TINY, "--out", str(out), "--steps", "2").exit_code == 0
    args = ["--task", "sudoku", "--size", "4", "--blanks", "4:10", "--n", "32", "--split", "test"]
    heldout = generate_heldout(args, 99, tmp_path / "heldout")
    model = ema_model(read_checkpoint(out / "last.pt"))

    def cells(noise: float) -> list[float]:
        report = evaluate(model, torch.as_tensor(heldout.inputs).long(), to_training_labels(heldout.labels),
                          [1, 2], seed=99, noise=noise)
        return [r["cell"] for r in report["by_depth"]]

    assert cells(0.0) != cells(3.0)  # a noise this large changes answers, so the test can tell them apart
    root = tmp_path / "bundled"
    card = make_bundle(out, "quiet", generate_heldout, args, heldout_seed=99, depths=[1, 2], summary="toy", root=root, calibrated=False)
    assert card["evaluation"]["noise_scale"] == 0.0
    assert [r["cell"] for r in card["accuracy_by_depth"]] == cells(0.0)
    assert "breadth 1, noise off)" in (root / "quiet" / "card.md").read_text()
    noisy = make_bundle(out, "noisy", generate_heldout, args, heldout_seed=99, depths=[1, 2], summary="toy", root=root, noise=3.0, calibrated=False)
    assert [r["cell"] for r in noisy["accuracy_by_depth"]] == cells(3.0)
    assert "breadth 1, noise on)" in (root / "noisy" / "card.md").read_text()
    assert [r["cell"] for r in remeasure("noisy", generate_heldout, root=root, calibrated=False)["accuracy_by_depth"]] == cells(3.0)
    switched = remeasure("noisy", generate_heldout, root=root, noise=0.0, calibrated=False)
    assert switched["evaluation"]["noise_scale"] == 0.0 and [r["cell"] for r in switched["accuracy_by_depth"]] == cells(0.0)


def test_init_from_starts_a_new_run_from_earlier_weights_and_keeps_its_history(tmp_path: Path) -> None:
    from eqr.bundling.card import run_chain

    first, second = tmp_path / "first", tmp_path / "second"
    assert _run(*TINY, "--out", str(first), "--steps", "2").exit_code == 0
    result = _run(*TINY, "--out", str(second), "--steps", "1", "--init-from", str(first / "last.pt"))
    assert result.exit_code == 0, result.output
    meta = load_model(second / "last.pt").metadata
    assert meta["init_from"]["steps"] == 2 and meta["init_from"]["path"] == str(first / "last.pt")
    chain = run_chain(meta)
    assert [run["steps"] for run in chain] == [2, 1]
    assert torch.load(second / "last.pt", weights_only=True)["train_state"]["step"] == 1
    refused = _run("--out", str(second), "--resume", "--init-from", str(first / "last.pt"))
    assert refused.exit_code == 2
