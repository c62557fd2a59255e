"""The official breadth metrics (eqr.runtime.metrics) against hand-computed cases and a brute-force
pass@k; their place in `eqr solve --summary` and `eqr report`."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from eqr.contract.errors import EqRError
from eqr.runtime.aggregate import converged_top1
from eqr.runtime.metrics import convergence_order, official_metrics, pass_at_k, pass_k_values

A, B, C = [2, 3], [3, 2], [4, 4]  # three full answers of L = 2 tokens


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of the k-subsets of n samples (c of them correct) that hold a correct one."""
    flags = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(flags, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_pass_at_k_equals_the_enumeration_over_subsets(n: int) -> None:
    for k in range(1, n + 1):
        got = pass_at_k(n, np.arange(n + 1), k)
        assert got == pytest.approx([brute_pass_at_k(n, c, k) for c in range(n + 1)], abs=1e-12)
    with pytest.raises(EqRError, match="1 <= k <= n"):
        pass_at_k(n, np.zeros(1), n + 1)


def test_pass_k_ladder_is_the_official_powers_below_n_and_n() -> None:
    assert pass_k_values(1) == [1]
    assert pass_k_values(4) == [1, 2, 4]
    assert pass_k_values(6) == [1, 2, 4, 6]
    assert pass_k_values(300) == [1, 2, 4, 8, 16, 32, 64, 128, 300]


def test_pass_rates_any_correct_and_pass_at_k_by_hand() -> None:
    labels = np.array([A, A])
    preds = np.array([[B, A, A, C], [B, B, C, C]])  # (P=2, K=4, L=2): 2 correct, then 0
    m = official_metrics(preds, np.zeros((2, 4)), np.ones((2, 4), bool), labels)
    assert m["different_init/n"] == 4 and m["different_init/total_samples"] == 2
    assert m["different_init/avg_pass_rate"] == pytest.approx(0.25)
    assert m["different_init/any_correct"] == pytest.approx(0.5)
    assert m["different_init/pass@1"] == pytest.approx(0.25)
    assert m["different_init/pass@2"] == pytest.approx((1 - 1 / 6) / 2)  # 1 - C(2,2)/C(4,2), then 0
    assert m["different_init/pass@4"] == pytest.approx(0.5)
    assert "different_init/pass@8" not in m


def test_majority_vote_ties_go_to_the_earliest_trajectory_and_diverged_ones_never_win() -> None:
    labels = np.array([A, B, A, A])
    preds = np.array([[A, B, B, A],  # tie 2-2: A was given first and wins (correct)
                      [A, B, A, C],  # A at 0 diverged: a 1-1-1 tie, the earliest voter B wins (correct)
                      [A, A, A, B],  # three diverged A: the one valid B wins (wrong)
                      [A, A, A, A]])  # all diverged: no answer counts (wrong)
    valid = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], bool)
    m = official_metrics(preds, np.zeros((4, 4)), valid, labels)
    assert m["majority_vote/exact_accuracy"] == pytest.approx(0.5)
    assert m["majority_vote/accuracy"] == pytest.approx(4 / 8)  # tokens of puzzles 0 and 1 of 8
    assert m["majority_vote/num_samples"] == 4
    # diverged trajectories count as wrong everywhere: c = 2, 1, 0, 0
    assert m["different_init/avg_pass_rate"] == pytest.approx((2 + 1) / 16)


def test_majority_token_accuracy_skips_pad_positions() -> None:
    labels = np.array([[0, 3, 4]])  # position 0 is PAD
    preds = np.array([[[5, 3, 1]]])  # (1, 1, 3): the PAD position and one cell wrong
    m = official_metrics(preds, np.zeros((1, 1)), np.ones((1, 1), bool), labels)
    assert m["majority_vote/accuracy"] == pytest.approx(0.5) and m["majority_vote/exact_accuracy"] == 0.0


