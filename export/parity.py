"""Export checks: each graph against `model.step` in torch, on task inputs from random states.

Reference: `StepGraph` in torch (FP32, noise-free) driven for N steps from random initial
states; its states at every depth are the teacher-forced inputs of the graph checks.
- step error: the graph and torch run the same (tokens, z_H[k], z_L[k]); max abs difference
  per output, over depths k (FP32: all depths; FP16/INT8: a log-spaced subset). The FP32
  gate reads it in units of each output's RMS where that exceeds 1: the states are unit-RMS
  (RMSNorm), so they are held to 1e-4 absolute, while trained logits (RMS ~50 on maze-small)
  carry FP32 round-off of that order times their scale.
- trajectory (FP16/INT8): the graph drives its own state for N steps from the same z_0; its
  argmax answers are compared with torch's after N steps, and its residual trace gives the
  floor. FP32, equal to torch within 1e-4 at every step, is read from the reference.

Recommended convergence tolerance (manifest `tol`): the median over trajectories of the
lowest residual reached in N steps is the floor, turned into a tol by the one rule,
`eqr.contract.artifact.recommended_tol`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from eqr.contract.artifact import OUTPUT_NAMES, graph_feeds
from eqr.export.inputs import Trajectory
from eqr.model.network import EqRModel
from eqr.model.step_graph import StepGraph

FP32_STEP_ATOL = 1e-4  # per step, in units of max(1, output RMS): beyond it the export fails
FLOAT_OUTPUTS = tuple(n for n in OUTPUT_NAMES if n != "preds")
ROWS_PER_CALL = 64  # teacher-forced rows per graph call

Outputs = dict[str, np.ndarray]
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray], Outputs]  # (tokens, z_H, z_L) -> outputs


def ort_step(session) -> StepFn:
    """An ONNX Runtime session as a step function with the I/O contract's names."""
    def step(tokens: np.ndarray, z_H: np.ndarray, z_L: np.ndarray) -> Outputs:
        values = session.run(list(OUTPUT_NAMES), graph_feeds(tokens, z_H, z_L))
        return dict(zip(OUTPUT_NAMES, values))
    return step


@dataclass(frozen=True)
class Reference:
    """Torch FP32 outputs along a trajectory: outputs[name] is [N, B, ...] (step k from state k)."""

    trajectory: Trajectory
    outputs: dict[str, np.ndarray]


@torch.no_grad()
def reference_run(model: EqRModel, tokens: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor, steps: int,
                  progress: Callable[[int], None] | None = None) -> Reference:
    """Drive `StepGraph` (torch) for `steps` steps; keep the states and every output per step."""
    graph = StepGraph(model).eval()
    states_H, states_L, outputs = [z_H], [z_L], {name: [] for name in OUTPUT_NAMES}
    for _ in range(steps):
        values = dict(zip(OUTPUT_NAMES, graph(tokens, states_H[-1], states_L[-1])))
        for name, value in values.items():
            outputs[name].append(value.numpy())
        states_H.append(values["z_H_out"])
        states_L.append(values["z_L_out"])
        if progress:
            progress(1)
    stacked = {name: np.stack(v) for name, v in outputs.items()}  # each [N, B, ...]
    trajectory = Trajectory(tokens, torch.stack(states_H), torch.stack(states_L), torch.from_numpy(stacked["preds"][-1]))
    return Reference(trajectory, stacked)


