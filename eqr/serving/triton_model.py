"""eqr as a decoupled Triton Python-backend model (docs/serving.md); `eqr triton` copies this file
into a model repository as NAME/1/model.py, next to the export it serves (NAME/1/export/).

Thin on purpose: `initialize` builds eqr's `Solver` and `Scheduler` from the parameters in
config.pbtxt; `execute` only checks each request and enqueues it, then returns. The scheduler's
worker thread runs the one loop over outer steps (eqr.runtime.loop) for every request at once;
a responder thread turns finished futures (and streaming progress) into responses on each
request's own response sender, so sending never stalls the loop.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from eqr.contract.errors import EqRError, NotReady, RequestError
from eqr.serving.protocol import (INPUTS, OUTPUTS, PUZZLE_REJECTIONS, REQUEST_REJECTIONS, Rejected, parse_request,
                                  partial_tensors, result_tensors)

log = logging.getLogger("eqr.serving")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
SUBMIT_TIMEOUT_S = 1.0  # a full queue answers "busy" after this, instead of blocking Triton's thread
# (metric name, kind, description) for pb_utils.MetricFamily; values come from Scheduler.counts.
COUNTERS = (("eqr_puzzles_answered", "answered", "Puzzles answered"),
            ("eqr_puzzles_failed", "failed", "Puzzles failed by the backend (their error output is set)"),
            ("eqr_outer_steps", "steps", "Outer steps run, summed over trajectories"),
            ("eqr_diverged_trajectories", "diverged", "Trajectories whose state went non-finite"),
            ("eqr_backend_faults", "faults", "backend.step calls that raised"))
# counted here, not by the scheduler: each with a `reason` label (eqr.serving.protocol)
REJECTION_COUNTERS = (("eqr_puzzles_rejected", PUZZLE_REJECTIONS, "Puzzles refused before solving (error output set)"),
                      ("eqr_requests_rejected", REQUEST_REJECTIONS, "Requests answered with an error response"))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from eqr.runtime import Scheduler, Solver
        from eqr.runtime.backends.base import backend_info
        from eqr.runtime.resolve import load_artifact
        from eqr.serving.repository import ServeConfig

        logging.basicConfig(level=logging.INFO, format="eqr %(levelname)s %(name)s: %(message)s")
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = args["model_name"]
        artifact = load_artifact(Path(__file__).resolve().parent / "export")
        self.vocab_size = artifact.vocab_size
        cfg = ServeConfig.from_parameters(params, self.name)
        options: dict[str, Any] = {}
        if cfg.threads:
            options["threads"] = cfg.threads
        if cfg.backend == "tensorrt" and args.get("model_instance_kind") == "GPU":
            options["device"] = int(args["model_instance_device_id"])
        batch = cfg.batch
        solver = Solver.load(artifact, backend=cfg.backend, precision=cfg.precision, batch_size=batch, **options)
        solver.backend.activate()  # build sessions/engines now: the model is ready only when it can run
        self.task = solver.task  # the export's task: its text format in and out
        self.backend = json.dumps(backend_info(solver.backend))
        self.default_seed = int(params.get("seed", 0))
        # max_steps None: the precision's calibrated stopping rule (docs/serving.md)
        solve_cfg = solver.config(max_steps=cfg.max_steps, noise=cfg.noise, agree=cfg.agree)
        self.scheduler = Scheduler(solver, solve_cfg, batch_size=batch,
                                   breadth=cfg.breadth, seed=self.default_seed, max_queue=cfg.max_queue,
                                   stream_every=cfg.stream_every)
        self.outbox: queue.Queue = queue.Queue()
        self.unloading = False
        self._init_metrics()
        self.responder = threading.Thread(target=self._respond, name="eqr-responder", daemon=True)
        self.responder.start()
        log.info("%s: %s on %s, batch %d, breadth %d", self.name, artifact.location,
                 solver.backend.describe().get("backend"), batch, self.scheduler.breadth)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = parse_request({name: _input(request, name) for name, *_ in INPUTS}, self.task, self.vocab_size,
                                    self.default_seed, self.backend)
            except Rejected as e:
                self._reject(sender, e.reason, str(e))
                continue
            for reason in job.rejected:
                self.rejected[("eqr_puzzles_rejected", reason)].increment(1)
            if not len(job.good):  # every puzzle bad: answered at once, nothing to run
                self.outbox.put(("final", sender, job, None, None))
                continue
            handle: list[Any] = []  # the future, for the responder to cancel when the client hangs up
            progress = (lambda partial, s=sender, j=job, h=handle: self.outbox.put(("partial", s, j, partial, h))) \
                if job.stream else None
            try:
                future = self.scheduler.submit(job.tokens, seed=job.seed, timeout=SUBMIT_TIMEOUT_S, breadth=job.breadth,
                                               max_steps=job.max_steps, on_progress=progress,
                                               numbers=job.offset + job.good, noise=job.noise)
            except queue.Full:
                self._reject(sender, "busy", f"{self.name} is busy: its queue is full; retry later or add instances")
                continue
            except NotReady as e:
                self._reject(sender, "unavailable", str(e))
                continue
            except (EqRError, RuntimeError) as e:  # a bad breadth/max_steps, or the scheduler is shut down
                self._reject(sender, "value" if isinstance(e, EqRError) else "unavailable", str(e))
                continue
            handle.append(future)
            future.add_done_callback(lambda f, s=sender, j=job: self.outbox.put(("final", s, j, None, f)))
        return None

    def finalize(self) -> None:
        """Unloading (also on server shutdown, after Triton's exit timeout): every request gets an answer."""
        self.scheduler.shutdown(wait=True, cancel=True)  # cancelled futures become error responses
        self.outbox.put(None)
        self.responder.join(timeout=10)
        self.scheduler.solver.close()

    def _reject(self, sender: Any, reason: str, message: str) -> None:
        self.rejected[("eqr_requests_rejected", reason)].increment(1)
        _send_error(sender, message)

    # ------------------------------------------------------------------ responses (responder thread)
    def _respond(self) -> None:
        while (item := self.outbox.get()) is not None:
            kind, sender, job, partial, future = item
            try:
                if kind == "partial":
                    if all(f.done() for f in future):  # its final is sent or queued: this one is stale
                        continue
                    if sender.is_cancelled():  # the client went away: admit no more of its puzzles
                        for cancelled in future:
                            cancelled.cancel()
                        continue
                    sender.send(_response(partial_tensors(job, partial, self.task)))
                else:
                    self._send_final(sender, job, future)
                    self._update_metrics()
            except Exception:  # one broken connection must not stop the answers to everyone else
                log.exception("%s: could not send a response", self.name)

    def _send_final(self, sender: Any, job: Any, future: Any) -> None:
        if future is None:
            sender.send(_response(result_tensors(job, None, self.task)), flags=FINAL)
        elif future.cancelled():
            self._reject(sender, "unavailable",
                         f"{self.name} is shutting down; the request was cancelled before it finished")
        elif isinstance(future.exception(), RequestError):  # not ready, or the request cannot fit
            self._reject(sender, "unavailable" if isinstance(future.exception(), NotReady) else "value",
                         str(future.exception()))
        elif future.exception() is not None:  # a backend fault on its batch: its puzzles failed
            error = future.exception()
            failed = f"the backend failed on this puzzle ({type(error).__name__}: {error}); retry it"
            sender.send(_response(result_tensors(job, None, self.task, failed=failed)), flags=FINAL)
        else:
            sender.send(_response(result_tensors(job, future.result(), self.task)), flags=FINAL)

    # ------------------------------------------------------------------ metrics (Triton's /metrics)
    def _init_metrics(self) -> None:
        labels = {"model": self.name}
        # Triton requires each MetricFamily to outlive its Metrics: keep both.
        self.families = {name: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.COUNTER)
                         for name, _, text in COUNTERS}
        gauges = (("eqr_converged_fraction", "Fraction of answered puzzles that converged"),
                  ("eqr_queue_depth", "Requests waiting for the working batch"),
                  ("eqr_ready", "1 while the scheduler serves, 0 after repeated backend faults"))
        for name, text in gauges:
            self.families[name] = pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.GAUGE)
        self.counters = {key: self.families[name].Metric(labels=labels) for name, key, _ in COUNTERS}
        for name, _, text in REJECTION_COUNTERS:
            self.families[name] = pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.COUNTER)
        self.rejected = {(name, reason): self.families[name].Metric(labels=labels | {"reason": reason})
                         for name, reasons, _ in REJECTION_COUNTERS for reason in reasons}
        self.sent = dict.fromkeys(self.counters, 0)
        self.converged, self.queue_depth, self.ready = (self.families[name].Metric(labels=labels) for name, _ in gauges)
        self.ready.set(1)

    def _update_metrics(self) -> None:
        counts = dict(self.scheduler.counts)
        for key, metric in self.counters.items():
            metric.increment(counts[key] - self.sent[key])
            self.sent[key] = counts[key]
        self.converged.set(counts["converged"] / counts["answered"] if counts["answered"] else 0.0)
        self.queue_depth.set(self.scheduler.pending)
        self.ready.set(1 if self.scheduler.ready else 0)
        if not self.scheduler.ready and not self.unloading:
            self.unloading = True
            threading.Thread(target=self._unload, name="eqr-unload", daemon=True).start()

    def _unload(self) -> None:
        """Repeated backend faults: take the model out of service, so /v2/models/NAME/ready says no.

        Triton's Python backend (2.51) keeps a model ready whatever its stub reports, so the model
        unloads itself; that needs --model-control-mode=explicit (as `eqr serve` runs it). Without
        it, every request gets a "not ready" error and the eqr_ready metric reads 0.
        """
        log.error("%s: not ready after repeated backend faults; unloading it", self.name)
        try:
            pb_utils.unload_model(self.name)
        except Exception as e:
            log.error("%s: could not unload itself (%s); start tritonserver with --model-control-mode=explicit "
                      "so repeated faults show on /v2/models/%s/ready", self.name, e, self.name)


def _input(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _response(arrays: dict[str, Any]) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, arrays[name].astype(dtype))
                                                      for name, dtype, *_ in OUTPUTS])


def _send_error(sender: Any, message: str) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
