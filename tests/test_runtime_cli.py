"""`eqr solve` end to end: input formats, error records, JSON lines, backends, public hard puzzles."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import tiny_config
from runtime_helpers import contractive_model, export_onnx

from eqr.commands import cli
from eqr.model.checkpoint import save_checkpoint
from eqr.model.network import EqRModel
from eqr.tasks import get_task

# Peter Norvig's "top95" hard 9x9 Sudoku collection (public; written by none of us), verbatim
# apart from a source comment dropped from the first line.
TOP95 = """\
4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......
52...6.........7.13...........4..8..6......5...........418.........3..2...87.....
6.....8.3.4.7.................5.4.7.3..2.....1.6.......2.....5.....8.6......1....
48.3............71.2.......7.5....6....2..8.............1.76...3.....4......5....
....14....3....2...7..........9...3.6.1.............8.2.....1.4....5.6.....7.8...
......52..8.4......3...9...5.1...6..2..7........3.....6...1..........7.4.......3.
6.2.5.........3.4..........43...8....1....2........7..5..27...........81...6.....
.524.........7.1..............8.2...3.....6...9.5.....1.6.3...........897........
6.2.5.........4.3..........43...8....1....2........7..5..27...........81...6.....
.923.........8.1...........1.7.4...........658.........6.5.2...4.....7.....9.....
6..3.2....5.....1..........7.26............543.........8.15........4.2........7..
.6.5.1.9.1...9..539....7....4.8...7.......5.8.817.5.3.....5.2............76..8...
..5...987.4..5...1..7......2...48....9.1.....6..2.....3..6..2.......9.7.......5..
3.6.7...........518.........1.4.5...7.....6.....2......2.....4.....8.3.....5.....
1.....3.8.7.4..............2.3.1...........958.........5.6...7.....8.2...4.......
6..3.2....4.....1..........7.26............543.........8.15........4.2........7..
....3..9....2....1.5.9..............1.2.8.4.6.8.5...2..75......4.1..6..3.....4.6.
45.....3....8.1....9...........5..9.2..7.....8.........1..4..........7.2...6..8..
.237....68...6.59.9.....7......4.97.3.7.96..2.........5..47.........2....8.......
..84...3....3.....9....157479...8........7..514.....2...9.6...2.5....4......9..56
.98.1....2......6.............3.2.5..84.........6.........4.8.93..5...........1..
..247..58..............1.4.....2...9528.9.4....9...1.........3.3....75..685..2...
4.....8.5.3..........7......2.....6.....5.4......1.......6.3.7.5..2.....1.9......
.2.3......63.....58.......15....9.3....7........1....8.879..26......6.7...6..7..4
1.....7.9.4...72..8.........7..1..6.3.......5.6..4..2.........8..53...7.7.2....46
4.....3.....8.2......7........1...8734.......6........5...6........1.4...82......
.......71.2.8........4.3...7...6..5....2..3..9........6...7.....8....4......5....
6..3.2....4.....8..........7.26............543.........8.15........8.2........7..
.47.8...1............6..7..6....357......5....1..6....28..4.....9.1...4.....2.69.
......8.17..2........5.6......7...5..1....3...8.......5......2..4..8....6...3....
38.6.......9.......2..3.51......5....3..1..6....4......17.5..8.......9.......7.32
...5...........5.697.....2...48.2...25.1...3..8..3.........4.7..13.5..9..2...31..
.2.......3.5.62..9.68...3...5..........64.8.2..47..9....3.....1.....6...17.43....
.8..4....3......1........2...5...4.69..1..8..2...........3.9....6....5.....2.....
..8.9.1...6.5...2......6....3.1.7.5.........9..4...3...5....2...7...3.8.2..7....4
4.....5.8.3..........7......2.....6.....5.8......1.......6.3.7.5..2.....1.8......
1.....3.8.6.4..............2.3.1...........958.........5.6...7.....8.2...4.......
1....6.8..64..........4...7....9.6...7.4..5..5...7.1...5....32.3....8...4........
249.6...3.3....2..8.......5.....6......2......1..4.82..9.5..7....4.....1.7...3...
...8....9.873...4.6..7.......85..97...........43..75.......3....3...145.4....2..1
...5.1....9....8...6.......4.1..........7..9........3.8.....1.5...2..4.....36....
......8.16..2........7.5......6...2..1....3...8.......2......7..3..8....5...4....
.476...5.8.3.....2.....9......8.5..6...1.....6.24......78...51...6....4..9...4..7
.....7.95.....1...86..2.....2..73..85......6...3..49..3.5...41724................
.4.5.....8...9..3..76.2.....146..........9..7.....36....1..4.5..6......3..71..2..
.834.........7..5...........4.1.8..........27...3.....2.6.5....5.....8........1..
..9.....3.....9...7.....5.6..65..4.....3......28......3..75.6..6...........12.3.8
.26.39......6....19.....7.......4..9.5....2....85.....3..2..9..4....762.........4
2.3.8....8..7...........1...6.5.7...4......3....1............82.5....6...1.......
6..3.2....1.....5..........7.26............843.........8.15........8.2........7..
1.....9...64..1.7..7..4.......3.....3.89..5....7....2.....6.7.9.....4.1....129.3.
.........9......84.623...5....6...453...1...6...9...7....1.....4.5..2....3.8....9
.2....5938..5..46.94..6...8..2.3.....6..8.73.7..2.........4.38..7....6..........5
9.4..5...25.6..1..31......8.7...9...4..26......147....7.......2...3..8.6.4.....9.
...52.....9...3..4......7...1.....4..8..453..6...1...87.2........8....32.4..8..1.
53..2.9...24.3..5...9..........1.827...7.........981.............64....91.2.5.43.
1....786...7..8.1.8..2....9........24...1......9..5...6.8..........5.9.......93.4
....5...11......7..6.....8......4.....9.1.3.....596.2..8..62..7..7......3.5.7.2..
.47.2....8....1....3....9.2.....5...6..81..5.....4.....7....3.4...9...1.4..27.8..
......94.....9...53....5.7..8.4..1..463...........7.8.8..7.....7......28.5.26....
.2......6....41.....78....1......7....37.....6..412....1..74..5..8.5..7......39..
1.....3.8.6.4..............2.3.1...........758.........7.5...6.....8.2...4.......
2....1.9..1..3.7..9..8...2.......85..6.4.........7...3.2.3...6....5.....1.9...2.5
..7..8.....6.2.3...3......9.1..5..6.....1.....7.9....2........4.83..4...26....51.
...36....85.......9.4..8........68.........17..9..45...1.5...6.4....9..2.....3...
34.6.......7.......2..8.57......5....7..1..2....4......36.2..1.......9.......7.82
......4.18..2........6.7......8...6..4....3...1.......6......2..5..1....7...3....
.4..5..67...1...4....2.....1..8..3........2...6...........4..5.3.....8..2........
.......4...2..4..1.7..5..9...3..7....4..6....6..1..8...2....1..85.9...6.....8...3
8..7....4.5....6............3.97...8....43..5....2.9....6......2...6...7.71..83.2
.8...4.5....7..3............1..85...6.....2......4....3.26............417........
....7..8...6...5...2...3.61.1...7..2..8..534.2..9.......2......58...6.3.4...1....
......8.16..2........7.5......6...2..1....3...8.......2......7..4..8....5...3....
.2..........6....3.74.8.........3..2.8..4..1.6..5.........1.78.5....9..........4.
.52..68.......7.2.......6....48..9..2..41......1.....8..61..38.....9...63..6..1.9
....1.78.5....9..........4..2..........6....3.74.8.........3..2.8..4..1.6..5.....
1.......3.6.3..7...7...5..121.7...9...7........8.1..2....8.64....9.2..6....4.....
4...7.1....19.46.5.....1......7....2..2.3....847..6....14...8.6.2....3..6...9....
......8.17..2........5.6......7...5..1....3...8.......5......2..3..8....6...4....
963......1....8......2.5....4.8......1....7......3..257......3...9.2.4.7......9..
15.3......7..4.2....4.72.....8.........9..1.8.1..8.79......38...........6....7423
..........5724...98....947...9..3...5..9..12...3.1.9...6....25....56.....7......6
....75....1..2.....4...3...5.....3.2...8...1.......6.....1..48.2........7........
6.....7.3.4.8.................5.4.8.7..2.....1.3.......2.....5.....7.9......1....
....6...4..6.3....1..4..5.77.....8.5...8.....6.8....9...2.9....4....32....97..1..
.32.....58..3.....9.428...1...4...39...6...5.....1.....2...67.8.....4....95....6.
...5.3.......6.7..5.8....1636..2.......4.1.......3...567....2.8..4.7.......2..5..
.5.3.7.4.1.........3.......5.8.3.61....8..5.9.6..1........4...6...6927....2...9..
..5..8..18......9.......78....4.....64....9......53..2.6.........138..5....9.714.
..........72.6.1....51...82.8...13..4.........37.9..1.....238..5.4..9.........79.
...658.....4......12............96.7...3..5....2.8...3..19..8..3.6.....4....473..
.2.3.......6..8.9.83.5........2...8.7.9..5........6..4.......1...1...4.22..7..8.9
.5..9....1.....6.....3.8.....8.4...9514.......3....2..........4.8...6..77..15..6.
.....2.......7...17..3...9.8..7......2.89.6...13..6....9..5.824.....891..........
3...8.......7....51..............36...2..4....7...........6.13..452...........8..
"""


# tiny.onnx is a bare step graph without eqr metadata (a foreign .onnx): the flags describe it as
# the checkpoint's config does (init std 1.0, the unmeasured fp32 tol 1e-3).
FOREIGN = ("--init-std", "1.0", "--tol", "1e-3")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A contractive 4x4-Sudoku model as an eqr checkpoint and as an ONNX step file."""
    root = tmp_path_factory.mktemp("solve")
    model = contractive_model()
    save_checkpoint(root / "tiny.pt", model.config, model.state_dict())
    export_onnx(model, root / "tiny.onnx")
    return root


