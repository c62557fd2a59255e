"""The native TensorRT backend.

CPU: the whole backend (slots, ping-pong buffers, the done mask, graph capture, row copies, the
device index) runs on `fake_cuda`'s strict stand-ins for cuda-python and a TensorRT engine, whose
engine is the ONNX step run by ONNX Runtime; answers must then equal the ONNX Runtime backend's
bit for bit. GPU (marked `gpu`, skipped with the reason otherwise): the same against real engines
of every precision, one test per defect the TensorRT path was reviewed for.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from fake_cuda import FakeCudart, Strategy, fake_tensorrt
from runtime_helpers import contractive_model, export_onnx, random_puzzles

from eqr.contract.errors import EqRError
from eqr.export import tensorrt as trt_export
from eqr.runtime import SolveConfig, solve
from eqr.runtime.backends import trt_backend
from eqr.runtime.backends.ort_backend import OrtBackend
from eqr.runtime.backends.trt_backend import TensorRTBackend, row_runs

PROFILE = (1, 4, 8)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    return export_onnx(contractive_model(), tmp_path_factory.mktemp("trt") / "model.step.onnx")


@pytest.fixture
def fake(monkeypatch, onnx_path, tmp_path):
    """(cudart, trt, engine path): the backend's CUDA and TensorRT replaced by fake_cuda."""
    cudart = FakeCudart(devices=2)
    trt = fake_tensorrt(cudart, PROFILE)
    engine = tmp_path / "model.step.fp32.fake.engine"
    engine.write_bytes(onnx_path.read_bytes())
    checked = []
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "trt_logger", lambda: None)
    monkeypatch.setattr(trt_backend, "check_engine", lambda path, device=0: checked.append(device) or {})
    cudart.checked = checked
    return cudart, trt, engine


