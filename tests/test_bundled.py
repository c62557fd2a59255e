"""Every bundled model loads by name and holds its card's accuracy on a fresh seeded held-out set."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from eqr.commands import cli
from eqr.commands.models import bundled_cards
from eqr.contract.bundled import bundled_dir, bundled_names
from eqr.model.load import load_model
from eqr.tasks import get_task
from eqr.training.data import to_training_labels
from eqr.training.evaluate import evaluate

FRESH_SEED = 424242  # neither a training seed nor the card's held-out seed
FRESH_N = 96
MAX_BYTES = 10 * 1024 * 1024
MAX_TRAINING_MINUTES = 180  # CPU budget per bundled model, every run of its lineage together


def test_there_are_sudoku_and_maze_bundles() -> None:
    tasks = {entry["task"] for entry in bundled_cards()}
    assert {"sudoku", "maze"} <= tasks, tasks


@pytest.mark.parametrize("name", bundled_names())
def test_bundled_model_matches_its_card(name: str) -> None:
    card = json.loads((bundled_dir() / name / "card.json").read_text())
    assert (bundled_dir() / name / "card.md").is_file()
    assert (bundled_dir() / name / "model.pt").stat().st_size <= MAX_BYTES
    for key in ("command", "seed", "wall_time_s"):
        assert card["training"][key] is not None, key
    assert card["training"]["wall_time_s"] <= MAX_TRAINING_MINUTES * 60
    model = load_model(name)
    assert model.source.kind == "bundled" and model.source.weights == "ema"
    assert model.metadata["task"]["name"] == card["task"]["name"]

    task = get_task(card["task"]["name"], card["task"]["size"])
    options = _options_from_args(card["heldout"]["generate_args"])
    puzzles = task.generate(FRESH_N, seed=FRESH_SEED, **options)
    claim = card["claim"]
    report = evaluate(model, torch.as_tensor(puzzles.inputs).long(), to_training_labels(puzzles.labels),
                      [claim["depth"]], seed=FRESH_SEED, noise=card["evaluation"]["noise_scale"])  # as measured
    exact = report["by_depth"][0]["exact"]
    # 96 puzzles: a binomial standard error of at most ~5 points; allow two of them
    assert exact >= claim["exact"] - 0.10, (name, exact, claim)


def _options_from_args(args: list[str]) -> dict:
    """The task options (--blanks/--path-len LO:HI, --tier) of `eqr data generate` arguments."""
    options = {}
    flags = {"--blanks": "blanks", "--path-len": "path_len"}
    for flag, key in flags.items():
        if flag in args:
            lo, _, hi = args[args.index(flag) + 1].partition(":")
            options[key] = (int(lo), int(hi or lo))
    if "--tier" in args:
        options["tier"] = args[args.index("--tier") + 1]
    return options


def test_models_command_lists_each_bundle_with_its_heldout_args() -> None:
    result = CliRunner().invoke(cli, ["models", "--json"])
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    assert sorted(e["name"] for e in entries) == bundled_names()
    for e in entries:
        assert "--seed" not in e["heldout_generate_args"] and "--out" not in e["heldout_generate_args"]
        assert e["heldout_generate_args"][:2] == ["--task", e["task"]]
        assert 0 < e["claimed_exact"] <= 1
    text = CliRunner().invoke(cli, ["models"]).output
    assert all(e["name"] in text for e in entries)


@pytest.mark.parametrize("name", bundled_names())
def test_info_describes_bundled_model(name: str) -> None:
    result = CliRunner().invoke(cli, ["info", name, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["source"]["kind"] == "bundled"