@pytest.fixture(scope="module")
def puzzles_file(artifacts):
    task = get_task("sudoku", 4)
    lines = [task.format_tokens(p) for p in task.generate(6, seed=3).inputs]
    lines.insert(2, "12.3")  # a malformed line: too short
    path = artifacts / "puzzles.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["solve", *args], input=input)


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_bad_line_gets_an_error_record_and_the_others_are_solved(artifacts, puzzles_file):
    result = run(str(artifacts / "tiny.pt"), "--input", str(puzzles_file), "--json")
    assert result.exit_code == 1, result.output
    records = json_lines(result.stdout)
    assert [r["line"] for r in records] == list(range(1, 8))
    assert "error" in records[2] and "expected 16 cells" in records[2]["error"]
    solved = [r for i, r in enumerate(records) if i != 2]
    for record in solved:
        assert len(record["answer"]) == 16 and record["steps"] > 0
        assert isinstance(record["converged"], bool) and isinstance(record["valid"], bool)
    assert "6 puzzles solved, 1 input errors" in result.stderr


def test_torch_checkpoint_and_onnx_give_the_same_answers_from_stdin(artifacts, puzzles_file):
    good = "\n".join(line for line in puzzles_file.read_text().splitlines() if len(line) == 16)
    outputs = []
    for artifact, backend, flags in (("tiny.pt", "torch", ()), ("tiny.onnx", "onnxruntime", FOREIGN)):
        result = run(str(artifacts / artifact), "--backend", backend, "--breadth", "2", "--seed", "3", "--json",
                     *flags, input=good)
        assert result.exit_code == 0, result.output
        outputs.append([(r["answer"], r["steps"], r["converged"]) for r in json_lines(result.stdout)])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6