def step_errors(step: StepFn, ref: Reference, depths: list[int]) -> dict[str, Any]:
    """Teacher-forced error at `depths`: max abs difference per output, and argmax mismatches."""
    traj = ref.trajectory
    B = traj.tokens.shape[0]
    tokens = np.tile(traj.tokens.numpy(), (len(depths), 1))  # [len(depths)*B, L]
    z_H = traj.z_H[depths].flatten(0, 1).numpy()  # [len(depths)*B, L, D]
    z_L = traj.z_L[depths].flatten(0, 1).numpy()  # [len(depths)*B, L, D]
    chunks = [step(tokens[i:i + ROWS_PER_CALL], z_H[i:i + ROWS_PER_CALL], z_L[i:i + ROWS_PER_CALL])
              for i in range(0, len(tokens), ROWS_PER_CALL)]
    got = {name: np.concatenate([c[name] for c in chunks]) for name in OUTPUT_NAMES}
    want = {name: ref.outputs[name][depths].reshape(len(depths) * B, *ref.outputs[name].shape[2:])
            for name in OUTPUT_NAMES}
    per_output = {name: float(np.abs(got[name].astype(np.float64) - want[name]).max()) for name in FLOAT_OUTPUTS}
    scale = {name: max(1.0, float(np.sqrt(np.mean(np.square(want[name], dtype=np.float64))))) for name in FLOAT_OUTPUTS}
    first = slice(0, B)  # depth depths[0] == 0: the one-step check from random states
    one_step = {name: float(np.abs(got[name][first].astype(np.float64) - want[name][first]).max())
                for name in FLOAT_OUTPUTS}
    state_scale = float(np.abs(np.concatenate([want["z_H_out"].ravel(), want["z_L_out"].ravel()])).max())
    last = slice((len(depths) - 1) * B, len(depths) * B)  # the deepest checked depth
    final_same = got["preds"][last] == want["preds"][last]  # [B, L]
    return {
        "depths": depths,
        "max_abs": max(per_output.values()),
        "max_scaled": max(per_output[name] / scale[name] for name in FLOAT_OUTPUTS),  # the FP32 gate
        "max_abs_one_step": max(one_step.values()),
        "max_abs_per_output": per_output,
        "state_rel": max(per_output["z_H_out"], per_output["z_L_out"]) / max(state_scale, 1e-12),
        "preds_mismatch_fraction": float(np.mean(got["preds"] != want["preds"])),
        "final_preds_mismatch_fraction": float(1.0 - np.mean(final_same)),
        "final_answers_differ": float(1.0 - np.mean(final_same.all(axis=1))),
    }


def trajectory_check(step: StepFn, ref: Reference, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Let the graph drive its own state from z_0; compare answers after N steps with torch."""
    traj = ref.trajectory
    tokens, z_H, z_L = traj.tokens.numpy(), traj.z_H[0].numpy(), traj.z_L[0].numpy()
    residuals = []
    out: Outputs = {}
    for _ in range(traj.steps):
        out = step(tokens, z_H, z_L)
        z_H, z_L = out["z_H_out"], out["z_L_out"]
        residuals.append(out["residual"])
        if progress:
            progress(1)
    trace = np.stack(residuals, axis=1)  # [B, N]
    want = ref.outputs["preds"][-1]  # [B, L]
    same = out["preds"] == want
    return {
        "steps": traj.steps,
        "answers_agree": float(np.mean(same.all(axis=1))),  # fraction of trajectories with identical answers
        "tokens_agree": float(np.mean(same)),
        "final_state_max_abs": float(max(np.abs(z_H - traj.z_H[-1].numpy()).max(),
                                         np.abs(z_L - traj.z_L[-1].numpy()).max())),
        "residual_trace_median": [float(v) for v in np.median(trace, axis=0)],  # [N]
        "residual_floor": float(np.median(trace.min(axis=1))),
    }


def reference_trajectory(ref: Reference, errors: dict[str, Any]) -> dict[str, Any]:
    """The FP32 graph's trajectory summary when it was checked teacher-forced at every depth.

    Within 1e-4 of torch at every step, its trajectory is torch's: the floor is read from the
    reference residuals, and its answers are its own argmax at the last depth.
    """
    trace = ref.outputs["residual"].T  # [B, N]
    return {
        "steps": ref.trajectory.steps,
        "answers_agree": 1.0 - errors["final_answers_differ"],
        "tokens_agree": 1.0 - errors["final_preds_mismatch_fraction"],
        "final_state_max_abs": errors["max_abs"],
        "residual_trace_median": [float(v) for v in np.median(trace, axis=0)],
        "residual_floor": float(np.median(trace.min(axis=1))),
        "teacher_forced": True,
    }


def check_depths(steps: int, every_depth: bool) -> list[int]:
    """All depths 0..N-1, or 0, 1, 2, 4, ... and N-1 (the teacher-forced subset)."""
    if every_depth:
        return list(range(steps))
    depths, k = [0], 1
    while k < steps:
        depths.append(k)
        k *= 2
    return sorted(set(depths + [steps - 1]))
