"""HRM/EqR data set directories, puzzle file readers and the `eqr data` CLI."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

from eqr.commands import cli
from eqr.contract.errors import EqRError
from eqr.tasks import get_task
from eqr.tasks.dataset import check_split, load_dataset, save_dataset
from eqr.tasks.io import read_puzzles

EASY_9 = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
EASY_9_SOLVED = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def test_save_load_round_trip(tmp_path):
    task = get_task("sudoku", 6)
    puzzles = task.generate(6, seed=0)
    groups = np.array([0, 2, 6])
    split_dir = save_dataset(tmp_path, "train", puzzles.inputs, puzzles.labels, task=task, groups=groups,
                             generate_args={"seed": 0})
    assert json.loads((tmp_path / "identifiers.json").read_text()) == ["<blank>"]
    data = load_dataset(tmp_path, "train")
    assert np.array_equal(data.inputs, puzzles.inputs) and np.array_equal(data.labels, puzzles.labels)
    assert data.inputs.dtype == np.uint8 and list(data.group_indices) == [0, 2, 6]
    assert data.task == task and data.metadata["eqr_task"]["generate_args"] == {"seed": 0}
    assert data.metadata["vocab_size"] == 8 and data.metadata["total_groups"] == 2
    assert np.load(split_dir / "all__puzzle_identifiers.npy").dtype == np.int32
    assert load_dataset(split_dir).path == split_dir  # a split directory works too
    with pytest.raises(EqRError, match="--force"):
        save_dataset(tmp_path, "train", puzzles.inputs, puzzles.labels, task=task)
    save_dataset(tmp_path, "train", puzzles.inputs[:2], puzzles.labels[:2], task=task, overwrite=True)
    assert len(load_dataset(tmp_path, "train")) == 2
    with pytest.raises(EqRError, match="groups"):
        save_dataset(tmp_path, "x", puzzles.inputs, puzzles.labels, groups=np.array([0, 7]))


def test_official_layout_without_eqr_task_infers_the_task(tmp_path):
    maze = get_task("maze", 30)
    puzzles = maze.generate(2, seed=0)
    save_dataset(tmp_path, "test", puzzles.inputs, puzzles.labels)  # no task: like an official directory
    metadata = json.loads((tmp_path / "test" / "dataset.json").read_text())
    assert "eqr_task" not in metadata
    metadata["vocab_size"] = 6  # official: the full vocabulary
    (tmp_path / "test" / "dataset.json").write_text(json.dumps(metadata))
    assert load_dataset(tmp_path, "test").task == maze
    assert check_split(tmp_path / "test").ok


def test_check_reports_bad_rows_and_files(tmp_path):
    task = get_task("sudoku", 4)
    puzzles = task.generate(8, seed=1)
    split_dir = save_dataset(tmp_path, "test", puzzles.inputs, puzzles.labels, task=task)
    assert check_split(split_dir, deep=True).ok
    labels = puzzles.labels.copy()
    labels[5, [0, 1]] = labels[5, [1, 0]]
    np.save(split_dir / "all__labels.npy", labels)
    report = check_split(split_dir)
    assert not report.ok and [row for row, _ in report.problems] == [5]
    metadata = json.loads((split_dir / "dataset.json").read_text())
    metadata["total_samples"] = 9
    (split_dir / "dataset.json").write_text(json.dumps(metadata))
    assert any("total_samples" in e for e in check_split(split_dir).errors)
    (split_dir / "all__inputs.npy").write_bytes(b"not numpy")
    assert "not a readable .npy" in check_split(split_dir).errors[0]


def test_deep_check_catches_non_unique_sudoku(tmp_path):
    task = get_task("sudoku", 4)
    puzzles = task.generate(3, seed=2)
    inputs = puzzles.inputs.copy()
    inputs[1] = 1  # every cell blank: the label still fits, but the puzzle has many solutions
    split_dir = save_dataset(tmp_path, "test", inputs, puzzles.labels, task=task)
    assert check_split(split_dir).ok
    report = check_split(split_dir, deep=True)
    assert report.problems == [(1, "puzzle has more than one solution")]


def test_read_text_skips_comments_and_reports_bad_lines(tmp_path):
    path = tmp_path / "puzzles.txt"
    path.write_bytes(f"# collection\r\n{EASY_9}\r\n\r\n{EASY_9[:-3]}\r\n{EASY_9.replace('.', '0')}  # ok\r\n".encode())
    entries = read_puzzles(path, "text")
    assert [line for line, _ in entries] == [2, 4, 5]
    assert isinstance(entries[0][1], np.ndarray) and np.array_equal(entries[0][1], entries[2][1])
    assert "expected 81 cells" in entries[1][1]
    stream_entries = read_puzzles(io.StringIO(f"{EASY_9}\n"), "text")
    assert np.array_equal(stream_entries[0][1], entries[0][1])


def test_read_maze_text_keeps_spaces():
    task = get_task("maze", 9)
    maze = task.generate(1, seed=4).inputs[0]
    text = "\n" + task.format_tokens(maze) + "\n#########\n"
    entries = read_puzzles(io.StringIO(text), "text", task=task)
    assert entries[0][0] == 2 and np.array_equal(entries[0][1], maze)
    assert entries[1][0] == 3 and "expected 9 rows" in entries[1][1]


@pytest.mark.parametrize("header", ["source,question,answer,rating\n", "puzzle,solution\n", ""])
def test_read_csv_with_or_without_header(header):
    extra = "hand," if header.startswith("source") or header == "" else ""
    tail = ",3.1" if extra else ""
    text = (header + f"{extra}{EASY_9},{EASY_9_SOLVED}{tail}\n" + f"{extra}{EASY_9[:10]},{EASY_9_SOLVED}{tail}\n"
            + f"{extra}{EASY_9},{EASY_9_SOLVED[:-1]}1{tail}\n")
    entries = read_puzzles(io.StringIO(text), "csv", with_solutions=True)
    first_line = 2 if header else 1
    assert [line for line, _, _ in entries] == [first_line, first_line + 1, first_line + 2]
    line, tokens, solution = entries[0]
    task = get_task("sudoku", 9)
    assert task.is_valid(tokens, solution)[0]
    assert isinstance(entries[1][1], str) and "expected 81 cells" in entries[1][1]
    assert isinstance(entries[2][1], np.ndarray)  # a wrong but well-formed solution is still read
    assert not task.is_valid(entries[2][1], entries[2][2])[0]
    assert [line for line, _ in read_puzzles(io.StringIO(text), "csv")] == [line for line, _, _ in entries]


def test_read_csv_reports_a_bad_first_line_instead_of_taking_it_for_a_header():
    text = f"{EASY_9[:-1]}x,{EASY_9_SOLVED}\n{EASY_9},{EASY_9_SOLVED}\n"
    entries = read_puzzles(io.StringIO(text), "csv")
    assert entries[0][0] == 1 and isinstance(entries[0][1], str) and "cell 81 is 'x'" in entries[0][1]
    assert entries[1][0] == 2 and isinstance(entries[1][1], np.ndarray)


def test_read_hrm_directory(tmp_path):
    task = get_task("sudoku", 4)
    puzzles = task.generate(3, seed=0)
    save_dataset(tmp_path, "test", puzzles.inputs, puzzles.labels, task=task)
    entries = read_puzzles(tmp_path, "hrm", task=task, with_solutions=True)
    assert [index for index, _, _ in entries] == [0, 1, 2]
    assert np.array_equal(entries[2][2], puzzles.labels[2])
    with pytest.raises(EqRError, match="format"):
        read_puzzles(tmp_path, "xml")
    with pytest.raises(EqRError, match="cannot read"):
        read_puzzles(tmp_path / "missing.txt", "text")


def _run(*args: str):
    return CliRunner().invoke(cli, ["data", *args])


def test_cli_generate_then_check(tmp_path):
    out = tmp_path / "s4"
    result = _run("generate", "--task", "sudoku", "--size", "4", "--n", "30", "--seed", "0", "--out", str(out),
                  "--augment", "3", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == 120 and summary["groups"] == 30
    assert _run("generate", "--task", "sudoku", "--size", "4", "--n", "20", "--out", str(out), "--split", "test",
                "--tier", "easy").exit_code == 0
    train, test = load_dataset(out, "train"), load_dataset(out, "test")
    assert len(train.group_indices) == 31
    assert not {r.tobytes() for r in train.inputs} & {r.tobytes() for r in test.inputs}
    assert (get_task("sudoku", 4).tier_of(test.inputs) == "easy").all()
    result = _run("check", str(out), "--deep")
    assert result.exit_code == 0, result.output
    assert "train: ok, 120 rows" in result.output and "test: ok, 20 rows" in result.output

    again = _run("generate", "--task", "sudoku", "--size", "4", "--n", "5", "--out", str(out))
    assert again.exit_code == 2 and "--force" in again.output


def test_cli_check_reports_a_corrupted_row(tmp_path):
    out = tmp_path / "m9"
    assert _run("generate", "--task", "maze", "--size", "9", "--n", "12", "--out", str(out), "--split", "test",
                "--path-len", "6:10").exit_code == 0
    labels = np.load(out / "test" / "all__labels.npy")
    labels[3][labels[3] == 5] = 2  # erase the path of row 3
    np.save(out / "test" / "all__labels.npy", labels)
    result = _run("check", str(out))
    assert result.exit_code == 1
    assert "test row 3: answer's 'o' squares do not connect S to G" in result.output
    report = json.loads(_run("check", str(out / "test"), "--json").stdout)
    assert report["ok"] is False and report["splits"][0]["problems"][0]["row"] == 3


@pytest.mark.parametrize("args,message", [
    (["check", "/nonexistent/data"], "is not a directory"),
    (["generate", "--task", "maze", "--size", "8", "--n", "2", "--out", "OUT"], "maze size must be in 9..30"),
    (["generate", "--task", "maze", "--size", "9", "--n", "2", "--out", "OUT", "--blanks", "3:4"], "--blanks is for sudoku"),
    (["generate", "--task", "sudoku", "--size", "4", "--n", "2", "--out", "OUT", "--blanks", "a:b"], "LO:HI"),
    (["generate", "--task", "sudoku", "--size", "4", "--n", "2", "--out", "OUT", "--tier", "wild"], "unknown sudoku tier"),
])
def test_cli_bad_input_is_one_error_line(tmp_path, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = _run(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert result.stderr.count("error:") == 1


def test_read_csv_header_of_a_small_board_is_not_taken_for_a_puzzle():
    """'solution' is half a 4x4 puzzle long: the header is recognised by its column names."""
    task = get_task("sudoku", 4)
    puzzles = task.generate(2, seed=3)
    rows = [f"{task.format_tokens(p)},{task.format_tokens(s)}" for p, s in zip(puzzles.inputs, puzzles.labels)]
    entries = read_puzzles(io.StringIO("puzzle,solution\n" + "\n".join(rows) + "\n"), "csv", task=task,
                           with_solutions=True)
    assert [line for line, _, _ in entries] == [2, 3]
    assert np.array_equal(entries[0][1], puzzles.inputs[0]) and np.array_equal(entries[1][2], puzzles.labels[1])