def states(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return (0.1 * g.standard_normal((n, 16, 16))).astype(np.float32), (0.1 * g.standard_normal((n, 16, 16))).astype(np.float32)


CFG = SolveConfig(max_steps=40, tol=1e-4, stats="trace")


def _solve(backend, puzzles, seed=0, cfg=CFG, batch_size=None):
    with backend:
        out, stats = solve(backend, puzzles, states(len(puzzles), seed), cfg, batch_size=batch_size)
    return out["preds"], stats


def test_row_runs_copy_consecutive_rows_at_once() -> None:
    assert row_runs(np.array([0, 1, 2, 5, 6, 9]), np.array([3, 4, 5, 6, 7, 1])) == [(0, 3, 3), (5, 6, 2), (9, 1, 1)]
    assert row_runs(np.array([4, 5]), np.array([0, 2])) == [(4, 0, 1), (5, 2, 1)]  # consecutive on one side only
    assert row_runs(np.array([], np.int64), np.array([], np.int64)) == []


@pytest.mark.parametrize("cuda_graphs, static", [(True, True), (False, True), (False, False)])
def test_fake_gpu_backend_equals_onnxruntime_bit_for_bit_with_slot_refills(fake, onnx_path, cuda_graphs, static):
    cudart, trt, engine = fake
    puzzles = random_puzzles(11, seed=41)  # more rows than the 4 slots: settled slots get refilled
    want, want_stats = _solve(OrtBackend(onnx_path, threads=1), puzzles, batch_size=4)
    got, stats = _solve(TensorRTBackend(engine, batch_size=4, cuda_graphs=cuda_graphs, static_shapes=static),
                        puzzles, batch_size=4)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(stats.nstep, want_stats.nstep)
    np.testing.assert_array_equal(stats.residual_trace, want_stats.residual_trace)
    if static:
        assert (stats.batch_size == 4).all()  # frozen rows and refilled slots, never a new shape
    else:
        assert stats.batch_size.min() < 4  # compaction shrank the batch


def test_graph_replay_equals_plain_enqueue_bit_for_bit_over_hundreds_of_steps(fake):
    cudart, trt, engine = fake
    puzzles = random_puzzles(48, seed=7)
    cfg = SolveConfig(max_steps=25, tol=1e-5, stats="trace")  # ~ a few hundred batched steps, many refills
    replay, replay_stats = _solve(TensorRTBackend(engine, batch_size=4, cuda_graphs=True), puzzles, cfg=cfg)
    plain, plain_stats = _solve(TensorRTBackend(engine, batch_size=4, cuda_graphs=False, static_shapes=True),
                                puzzles, cfg=cfg)
    assert len(replay_stats.batch_size) >= 200
    np.testing.assert_array_equal(replay, plain)
    np.testing.assert_array_equal(replay_stats.residual_trace, plain_stats.residual_trace)


def test_each_graph_has_its_own_context_bound_once_sharing_user_managed_memory(fake):
    cudart, trt, engine = fake
    with TensorRTBackend(engine, batch_size=4) as backend:
        solve(backend, random_puzzles(9), states(9), CFG)  # the fake refuses any re-bind after capture
        contexts = trt.engines[-1].contexts
        assert [c.strategy for c in contexts] == [Strategy.USER_MANAGED] * 2
        assert all(c.captured for c in contexts) and len({c.memory for c in contexts}) == 1
        assert all(c.binds == 7 + 4 for c in contexts)  # 4 inputs + 7 outputs, once
    assert cudart.capture_modes == [FakeCudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal] * 2


def test_the_device_index_is_used_for_the_check_the_engine_and_every_call(fake):
    cudart, trt, engine = fake
    with TensorRTBackend(engine, batch_size=4, device=1) as backend:
        solve(backend, random_puzzles(5), states(5), CFG)
    assert cudart.checked == [1] and trt.engines[-1].device == 1
    assert set(cudart.device_calls) == {1}
    with pytest.raises(EqRError, match="cudaSetDevice"):
        TensorRTBackend(engine, device=2).activate()


def test_refused_shapes_and_misaligned_or_foreign_pointers_fail_loudly(fake):
    cudart, trt, engine = fake
    with TensorRTBackend(engine, cuda_graphs=False) as backend:
        big = {"tokens": backend.upload(random_puzzles(9)), "z_H": backend.upload(states(9)[0]),
               "z_L": backend.upload(states(9)[1])}
        with pytest.raises(EqRError, match=r"refused input shape tokens\[9, 16\]"):
            backend.step(big)  # the profile's max batch is 8
        feeds = {"tokens": backend.upload(random_puzzles(2)), "z_H": backend.upload(states(2)[0]),
                 "z_L": backend.upload(states(2)[1])}
        shifted = trt_backend.DeviceArray(feeds["z_H"].ptr + 4, (1, 16, 16), feeds["z_H"].dtype, feeds["z_H"].owner)
        with pytest.raises(ValueError, match="256-byte aligned"):
            backend.step(feeds | {"z_H": shifted, "tokens": feeds["tokens"].rows(1), "z_L": feeds["z_L"].rows(1)})
        with pytest.raises(TypeError, match="DeviceArray"):
            backend.step(feeds | {"tokens": random_puzzles(2)})


def test_device_array_helpers_move_rows_on_the_stream(fake):
    cudart, trt, engine = fake
    with TensorRTBackend(engine, cuda_graphs=False) as backend:
        a = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
        b = -np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
        da, db = backend.upload(a), backend.upload(b)
        np.testing.assert_array_equal(backend.download(backend.take(da, np.array([4, 0, 1]))), a[[4, 0, 1]])
        np.testing.assert_array_equal(backend.download(backend.concat([da, db])), np.concatenate([a, b]))
        backend.put(da, np.array([5, 2]), db)
        a[[5, 2]] = b
        np.testing.assert_array_equal(backend.download(da), a)


@pytest.mark.parametrize("failing, after", [("EndCapture", 0), ("Instantiate", 0), ("Instantiate", 1)])
def test_a_failed_capture_falls_back_to_plain_enqueue_with_one_warning(fake, failing, after, caplog, capfd):
    """Graph A or B (after=1: B, once A was made) cannot be captured or instantiated: the capture is
    ended, the error cleared (the fake fails every run while one is pending), every graph made is
    destroyed, and the answers are the plain enqueue's."""
    cudart, trt, engine = fake
    puzzles = random_puzzles(11, seed=41)
    plain, plain_stats = _solve(TensorRTBackend(engine, batch_size=4, cuda_graphs=False, static_shapes=True), puzzles)
    cudart.fail = {failing: after}
    backend = TensorRTBackend(engine, batch_size=4, cuda_graphs=True)
    with caplog.at_level("WARNING", logger="eqr"):
        got, stats = _solve(backend, puzzles)
    np.testing.assert_array_equal(got, plain)
    np.testing.assert_array_equal(stats.residual_trace, plain_stats.residual_trace)
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "CUDA-graph capture failed" in record.getMessage() and failing in record.getMessage()
    assert backend.describe()["cuda_graphs"] is False
    assert not cudart.live_graphs and not cudart.live_execs and not cudart.capturing
    assert capfd.readouterr().out == ""


def test_graphs_are_destroyed_and_none_leaks(fake):
    cudart, trt, engine = fake
    with TensorRTBackend(engine, batch_size=4) as backend:
        solve(backend, random_puzzles(5), states(5), CFG)
        assert len(cudart.live_execs) == 2 and not cudart.live_graphs  # the captured graphs: instantiated, freed
    assert not cudart.live_execs


def test_dynamic_mode_allocates_at_activation_only(fake):
    """No cudaMalloc or cudaFree (each synchronizes the device) per step, gather, concat or admission,
    nor when compaction shrinks the batch: max-batch blocks reserved once, row views of them."""
    cudart, trt, engine = fake
    with TensorRTBackend(engine, cuda_graphs=False) as backend:
        setup = dict(cudart.calls)
        for seed in range(2):  # a second solve reuses the blocks the first returned
            _, stats = solve(backend, random_puzzles(19, seed=seed), states(19, seed), CFG, batch_size=8)
            assert stats.batch_size.min() < stats.batch_size.max() == 8  # admissions and compaction
        a = backend.upload(np.ones((8, 16, 16), np.float32))
        b = backend.take(a, np.array([7, 0, 3]))
        np.testing.assert_array_equal(backend.download(backend.concat([b, a.rows(2)])), np.ones((5, 16, 16)))
        assert cudart.calls == setup
    assert cudart.calls["free"] == cudart.calls["malloc"]  # everything returned at deactivation


def test_an_old_driver_for_cuda_python_says_so_instead_of_no_device(fake):
    cudart, trt, engine = fake
    artifact = SimpleNamespace(engines={"fp32": engine})
    cudart.driver, cudart.runtime = 12040, 13000  # cuda-python 13 on a CUDA 12.4 driver
    assert TensorRTBackend.unavailable_reason(artifact, "fp32") == (
        'cuda-python 13 needs a CUDA 13 driver; this driver supports CUDA 12.4: pip install "cuda-python<13"')
    cudart.driver = 0
    assert "no CUDA driver found" in TensorRTBackend.unavailable_reason(artifact, "fp32")
    cudart.driver, cudart.runtime = 13000, 12060  # a newer driver runs the older cuda-python
    assert TensorRTBackend.unavailable_reason(artifact, "fp32") is None


def test_tensorrt_messages_go_to_logging_never_stdout(fake, monkeypatch, caplog, capfd):
    """The runtime's TensorRT logger: Polygraphy's where it is installed (its logger switched to
    Python logging), else eqr's own ILogger; neither writes to stdout."""
    import sys

    import polygraphy.backend.trt.util as polygraphy_util

    from eqr.contract import trt_engine

    cudart, trt, engine = fake
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(polygraphy_util, "TRT_LOGGER", None)
    monkeypatch.setattr(trt_engine, "_LOGGER", None)
    monkeypatch.setattr(trt_backend, "trt_logger", trt_engine.trt_logger)
    with caplog.at_level("WARNING"):
        _solve(TensorRTBackend(engine, batch_size=4), random_puzzles(3))
        trt_engine._logging_trt_logger().log(trt.Logger.WARNING, "TensorRT: from the edge logger")
    assert capfd.readouterr().out == ""
    messages = [r.getMessage() for r in caplog.records]
    assert any("TensorRT: a runtime warning" in m for m in messages)
    assert "TensorRT: from the edge logger" in messages


def test_the_fake_refuses_what_cuda_and_tensorrt_refuse(fake):
    """fake_cuda is only worth its passes if it fails where the real stack would."""
    cudart, trt, engine = fake
    kind = FakeCudart.cudaMemcpyKind
    _, device = cudart.cudaMalloc(1024)
    _, pinned = cudart.cudaMallocHost(1024)
    pageable = np.zeros(256, np.uint8)
    stream = cudart.cudaStreamCreateWithFlags(1)[1]
    for dst, src, k, message in [(pageable.ctypes.data, device, kind.cudaMemcpyDeviceToDevice, "destination is pageable"),
                                 (device, pinned, kind.cudaMemcpyDeviceToHost, "destination is device"),
                                 (device, device + 512, kind.cudaMemcpyDeviceToDevice, "overrun")]:
        with pytest.raises(AssertionError, match=message):
            cudart.cudaMemcpyAsync(dst, src, 256 if message != "overrun" else 1024, k, stream)
    with pytest.raises(AssertionError, match="pinned free of device memory"):
        cudart.cudaFreeHost(device)
    cudart.cudaStreamBeginCapture(stream, 1)
    with pytest.raises(AssertionError, match="pageable"):
        cudart.cudaMemcpyAsync(device, pageable.ctypes.data, 256, kind.cudaMemcpyHostToDevice, stream)
    cudart.cudaMemcpyAsync(device, pinned, 256, kind.cudaMemcpyHostToDevice, stream)  # pinned: capturable
    with pytest.raises(AssertionError, match="cudaMalloc during a stream capture"):
        cudart.cudaMalloc(16)
    with pytest.raises(AssertionError, match="cudaFree during a stream capture"):
        cudart.cudaFree(device)
    fresh = trt.Runtime(None).deserialize_cuda_engine(engine.read_bytes()).create_execution_context()
    with pytest.raises(AssertionError, match="first run"):
        fresh.execute_async_v3(stream)
    cudart.cudaStreamEndCapture(stream)
    assert fresh.set_input_shape("tokens", (2, 16)) and not fresh.set_input_shape("tokens", (2, 17))
    assert not fresh.set_input_shape("z_H", (2, 16, 8)) and not fresh.set_input_shape("tokens", (2, 16, 1))


# --------------------------------------------------------------------------- on a GPU


def _why_no_engines() -> str:
    return trt_export.engine_support()[2]


def _pytest_gpu(fn):
    """Marked `gpu`, skipped with the reason where engines cannot be built."""
    reason = _why_no_engines()
    return pytest.mark.gpu(pytest.mark.skipif(bool(reason), reason=reason or "n/a")(fn))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from eqr.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("trt") / "tiny-eqr"
    export_model(contractive_model(), out, ExportConfig(precision=("fp16", "int8"), engine="always", batch=(1, 8, 16),
                                                        check_batch=2, check_steps=4))
    return out


def _on_gpu(export_dir, precision="fp32", **kwargs) -> TensorRTBackend:
    from eqr.runtime.resolve import load_artifact

    return TensorRTBackend(load_artifact(export_dir).engines[precision], precision=precision, **kwargs)


@_pytest_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_engines_of_every_precision_match_onnxruntime_answers(export_dir, precision, cuda_graphs):
    from eqr.runtime import Solver

    puzzles = random_puzzles(20, seed=41)  # more rows than the 8-slot graph batch: slots get refilled
    with Solver.load(export_dir, backend="onnxruntime", precision=precision, threads=1) as ort:
        expected = ort.solve(puzzles, breadth=2, seed=5)
    with Solver.load(export_dir, backend="tensorrt", precision=precision, batch_size=8, cuda_graphs=cuda_graphs) as trt:
        assert trt.backend.static_shapes is cuda_graphs
        result = trt.solve(puzzles, breadth=2, seed=5)
    assert (result.preds == expected.preds).all(axis=1).mean() >= 0.9  # GPU kernels round differently
    assert abs(int(result.steps.sum()) - int(expected.steps.sum())) <= 0.15 * expected.steps.sum()


@_pytest_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_graph_replay_equals_enqueue_bitwise_on_the_gpu(export_dir, precision):
    puzzles = random_puzzles(64, seed=3)
    cfg = SolveConfig(max_steps=30, tol=1e-5, stats="trace")
    replay, a = _solve(_on_gpu(export_dir, precision, batch_size=8, cuda_graphs=True), puzzles, cfg=cfg)
    plain, b = _solve(_on_gpu(export_dir, precision, batch_size=8, cuda_graphs=False, static_shapes=True),
                      puzzles, cfg=cfg)
    assert len(a.batch_size) >= 200
    np.testing.assert_array_equal(replay, plain)
    np.testing.assert_array_equal(a.residual_trace, b.residual_trace)


@_pytest_gpu
def test_fresh_uploads_are_complete_before_the_engine_reads_them(export_dir):
    """The stream race: inputs copied on one stream, the engine run on another without a wait."""
    from eqr.contract.artifact import graph_feeds
    from eqr.export.onnx_graph import session

    ort = session(str(export_dir / "model.step.onnx"))
    with _on_gpu(export_dir, cuda_graphs=False) as backend:
        for seed in range(50):  # large fresh inputs every step: a half-copied state would show
            tokens, (z_H, z_L) = random_puzzles(16, seed=seed), states(16, seed)
            out = backend.step({"tokens": backend.upload(tokens), "z_H": backend.upload(z_H), "z_L": backend.upload(z_L)})
            want = ort.run(["z_H_out"], graph_feeds(tokens, z_H, z_L))[0]
            np.testing.assert_allclose(backend.download(out["z_H_out"]), want, atol=2e-3, rtol=0)


@_pytest_gpu
def test_a_second_gpu_is_used_when_asked(export_dir):
    cudart = trt_backend.import_cudart()
    if cudart.cudaGetDeviceCount()[1] < 2:
        pytest.skip("needs two CUDA devices")
    puzzles = random_puzzles(8, seed=1)
    zero, _ = _solve(_on_gpu(export_dir, batch_size=8, device=0), puzzles)
    one, _ = _solve(_on_gpu(export_dir, batch_size=8, device=1), puzzles)
    np.testing.assert_array_equal(zero, one)


@_pytest_gpu
def test_a_profile_overflow_is_refused_by_a_checked_set_input_shape(export_dir):
    with _on_gpu(export_dir, cuda_graphs=False) as backend:
        feeds = {"tokens": backend.upload(random_puzzles(17)), "z_H": backend.upload(states(17)[0]),
                 "z_L": backend.upload(states(17)[1])}
        with pytest.raises(EqRError, match="refused input shape"):
            backend.step(feeds)


@_pytest_gpu
def test_a_refused_timing_cache_is_replaced_not_fatal(tmp_path, monkeypatch):
    from eqr.export import ExportConfig, export_model

    monkeypatch.setenv("EQR_CACHE_DIR", str(tmp_path / "cache"))
    gpu_info, version, _ = trt_export.engine_support()
    cache = trt_export.timing_cache_path(gpu_info.tag, version)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a timing cache")
    manifest = export_model(contractive_model(), tmp_path / "out", ExportConfig(engine="always", batch=(1, 2, 4),
                                                                                 check_batch=2, check_steps=2))
    assert manifest["engines"]["fp32"]["engine"]


@_pytest_gpu
def test_auto_prefers_the_native_engine(export_dir):
    from eqr.runtime import Solver

    with Solver.load(export_dir, backend="auto") as solver:
        assert solver.backend.name == "tensorrt"
        assert solver.solve(random_puzzles(3)).preds.shape == (3, 16)


def test_a_cascade_of_two_engines_waits_for_the_rows_it_moves_between_streams(fake, onnx_path):
    """Each TensorRT backend has its own stream; the cascade gathers on the high stage's, so the
    low stage must wait for it (the fake runs queued work only when its stream is synchronized)."""
    from eqr.runtime.backends.cascade import CascadeBackend

    cudart, trt, engine = fake
    puzzles = random_puzzles(9, seed=43)
    cfg = SolveConfig(max_steps=40, tol=1e-4, stats="trace", cascade_patience=2)

    def cascade(make):
        return CascadeBackend(make(), make(), "fp32+fp32")

    want, want_stats = _solve(cascade(lambda: OrtBackend(onnx_path, threads=1)), puzzles, cfg=cfg)
    got, stats = _solve(cascade(lambda: TensorRTBackend(engine, cuda_graphs=False, static_shapes=False)), puzzles,
                        cfg=cfg)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(stats.residual_trace, want_stats.residual_trace)
