"""`eqr export`: step graphs (FP32/FP16/INT8) in ONNX Runtime with the I/O contract, the
manifest, the checks at export, and one-line errors that leave no files behind."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config
from official import write_official_checkpoint

from eqr.calibration.record import int8_calibration
from eqr.commands import cli
from eqr.contract.artifact import (INPUT_NAMES, METADATA_KEY, OUTPUT_NAMES, PRECISION_KEY, PRECISIONS, graph_feeds,
                                   read_manifest, recommended_tol)
from eqr.contract.bundled import bundled_names
from eqr.contract.errors import EqRError
from eqr.export import ExportConfig, parse_batch
from eqr.export.exporter import ExportError, export_model
from eqr.export.inputs import infer_task, task_inputs
from eqr.export.onnx_graph import session
from eqr.export.parity import check_depths
from eqr.model.checkpoint import save_checkpoint
from eqr.model.network import EqRModel
from eqr.model.step_graph import StepGraph

FAST = dict(check_batch=2, check_steps=6)  # small checks: the tiny model's numbers, not the paper's
FAST_FLAGS = ["--check-batch", "2", "--check-steps", "4"]
SUDOKU4 = {"task": {"name": "sudoku", "size": 4}}  # tiny_config is the 4x4 Sudoku layout


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _feeds(model: EqRModel, batch: int, seed: int = 3) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    state = model.initial_state(batch, generator=g)
    tokens = torch.randint(1, model.config.vocab_size, (batch, model.config.seq_len), generator=g, dtype=torch.int32)
    return graph_feeds(tokens.numpy(), state.z_H.numpy(), state.z_L.numpy())


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[EqRModel, Path, dict]:
    """One library export of every precision of a tiny Sudoku-4x4 model, INT8 calibrated on
    recorded states from a --calib-data file."""
    model = EqRModel(tiny_config(), seed=0).eval()
    model.metadata = dict(SUDOKU4)
    root = tmp_path_factory.mktemp("export")
    feeds = _feeds(model, 5)
    np.savez(root / "calib.npz", tokens=feeds["tokens"], z_H=feeds["z_H"], z_L=feeds["z_L"])
    config = ExportConfig(precision=("fp16", "int8", "int8-cpu"), engine="never", calib_data=str(root / "calib.npz"), **FAST)
    return model, root / "tiny-eqr", export_model(model, root / "tiny-eqr", config,
                                                  calibrate=int8_calibration(model, config))


# --------------------------------------------------------------------------- graphs and contract


def test_every_graph_runs_in_onnxruntime_with_the_io_contract_at_any_batch(exported) -> None:
    model, out, _ = exported
    L, D, V = model.config.seq_len, model.config.hidden_size, model.config.vocab_size
    want = {"z_H_out": (np.float32, (3, L, D)), "z_L_out": (np.float32, (3, L, D)), "logits": (np.float32, (3, L, V)),
            "preds": (np.int32, (3, L)), "residual": (np.float32, (3,)), "logit_delta": (np.float32, (3,)),
            "q_halt": (np.float32, (3,))}
    for precision, name in ((p, row.onnx) for p, row in PRECISIONS.items()):
        sess = session(str(out / name))
        assert [i.name for i in sess.get_inputs()] == list(INPUT_NAMES)
        assert [(i.type, i.shape[0]) for i in sess.get_inputs()] == [("tensor(int32)", "B"), ("tensor(float)", "B"),
                                                                     ("tensor(float)", "B"), ("tensor(bool)", "B")]
        values = dict(zip(OUTPUT_NAMES, sess.run(None, _feeds(model, 3))))
        assert list(values) == [o.name for o in sess.get_outputs()], precision
        for key, (dtype, shape) in want.items():
            assert values[key].dtype == dtype and values[key].shape == shape, (precision, key)
            assert np.isfinite(values[key]).all() if values[key].dtype == np.float32 else True


def test_fp32_graph_matches_step_graph_and_its_convergence_outputs(exported) -> None:
    model, out, _ = exported
    feeds = _feeds(model, 4, seed=11)
    got = dict(zip(OUTPUT_NAMES, session(str(out / "model.step.onnx")).run(None, feeds)))
    with torch.no_grad():
        want = dict(zip(OUTPUT_NAMES, StepGraph(model)(*(torch.from_numpy(feeds[k]) for k in INPUT_NAMES))))
    for key in OUTPUT_NAMES:
        np.testing.assert_allclose(got[key], want[key].numpy(), atol=1e-4, rtol=0, err_msg=key)
    # The convergence outputs are what the contract says, not just what StepGraph says.
    z_in = np.concatenate([feeds["z_H"].reshape(4, -1), feeds["z_L"].reshape(4, -1)], 1)
    z_out = np.concatenate([got["z_H_out"].reshape(4, -1), got["z_L_out"].reshape(4, -1)], 1)
    residual = np.linalg.norm(z_out - z_in, axis=1) / np.linalg.norm(z_in, axis=1)
    np.testing.assert_allclose(got["residual"], residual, rtol=1e-4)
    assert (got["preds"] == got["logits"].argmax(-1)).all()


def test_fp16_graph_computes_in_fp16_and_keeps_overflow_spots_fp32(exported) -> None:
    _, out, _ = exported
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(out / "model.step.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.graph.value_info, *graph.graph.input,
                                                            *graph.graph.output]}
    types |= {i.name: i.data_type for i in graph.graph.initializer}
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    matmul_inputs = Counter(types.get(n.input[0]) for n in graph.graph.node if n.op_type == "MatMul")
    assert matmul_inputs[F16] > matmul_inputs[F32]  # the block stack runs in FP16
    for node in graph.graph.node:
        if node.op_type.startswith("Reduce") or node.op_type in ("ArgMax", "Softmax"):
            assert types.get(node.input[0]) == F32, f"{node.name} ({node.op_type}) reads FP16"
    # the sum of squares feeding each RMSNorm mean is FP32 too (the classic FP16 overflow)
    producers = {o: n for n in graph.graph.node for o in n.output}
    squares = [producers[n.input[0]] for n in graph.graph.node if n.op_type == "ReduceMean"
               and n.input[0] in producers and producers[n.input[0]].op_type == "Mul"]
    assert squares and all(types.get(sq.input[0]) == F32 for sq in squares)
    assert [o.type.tensor_type.elem_type for o in graph.graph.output][:3] == [F32, F32, F32]


def test_int8_graph_is_symmetric_per_channel_qdq_on_matmuls_only(exported) -> None:
    _, out, manifest = exported
    graph = onnx.load(str(out / "model.step.int8.onnx"))
    init = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    nodes = graph.graph.node
    quant = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dequant = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert quant and dequant
    zero_points = [init[n.input[2]] for n in dequant if len(n.input) > 2 and n.input[2] in init]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric S8
    weight_scales = [init[n.input[1]] for n in dequant if n.input[0] in init and n.input[0].endswith("_quantized")]
    assert any(s.ndim == 1 and s.size > 1 for s in weight_scales)  # per output channel
    consumers = {n.op_type for n in nodes for d in dequant if d.output[0] in n.input}
    assert consumers <= {"MatMul", "Gemm"}  # the residual stream and the outputs stay FP32
    outputs = {o.name for o in graph.graph.output}
    assert not any(o in outputs for d in dequant for o in d.output)
    assert manifest["precisions"]["int8"]["quantized_ops"]["MatMul"] > 0
    assert all(n.domain in ("", "ai.onnx") for n in nodes)  # TensorRT-parsable


# --------------------------------------------------------------------------- manifest


def test_manifest_keys_checks_and_metadata_copy(exported) -> None:
    model, out, manifest = exported
    on_disk = read_manifest(out)
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["format"] == "eqr-export" and on_disk["version"] == 2
    for key in ("eqr_version", "source", "config", "task", "io", "opset", "init_std", "batch", "precisions",
                "engines", "versions"):
        assert key in on_disk, key
    assert on_disk["config"] == model.config.to_dict()
    assert on_disk["task"]["name"] == "sudoku" and on_disk["task"]["size"] == 4
    assert [i["name"] for i in on_disk["io"]["outputs"]] == list(OUTPUT_NAMES)
    assert on_disk["batch"] == {"min": 1, "opt": 64, "max": 256}
    assert {"onnx", "onnxruntime", "torch"} <= set(on_disk["versions"])
    assert on_disk["engines"] == {} and on_disk["engine_build"]["status"] == "skipped"
    for precision, entry in on_disk["precisions"].items():
        assert entry["onnx"] == PRECISIONS[precision].onnx
        assert entry["tol"] >= PRECISIONS[precision].roundoff
        assert "max_abs" in entry["parity"]["step_error"] and "answers_agree" in entry["parity"]["trajectory"]
    assert on_disk["precisions"]["fp32"]["parity"]["step_error"]["max_abs"] <= 1e-4
    assert on_disk["precisions"]["fp32"]["parity"]["step_error"]["depths"] == list(range(FAST["check_steps"]))
    # Each graph carries the manifest as written before engines were built.
    before_engines = {k: v for k, v in on_disk.items() if k not in ("engines", "engine_build")}
    for precision, row in PRECISIONS.items():
        props = {p.key: p.value for p in onnx.load(str(out / row.onnx), load_external_data=False).metadata_props}
        assert props[PRECISION_KEY] == precision
        embedded = json.loads(props[METADATA_KEY])
        assert embedded["engines"] == {} and {k: v for k, v in embedded.items() if k in before_engines} == before_engines


def test_recommended_tol_rule() -> None:
    assert recommended_tol("fp32", 1e-4)["tol"] == pytest.approx(3e-4)
    assert recommended_tol("fp16", 1e-5)["tol"] == PRECISIONS["fp16"].roundoff  # never below round-off
    unreached = recommended_tol("int8", 0.5)
    assert unreached["tol"] == PRECISIONS["int8"].roundoff and not unreached["floor_reached"]
    unmeasured = recommended_tol("fp16")  # a checkpoint or a model in memory: no floor measured
    assert unmeasured["tol"] == PRECISIONS["fp16"].unmeasured_tol and unmeasured["residual_floor"] is None
    assert check_depths(32, every_depth=False) == [0, 1, 2, 4, 8, 16, 31]


def test_task_is_recorded_then_inferred_then_unknown() -> None:
    assert infer_task(EqRModel(tiny_config(seq_len=81, vocab_size=11, hidden_size=8))).size == 9
    maze = infer_task(EqRModel(tiny_config(seq_len=81, vocab_size=6, hidden_size=8)))
    assert (maze.name, maze.size) == ("maze", 9)
    recorded = EqRModel(tiny_config())
    recorded.metadata = dict(SUDOKU4)
    assert infer_task(recorded).name == "sudoku"
    unknown = EqRModel(tiny_config(seq_len=10, vocab_size=7))
    assert infer_task(unknown).name is None
    tokens = task_inputs(infer_task(unknown), unknown, 3, seed=0)
    assert tokens.shape == (3, 10) and tokens.dtype == torch.int32 and 1 <= int(tokens.min())
    sudoku = task_inputs(infer_task(recorded), recorded, 2, seed=0)
    assert sudoku.shape == (2, 16) and int(sudoku.max()) <= 5 and (sudoku == 1).any()  # blanks are token 1


# --------------------------------------------------------------------------- command line


def test_cli_int8_export_of_a_checkpoint_with_default_out_dir(tmp_path: Path, monkeypatch) -> None:
    model = EqRModel(tiny_config(), seed=1)
    save_checkpoint(tmp_path / "tiny.pt", model.config, model.state_dict(), metadata=SUDOKU4)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["export", "tiny.pt", "--precision", "int8", "--json", *FAST_FLAGS])
    assert result.exit_code == 0, result.output
    out = tmp_path / "tiny-eqr"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.step.int8.cpu.onnx",
                                                     "model.step.int8.onnx", "model.step.onnx"]  # int8 brings the CPU's
    manifest = json.loads(result.stdout)
    assert manifest["source"]["kind"] == "eqr" and len(manifest["source"]["sha256"]) == 64
    calibration = manifest["precisions"]["int8"]["calibration"]  # built in: 4 puzzles x every depth
    assert calibration["source"].startswith("built-in") and calibration["rows"] == 4 * 4
    assert "engine: skipped:" in result.stderr and "int8: step error" in result.stderr
    assert not list(tmp_path.glob(".*staging*"))
    # The same command again is refused; --force replaces the files and drops stale ones.
    again = _run("export", "tiny.pt", *FAST_FLAGS)
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
    (out / "model.step.fp16.oldgpu.trt10.3.engine").write_bytes(b"stale")
    forced = _run("export", "tiny.pt", "--force", *FAST_FLAGS)
    assert forced.exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.step.onnx"]


def test_cli_exports_an_official_checkpoint(tmp_path: Path) -> None:
    config = tiny_config(seq_len=81, vocab_size=11, hidden_size=16)
    write_official_checkpoint(tmp_path / "eqr.pth", config)
    out = tmp_path / "official"
    result = _run("export", str(tmp_path / "eqr.pth"), "--out", str(out), "--engine", "never", *FAST_FLAGS)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["source"]["kind"] == "official" and manifest["source"]["weights"] == "ema"
    assert manifest["task"]["name"] == "sudoku" and manifest["task"]["size"] == 9
    assert manifest["precisions"]["fp32"]["parity"]["step_error"]["max_abs"] <= 1e-4


@pytest.mark.parametrize("case", ["missing", "not_checkpoint", "exists", "unwritable", "opset", "batch", "calib"])
def test_bad_input_is_one_line_exit_2_and_leaves_no_files(tmp_path: Path, case: str) -> None:
    model = EqRModel(tiny_config())
    save_checkpoint(tmp_path / "m.pt", model.config, model.state_dict())
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "bad.npz").write_bytes(b"nope")
    (tmp_path / "existing").mkdir()
    args = {
        "missing": ["no/such/model.pt"],
        "not_checkpoint": [str(tmp_path / "notes.txt")],
        "exists": [str(tmp_path / "m.pt"), "--out", str(tmp_path / "existing")],
        "unwritable": [str(tmp_path / "m.pt"), "--out", str(tmp_path / "notes.txt" / "out")],
        "opset": [str(tmp_path / "m.pt"), "--opset", "16"],
        "batch": [str(tmp_path / "m.pt"), "--batch", "8:4:2"],
        "calib": [str(tmp_path / "m.pt"), "--precision", "int8", "--calib-data", str(tmp_path / "bad.npz")],
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _run("export", *args, "--out", str(tmp_path / "out")) if "--out" not in args else _run("export", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created, nothing left over
    assert list((tmp_path / "existing").iterdir()) == []


def test_engine_always_without_tensorrt_exits_1_before_any_work(tmp_path: Path) -> None:
    model = EqRModel(tiny_config())
    save_checkpoint(tmp_path / "m.pt", model.config, model.state_dict())
    result = _run("export", str(tmp_path / "m.pt"), "--out", str(tmp_path / "out"), "--engine", "always")
    assert result.exit_code == 1
    assert "cannot build TensorRT engines" in result.output and not (tmp_path / "out").exists()


def test_a_failed_parity_check_exits_1_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("eqr.export.parity.FP32_STEP_ATOL", 0.0)  # any float difference now fails
    model = EqRModel(tiny_config())
    with pytest.raises(ExportError, match="differs from model.step") as info:
        export_model(model, tmp_path / "out", ExportConfig(engine="never", check_batch=1, check_steps=2))
    assert info.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


def test_calibration_npz_states_are_used_as_given_and_bad_files_refused(exported, tmp_path: Path) -> None:
    calib = exported[2]["precisions"]["int8"]["calibration"]
    assert calib["rows"] == 5 and calib["source"].endswith("calib.npz")
    model = exported[0]
    feeds = _feeds(model, 2)
    for name, arrays, message in [
        ("short.npz", {"tokens": feeds["tokens"][:, :3]}, r"expected \[N, 16\]"),
        ("range.npz", {"tokens": feeds["tokens"] + 10}, "token ids 0..5"),
        ("half.npz", {"tokens": feeds["tokens"], "z_H": feeds["z_H"]}, "both 'z_H' and 'z_L'"),
        ("shape.npz", {"tokens": feeds["tokens"], "z_H": feeds["z_H"][:1], "z_L": feeds["z_L"]}, r"expected float \[2, 16, 16\]"),
    ]:
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(EqRError, match=message):  # read and checked before any export work
            int8_calibration(model, ExportConfig(precision=("int8",), calib_data=str(tmp_path / name)))
    with pytest.raises(EqRError, match="int8 export needs calibration feeds"):
        export_model(model, tmp_path / "out", ExportConfig(precision=("int8",)))
    assert not (tmp_path / "out").exists()


def test_calibration_npz_of_puzzles_only_records_their_trajectories(exported, tmp_path: Path) -> None:
    model = exported[0]
    np.savez(tmp_path / "puzzles.npz", tokens=_feeds(model, 3)["tokens"])
    config = ExportConfig(precision=("int8",), engine="never", calib_data=str(tmp_path / "puzzles.npz"), **FAST)
    calib = export_model(model, tmp_path / "out", config, calibrate=int8_calibration(model, config))
    calib = calib["precisions"]["int8"]["calibration"]
    assert calib["source"].endswith("puzzles.npz")
    assert calib["trajectories"] == 3 and calib["rows"] == 3 * FAST["check_steps"]  # every depth of each


def test_config_flags() -> None:
    assert parse_batch("1:8:32") == (1, 8, 32) and parse_batch("16") == (16, 16, 16)
    with pytest.raises(EqRError, match="MIN:OPT:MAX"):
        parse_batch("1:2")
    with pytest.raises(EqRError, match="17..20"):
        ExportConfig(opset=21)
    assert ExportConfig(precision=("int8", "fp16", "int8")).precisions == ("fp32", "fp16", "int8", "int8-cpu")


def test_import_eqr_export_loads_no_heavy_backend() -> None:
    code = ("import sys, eqr.export; heavy = [m for m in ('onnx', 'onnxruntime', 'tensorrt', 'polygraphy') "
            "if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("pos", ["rope", "rope2d"])
def test_attention_models_export_with_the_same_contract(pos: str) -> None:
    from eqr.export.fp16 import to_fp16
    from eqr.export.from_model import OnnxFromModel

    config = tiny_config(mlp_t=False, pos_encodings=pos, L_layers=1, H_cycles=1, L_cycles=1)  # 2 blocks: fast
    model = EqRModel(config, seed=2).eval()
    graph = OnnxFromModel(model, 17)()
    feeds = _feeds(model, 2)
    with torch.no_grad():
        want = StepGraph(model)(*(torch.from_numpy(feeds[k]) for k in INPUT_NAMES))
    half = to_fp16(graph)
    for precision, proto, atol in (("fp32", graph, 1e-4), ("fp16", half, 0.2)):
        got = session(proto).run(None, feeds)
        for name, a, b in zip(OUTPUT_NAMES[:3], got, want):
            np.testing.assert_allclose(a, b.numpy(), atol=atol, rtol=0, err_msg=f"{precision} {name}")
    assert any(n.op_type == "Softmax" for n in half.graph.node)  # attention was exported


@pytest.mark.parametrize("name", bundled_names())
def test_every_bundled_model_exports_in_fp32(tmp_path: Path, name: str) -> None:
    """Trained logits are large (RMS ~50 on maze-small): the FP32 gate is scaled to each output."""
    result = _run("export", name, "--out", str(tmp_path / name), "--engine", "never", *FAST_FLAGS)
    assert result.exit_code == 0, result.output
    step_error = read_manifest(tmp_path / name)["precisions"]["fp32"]["parity"]["step_error"]
    assert step_error["max_scaled"] <= 1e-4
    assert step_error["max_abs_per_output"]["z_H_out"] <= 1e-4 and step_error["max_abs_per_output"]["z_L_out"] <= 1e-4


def test_done_rows_keep_their_state_bit_for_bit_in_every_graph(exported) -> None:
    model, out, _ = exported
    feeds = _feeds(model, 4, seed=5)
    feeds["done"] = np.array([True, False, True, False])
    for precision, name in ((p, row.onnx) for p, row in PRECISIONS.items()):
        got = dict(zip(OUTPUT_NAMES, session(str(out / name)).run(None, feeds)))
        for state in ("z_H", "z_L"):
            np.testing.assert_array_equal(got[f"{state}_out"][[0, 2]], feeds[state][[0, 2]], err_msg=precision)
            assert not np.array_equal(got[f"{state}_out"][[1, 3]], feeds[state][[1, 3]]), precision  # live rows move
        assert (got["residual"][[0, 2]] == 0).all() and (got["residual"][[1, 3]] > 0).all(), precision
    with torch.no_grad():
        torch_out = StepGraph(model)(*(torch.from_numpy(feeds[k]) for k in INPUT_NAMES))
    np.testing.assert_array_equal(torch_out[0].numpy()[[0, 2]], feeds["z_H"][[0, 2]])


def test_int8_graph_is_fp16_outside_qdq_quantizes_only_weight_matmuls_and_stays_accurate() -> None:
    """A strongly typed build runs each layer in the graph's type: outside the Q/DQ pairs that
    must be FP16 (not FP32), and only MatMuls with constant weights carry Q/DQ (attention's
    activation products stay FP16). Checked on the CPU: a valid graph, close to FP32."""
    import onnx

    from eqr.export.int8 import Int8FromOnnx, quantized_ops
    from eqr.export.from_model import OnnxFromModel

    config = tiny_config(mlp_t=False, pos_encodings="rope", L_layers=1, H_cycles=1, L_cycles=1)
    model = EqRModel(config, seed=2).eval()
    fp32 = OnnxFromModel(model, 17)()
    calib = [_feeds(model, 8, seed=s) for s in range(3)]
    int8 = Int8FromOnnx(fp32, calib)()
    onnx.checker.check_model(int8)
    typed = onnx.shape_inference.infer_shapes(int8)
    elem = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.output]}
    initializers = {i.name for i in int8.graph.initializer}
    producer = {o: n for n in int8.graph.node for o in n.output}
    dequantized = {o for n in int8.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in int8.graph.node:
        if node.op_type == "MatMul" and dequantized & set(node.input):  # a quantized matmul: B is a weight
            weight = producer[node.input[1]]
            assert weight.op_type == "DequantizeLinear" and weight.input[0] in initializers, node.name
    attention = [n for n in int8.graph.node if n.op_type == "MatMul" and not dequantized & set(n.input)]
    assert attention and all(elem[n.output[0]] == onnx.TensorProto.FLOAT16 for n in attention)  # QK^T, PV: FP16
    elementwise = [n for n in int8.graph.node if n.op_type in ("Sigmoid", "Transpose", "Slice", "Neg")]
    assert elementwise and all(elem[n.output[0]] == onnx.TensorProto.FLOAT16 for n in elementwise)
    assert quantized_ops(int8).get("MatMul", 0) >= 4
    feeds = _feeds(model, 6, seed=9)
    want = dict(zip(OUTPUT_NAMES, session(fp32).run(None, feeds)))
    got = dict(zip(OUTPUT_NAMES, session(int8).run(None, feeds)))
    assert got["z_H_out"].dtype == np.float32  # the I/O contract is unchanged
    scale = float(np.abs(want["z_H_out"]).max())
    assert float(np.abs(got["z_H_out"] - want["z_H_out"]).max()) < 0.15 * scale
    assert (got["preds"] == want["preds"]).mean() >= 0.9