def test_convergence_top_k_by_hand() -> None:
    labels = np.array([A, A])
    preds = np.array([[A, B, A, A, C], [B, A, C, A, A]])  # (P=2, K=5, L=2)
    score = np.array([[0.3, 0.1, 0.3, 0.2, 0.9],  # order 1 (B), 3 (A), 0 (A), 2 (A; ties 0, goes after it), 4
                      [0.0, 0.5, 0.4, 0.6, 0.1]])  # 0 diverged (lowest score, goes last): order 4 (A), 2 (C), 1, 3, 0
    valid = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], bool)
    assert convergence_order(score, valid).tolist() == [[1, 3, 0, 2, 4], [4, 2, 1, 3, 0]]
    m = official_metrics(preds, score, valid, labels, top_k=3)
    # top 3 correct: [F, T, T] and [T, F, T]
    assert m["convergence_top_k/k"] == 3 and m["convergence_top_k/total_samples"] == 2
    assert m["convergence_top_k/exact_accuracy"] == pytest.approx(4 / 6)
    assert m["convergence_top_k/any_correct"] == 1.0
    assert m["convergence_top_k/cumulative_exact_acc_top1"] == pytest.approx(0.5)
    assert m["convergence_top_k/cumulative_exact_acc_top2"] == pytest.approx(2 / 4)
    assert m["convergence_top_k/cumulative_exact_acc_top3"] == pytest.approx(4 / 6)
    assert m["convergence_top_k/pass@1"] == pytest.approx(4 / 6)
    assert m["convergence_top_k/pass@2"] == pytest.approx(1 - 0 / 3)  # c = 2 of 3: every pair holds one
    assert m["convergence_top_k/pass@3"] == 1.0 and "convergence_top_k/pass@4" not in m
    assert m["convergence_top_k/avg_convergence_score"] == pytest.approx(((0.1 + 0.2 + 0.3) + (0.1 + 0.4 + 0.5)) / 6)


def test_top_k_is_capped_at_the_breadth_and_absent_at_breadth_1() -> None:
    labels = np.array([A])
    two = official_metrics(np.array([[B, A]]), np.array([[0.2, 0.1]]), np.ones((1, 2), bool), labels, top_k=4)
    assert two["convergence_top_k/k"] == 2 and two["convergence_top_k/cumulative_exact_acc_top1"] == 1.0
    assert two["convergence_top_k/cumulative_exact_acc_top2"] == 0.5
    one = official_metrics(np.array([[A]]), np.array([[0.2]]), np.ones((1, 1), bool), labels)
    assert not any(key.startswith("convergence_top_k/") for key in one)
    assert one["different_init/pass@1"] == 1.0 and one["majority_vote/exact_accuracy"] == 1.0


def test_top_1_is_the_converged_aggregators_choice() -> None:
    rng = np.random.default_rng(0)
    P, K, L = 64, 6, 3
    preds = rng.integers(1, 3, (P, K, L))
    score = rng.integers(0, 4, (P, K)).astype(np.float32)  # many ties
    valid = rng.random((P, K)) < 0.8
    valid[0] = True
    labels = preds[np.arange(P), converged_top1(preds, score, valid)]  # the rule's answer is always right
    has_valid = valid.any(axis=1).mean()
    m = official_metrics(preds, score, valid, labels, top_k=2)
    assert m["convergence_top_k/cumulative_exact_acc_top1"] == pytest.approx(has_valid)


def test_all_diverged_puzzle_has_no_score_and_counts_wrong() -> None:
    m = official_metrics(np.array([[A, A]]), np.array([[np.nan, 0.1]]), np.zeros((1, 2), bool), np.array([A]))
    assert m["convergence_top_k/avg_convergence_score"] is None
    assert m["convergence_top_k/any_correct"] == 0.0 and m["different_init/any_correct"] == 0.0
    json.dumps(m)  # JSON-able as it is