def test_fixed_depth_runs_exactly_d_steps_per_trajectory(artifacts, puzzles_file):
    result = run(str(artifacts / "tiny.onnx"), "-i", str(puzzles_file), "--fixed-depth", "5", "--breadth", "3",
                 "--json", *FOREIGN)
    records = [r for r in json_lines(result.stdout) if "error" not in r]
    assert result.exit_code == 1 and len(records) == 6  # 1: the malformed line's error record
    assert all(r["steps"] == 15 and r["depth"] == 5 and not r["converged"] for r in records)


def test_csv_input_and_text_output(artifacts):
    task = get_task("sudoku", 4)
    generated = task.generate(3, seed=8)
    rows = [f"{task.format_tokens(p)},{task.format_tokens(s)}"
                                  for p, s in zip(generated.inputs, generated.labels)]
    path = artifacts / "puzzles.csv"
    path.write_text("\n".join(rows) + "\n")
    result = run(str(artifacts / "tiny.pt"), "-i", str(path), "--format", "csv")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all("\tline " in line and "steps" in line for line in lines)
    assert all(line.endswith(("\tcorrect", "\twrong")) for line in lines)  # the CSV has solutions
    assert "/3 correct" in result.stderr


def test_hrm_data_set_input_grades_against_its_labels(artifacts, tmp_path):
    from eqr.tasks.dataset import save_dataset

    task = get_task("sudoku", 4)
    generated = task.generate(4, seed=2)
    save_dataset(tmp_path / "data", "test", generated.inputs, generated.labels, task)
    result = run(str(artifacts / "tiny.onnx"), "-i", str(tmp_path / "data"), "--format", "hrm", "--json", *FOREIGN)
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    assert [r["line"] for r in records] == [0, 1, 2, 3]  # data set rows are numbered from 0
    solutions = [task.format_tokens(label) for label in generated.labels]
    assert [r["correct"] for r in records] == [r["answer"] == s for r, s in zip(records, solutions)]