def test_bad_shapes_are_one_line_errors() -> None:
    preds, ok = np.zeros((2, 3, 4), int), np.ones((2, 3), bool)
    with pytest.raises(EqRError, match=r"labels \(2, 4\)"):
        official_metrics(preds, np.zeros((2, 3)), ok, np.zeros((2, 5), int))
    with pytest.raises(EqRError, match=r"preds must be \(P, K, L\)"):
        official_metrics(np.zeros((2, 4), int), np.zeros((2, 3)), ok, np.zeros((2, 4), int))
    with pytest.raises(EqRError, match="top-k must be >= 1"):
        official_metrics(preds, np.zeros((2, 3)), ok, np.zeros((2, 4), int), top_k=0)


# --------------------------------------------------------------------------- eqr solve --summary

P, K, DEPTH = 6, 3, 4


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    """A random tiny 4x4 model, and an hrm data set labelled with trajectory p % K's own answer
    (the last puzzle with an answer no trajectory gives), so every metric has something to count."""
    from conftest import tiny_config

    from eqr.model.checkpoint import save_checkpoint
    from eqr.model.network import EqRModel
    from eqr.runtime import Solver
    from eqr.tasks import get_task
    from eqr.tasks.dataset import save_dataset

    root = tmp_path_factory.mktemp("metrics")
    model = EqRModel(tiny_config(), seed=0).eval()
    save_checkpoint(root / "tiny.pt", model.config, model.state_dict(), metadata={"task": {"name": "sudoku", "size": 4}})
    task = get_task("sudoku", 4)
    inputs = task.generate(P, seed=5).inputs
    with Solver.load(root / "tiny.pt", backend="torch") as solver:
        result = solver.solve(inputs, fixed_depth=DEPTH, breadth=K, seed=0, keep_trajectories=True)
    assert result.trajectory_preds.shape == (P, K, 16)
    assert (result.trajectory_preds[np.arange(P), result.chosen] == result.preds).all()
    labels = result.trajectory_preds[np.arange(P), np.arange(P) % K].copy()
    labels[-1] = 2 + (labels[-1] - 1) % 4  # every cell a different digit: nobody's answer
    save_dataset(root / "data", "test", inputs, labels.astype(np.uint8), task)
    return root, result, labels


def solve_cli(*args):
    from click.testing import CliRunner

    from eqr.commands import cli

    return CliRunner().invoke(cli, ["solve", *map(str, args)])


def test_solve_summary_carries_the_official_metrics(labelled_run) -> None:
    from eqr.runtime.metrics import result_metrics

    root, result, labels = labelled_run
    summaries = {}
    for aggregate in ("vote", "converged"):
        out = root / f"{aggregate}.json"
        run = solve_cli(root / "tiny.pt", "-i", root / "data", "--format", "hrm", "--breadth", K, "--fixed-depth",
                        DEPTH, "--aggregate", aggregate, "--top-k", 2, "--summary", out, "--json")
        assert run.exit_code == 0, run.output
        records = [json.loads(line) for line in run.stdout.splitlines()]
        assert len(records) == P  # stdout keeps one record per puzzle
        summaries[aggregate] = summary = json.loads(out.read_text())
        assert summary["puzzles"] == summary["graded"] == P and summary["breadth"] == K
        assert summary["correct"] == sum(r["correct"] for r in records)
        assert "majority" in run.stderr and f"pass@{K}" in run.stderr
    metrics = summaries["vote"]["official_metrics"]
    assert metrics == pytest.approx(result_metrics(result, labels, top_k=2))  # the CLI grades the API's trajectories
    assert metrics["different_init/any_correct"] == pytest.approx((P - 1) / P)
    assert metrics["convergence_top_k/k"] == 2 and f"different_init/pass@{K}" in metrics
    # each aggregate's own answers are graded in the records: the metrics name the same accuracy
    assert metrics["majority_vote/exact_accuracy"] == pytest.approx(summaries["vote"]["correct"] / P)
    top1 = summaries["converged"]["official_metrics"]["convergence_top_k/cumulative_exact_acc_top1"]
    assert top1 == pytest.approx(summaries["converged"]["correct"] / P)


def test_solve_summary_without_solutions_has_no_metrics(labelled_run, tmp_path) -> None:
    from eqr.tasks import get_task

    root = labelled_run[0]
    task = get_task("sudoku", 4)
    generated = task.generate(3, seed=5)
    inputs, labels = generated.inputs, generated.labels
    rows = [f"{task.format_tokens(inputs[0])},{task.format_tokens(labels[0])}", task.format_tokens(inputs[1])]
    (tmp_path / "some.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "none.txt").write_text(task.format_tokens(inputs[2]) + "\n")
    some = solve_cli(root / "tiny.pt", "-i", tmp_path / "some.csv", "--format", "csv", "--breadth", 2,
                     "--fixed-depth", DEPTH, "--summary", tmp_path / "some.json")
    assert some.exit_code == 0, some.output
    graded = json.loads((tmp_path / "some.json").read_text())
    assert graded["puzzles"] == 2 and graded["official_metrics"]["different_init/total_samples"] == 1
    plain = solve_cli(root / "tiny.pt", "-i", tmp_path / "none.txt", "--breadth", 2, "--summary", tmp_path / "n.json")
    assert plain.exit_code == 0, plain.output
    summary = json.loads((tmp_path / "n.json").read_text())
    assert summary["official_metrics"] is None and summary["graded"] == 0 and summary["puzzles"] == 1
    assert "majority" not in plain.stderr
    to_stderr = solve_cli(root / "tiny.pt", "-i", tmp_path / "some.csv", "--format", "csv", "--summary", "-", "--json")
    line = next(line for line in to_stderr.stderr.splitlines() if line.startswith("{"))
    assert json.loads(line)["graded"] == 1 and len(to_stderr.stdout.splitlines()) == 2  # stdout: the records only


# --------------------------------------------------------------------------- eqr report


def test_report_collects_the_deepest_trajectories_of_the_fixed_depth_run() -> None:
    from conftest import tiny_config

    from eqr.calibration.collect import depth_runs
    from eqr.model.network import EqRModel
    from eqr.runtime import Solver
    from eqr.runtime.metrics import trajectories_of

    model = EqRModel(tiny_config(), seed=1).eval()
    tokens = np.random.default_rng(1).integers(1, 6, size=(4, 16))
    with Solver.from_model(model) as solver:
        _, kept = depth_runs(solver, tokens, 3, (2, 5), seed=3)
        separate = trajectories_of(solver.solve(tokens, fixed_depth=5, breadth=3, seed=3, keep_trajectories=True))
    for got, want in zip(kept, separate):  # preds, score (the loop's own), valid
        np.testing.assert_allclose(got, want, rtol=1e-6)


def report_of(labels_known: bool, breadth: tuple[int, ...] = (1, 4)) -> dict:
    """compare() on synthetic results: torch-fp32 answers every trajectory right, int8 only trajectory 0."""
    from eqr.calibration.collect import Results, curve_key, curve_keys, trajectory_key
    from eqr.calibration.compare import compare
    from eqr.calibration.config import ReportConfig

    cfg = ReportConfig(depths=(2, 8), breadth=breadth, top_k=2, min_agreement=0.0, max_drop=100.0)
    n, L = 5, 4
    labels = np.arange(n * L).reshape(n, L) % 4 + 1
    results = Results({"artifact": "synthetic"}, labels.copy(), labels if labels_known else None)
    for name, right in (("torch-fp32", 4), ("onnxruntime-int8", 1)):
        trace = np.tile(np.geomspace(1.0, 1e-4, 8), (n, 1)).astype(np.float32)
        run = {"precision": name.split("-")[1], "backend": name.split("-")[0], "tol": 1e-3,
               "curve": {curve_key(a, k, d): labels for a, k, d in curve_keys(cfg)},
               "fixed": {"preds": labels, "score": np.linspace(0, 1, n), "residual_trace": trace},
               "gated": {"nstep": np.full(n, 4), "converged": np.ones(n, bool), "residual": trace[:, -1],
                         "preds": labels, "residual_trace": trace[:, :4]},
               "one_step": {}, "settled": np.ones((2, 2, L, 2), np.float32),
               "radius": np.array([0.8, 0.8]), "radius_history": np.array([[0.8, 0.8]]), "trajectories": {}}
        for K in (k for k in breadth if k > 1):
            preds = np.repeat(labels[:, None], K, axis=1)  # (n, K, L)
            preds[:, right:, 0] += 1
            key = trajectory_key(K, 8)
            run["trajectories"] |= {f"{key}/preds": preds, f"{key}/valid": np.ones((n, K), bool),
                                    f"{key}/score": np.tile(np.arange(K, 0, -1, dtype=np.float32), (n, 1))}
        results.runs[name] = run
    return compare(results, cfg)


def test_report_json_and_rendering_carry_the_official_metrics_per_precision() -> None:
    from eqr.calibration.render import markdown, official_tables, to_html
    from eqr.calibration.report import official_lines

    report = json.loads(json.dumps(report_of(labels_known=True)))  # as report.json holds it
    int8 = report["runs"]["onnxruntime-int8"]["official_metrics"]["K=4"]
    assert int8["breadth"] == 4 and int8["depth"] == 8 and int8["top_k"] == 2
    m = int8["metrics"]
    # scores fall with the index: the two most converged are trajectories 3 and 2, both wrong for int8
    assert m["convergence_top_k/cumulative_exact_acc_top1"] == 0.0 and m["majority_vote/exact_accuracy"] == 0.0
    assert m["different_init/avg_pass_rate"] == pytest.approx(0.25) and m["different_init/any_correct"] == 1.0
    fp32 = report["runs"]["torch-fp32"]["official_metrics"]["K=4"]["metrics"]
    assert fp32["convergence_top_k/exact_accuracy"] == 1.0 and fp32["different_init/pass@4"] == 1.0
    [(title, table)] = official_tables(report)
    assert title == "K=4, depth 8, top-2, 5 puzzles" and table[0] == ["metric", "torch-fp32", "onnxruntime-int8"]
    rows = {row[0]: row[1:] for row in table[1:]}
    assert rows["different_init/pass@1"] == ["100.0%", "25.0%"] and "different_init/n" not in rows
    text, html = markdown(report), to_html(report)
    assert "## Official metrics: K=4, depth 8, top-2, 5 puzzles" in text
    assert "| majority_vote/exact_accuracy | 100.0% | 0.0% |" in text
    assert "<h2>Official metrics: K=4, depth 8, top-2, 5 puzzles</h2>" in html and "<td>25.0%</td>" in html
    assert official_lines(report) == [  # eqr report's summary on stdout
        "official metrics torch-fp32 K=4 depth 8: majority 100.0%, converged top-1 100.0%, top-2 100.0%, pass@4 100.0%",
        "official metrics onnxruntime-int8 K=4 depth 8: majority 0.0%, converged top-1 0.0%, top-2 0.0%, pass@4 100.0%"]


def test_report_has_no_official_metrics_without_labels_or_breadth() -> None:
    from eqr.calibration.render import markdown

    for report in (report_of(labels_known=False), report_of(labels_known=True, breadth=(1,))):
        assert all(run["official_metrics"] == {} for run in report["runs"].values())
        assert "Official metrics" not in markdown(report)


def test_top_k_flags_refuse_zero(labelled_run) -> None:
    from eqr.calibration.config import ReportConfig

    with pytest.raises(EqRError, match="--top-k must be >= 1"):
        ReportConfig(top_k=0)
    refused = solve_cli(labelled_run[0] / "tiny.pt", "--top-k", 0)
    assert refused.exit_code == 2 and "--top-k" in refused.output