def test_user_errors_are_one_line_exit_2(artifacts, puzzles_file):
    missing = run("no/such/model.pt", "-i", str(puzzles_file))
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ") and "no such file" in missing.stderr
    wrong_task = run(str(artifacts / "tiny.pt"), "-i", str(puzzles_file), "--task", "sudoku:9")
    assert wrong_task.exit_code == 2 and "pass the matching --task" in wrong_task.stderr
    foreign = run(str(artifacts / "tiny.onnx"), "-i", str(puzzles_file), "--tol", "1e-3")
    assert foreign.exit_code == 2 and foreign.stderr.count("\n") == 1
    assert "no eqr metadata" in foreign.stderr and "pass --init-std" in foreign.stderr
    no_engine = run(str(artifacts / "tiny.onnx"), "-i", str(puzzles_file), "--backend", "tensorrt", *FOREIGN)
    assert no_engine.exit_code == 2 and "tensorrt" in no_engine.stderr.lower()
    hrm_stdin = run(str(artifacts / "tiny.pt"), "--format", "hrm")
    assert hrm_stdin.exit_code == 2 and "--input DIR" in hrm_stdin.stderr
    assert "Traceback" not in missing.output + wrong_task.output + no_engine.output


def test_help_lists_examples():
    result = CliRunner().invoke(cli, ["solve", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output and "eqr solve" in result.output
    assert "[auto|tensorrt|onnxruntime|torch]" in result.output


def sudoku9_models() -> list[str]:
    """Bundled 9x9 Sudoku models, or "tiny" (a small random 9x9 model) when none is bundled."""
    from eqr.contract.bundled import bundled_names
    from eqr.runtime.resolve import load_artifact

    names = [n for n in bundled_names() if (load_artifact(n).seq_len, load_artifact(n).vocab_size) == (81, 11)]
    return names or ["tiny"]


@pytest.mark.parametrize("name", sudoku9_models())
def test_public_hard_9x9_collection_runs_without_a_crash(name, tmp_path):
    """Norvig's top95 through a 9x9 model: whatever its accuracy, every line gets a record."""
    if name == "tiny":
        model = EqRModel(tiny_config(seq_len=81, vocab_size=11, H_cycles=1, L_cycles=1, L_layers=1), seed=0)
        save_checkpoint(tmp_path / "sudoku9.pt", model.config, model.state_dict())
        name = str(tmp_path / "sudoku9.pt")
    (tmp_path / "top95.txt").write_text(TOP95)
    result = run(name, "-i", str(tmp_path / "top95.txt"), "--max-steps", "6", "--window", "0", "--json")
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    assert len(records) == 95 and [r["line"] for r in records] == list(range(1, 96))
    assert all(len(r["answer"]) == 81 and isinstance(r["valid"], bool) for r in records)
    assert all(1 <= r["steps"] <= 6 for r in records)


def test_json_records_and_summary_name_the_backend_and_provider(artifacts, puzzles_file):
    result = run(str(artifacts / "tiny.onnx"), "-i", str(puzzles_file), "--backend", "ONNXRuntime",
                 "--precision", "FP32", "--json", *FOREIGN)
    records = [r for r in json_lines(result.stdout) if "error" not in r]
    assert records and all(r["backend"] == {"backend": "onnxruntime", "device": "cpu", "precision": "fp32",
                                            "providers": ["CPUExecutionProvider"]} for r in records)
    assert "on onnxruntime (CPUExecutionProvider)" in result.stderr
    assert "solving: 6/6 in " in result.stderr  # no terminal: one line per stage, no bare label


def test_a_missing_gpu_provider_fails_in_one_line_unless_fallback(artifacts, puzzles_file):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    result = run(str(artifacts / "tiny.onnx"), "-i", str(puzzles_file), "--provider", "cuda", *FOREIGN)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: CUDAExecutionProvider is not available (this onnxruntime offers only ")
    assert "--fallback" in result.stderr and result.stderr.count("\n") == 1
    fallback = run(str(artifacts / "tiny.onnx"), "-i", str(puzzles_file), "--provider", "cuda", "--fallback", "-q",
                   "--json", *FOREIGN)
    assert fallback.exit_code == 1 and fallback.stderr == ""  # 1: the malformed line; -q: no progress, no summary
    assert {r["backend"]["providers"][0] for r in json_lines(fallback.stdout) if "backend" in r} == \
        {"CPUExecutionProvider"}
    wrong = run(str(artifacts / "tiny.pt"), "-i", str(puzzles_file), "--backend", "torch", "--provider", "cuda")
    assert wrong.exit_code == 2 and "--provider selects an ONNX Runtime provider" in wrong.stderr


def test_missing_graph_hint_names_the_precision_flag(artifacts, puzzles_file, tmp_path):
    int8_only = tmp_path / "model.step.int8.onnx"
    int8_only.write_bytes((artifacts / "tiny.onnx").read_bytes())
    result = run(str(int8_only), "-i", str(puzzles_file), "--backend", "onnxruntime", "--precision", "fp16",
                 *FOREIGN)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "pass --precision" in result.stderr or "eqr calibrate" in result.stderr


def test_solve_on_a_server_that_does_not_answer_says_so_in_one_line(monkeypatch):
    from eqr.serving import remote
    from eqr.serving.server import free_ports

    quick = remote.Retry(first_wait=0.01, max_wait=0.02)  # the default number of tries, shorter waits
    monkeypatch.setattr(remote, "Retry", lambda: quick)
    result = run("--server", f"http://127.0.0.1:{free_ports(1)[0]}", input="1" * 16 + "\n")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no answer from http://127.0.0.1:" in lines[0] and "8 tries" in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, why", [
    (["sudoku-small"], "drop ARTIFACT"),
    (["--precision", "fp16"], "the served model decides --precision"),
    (["--aggregate", "vote", "--tol", "0.1"], "decides --tol, --aggregate"),
    (["--server", "ftp://x:1"], "--server 'ftp://x:1'"),
])
def test_solve_server_refuses_what_the_served_model_decides(args, why):
    server = [] if "--server" in args else ["--server", "http://127.0.0.1:9"]
    result = run(*server, *args, input="")
    assert result.exit_code == 2 and why in result.output, result.output
