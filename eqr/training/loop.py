"""Deep-supervision training with a rolling batch, resumable and distributed
(docs/training.md#deep-supervision-with-a-rolling-batch).

Every optimizer step runs one outer step for every row of a persistent carry. Rows that halted
on the previous step are refilled from the step's batch with a fresh random state; the others
continue on their own puzzle from their detached state. The model's `step` keeps the gradient
to the last latent recursion only.

Exact resume: batches are pure functions of (seed, step), the carry, optimizer, EMA, curriculum
stage and every generator state are saved in `train_state`, so a resumed run replays the same
computation as an uninterrupted one.

Distributed (torchrun, gloo): each rank owns a contiguous slice of the global batch. Initial
states and exploration draws come from one generator shared by all ranks (drawn for the global
batch, then sliced), gradients and metrics are summed over ranks, so the run equals a
single-process run with the same global batch up to the path noise, which each rank draws from
its own stream (official: seed + rank).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from eqr.contract.config import ModelConfig, TrainConfig
from eqr.contract.errors import EqRError
from eqr.contract.io import atomic_write_text
from eqr.model.checkpoint import read_checkpoint, save_checkpoint
from eqr.model.network import EqRModel, LatentState
from eqr.training.data import BatchSource, step_seed
from eqr.training.ema import EMA
from eqr.training.evaluate import evaluate
from eqr.training.losses import exact_correct, q_halt_loss, stablemax_cross_entropy
from eqr.training.optim import AdamATan2, lr_at

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"


# --------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, global_batch: int) -> slice:
        per_rank = global_batch // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's slice along dim 0 (the global batch)."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)


def ranks_from_env() -> Ranks:
    """torchrun sets WORLD_SIZE/RANK; start the gloo process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


# --------------------------------------------------------------------------- carry


@dataclass
class Carry:
    """The rolling batch: per-row state, step count, halted flag and the puzzle being solved."""

    state: LatentState  # z_H, z_L [B, L, D], detached
    steps: torch.Tensor  # [B] int32 outer steps taken on the current puzzle
    halted: torch.Tensor  # [B] bool: refill this row on the next step
    inputs: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L] int64

    @staticmethod
    def empty(batch: int, seq_len: int, width: int, dtype: torch.dtype) -> "Carry":
        zeros = torch.zeros(batch, seq_len, width, dtype=dtype)
        tokens = torch.zeros(batch, seq_len, dtype=torch.long)
        return Carry(LatentState(zeros, zeros.clone()), torch.zeros(batch, dtype=torch.int32),
                     torch.ones(batch, dtype=torch.bool), tokens, tokens.clone())

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"z_H": self.state.z_H, "z_L": self.state.z_L, "steps": self.steps, "halted": self.halted,
                "inputs": self.inputs, "labels": self.labels}

    @staticmethod
    def from_dict(d: dict[str, torch.Tensor]) -> "Carry":
        return Carry(LatentState(d["z_H"], d["z_L"]), d["steps"], d["halted"], d["inputs"], d["labels"])


# --------------------------------------------------------------------------- trainer


@dataclass
class EvalSet:
    inputs: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], -100 = ignore
    tiers: list[str] | None = None


class Trainer:
    """Owns the model, optimizer, EMA, carry and counters; `run` trains until done or out of time."""

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, source: BatchSource, out_dir: Path,
                 metadata: dict[str, Any], eval_set: EvalSet | None = None, ranks: Ranks = Ranks()) -> None:
        if train_config.global_batch_size % ranks.world:
            raise EqRError(f"global batch {train_config.global_batch_size} is not divisible by {ranks.world} "
                           "processes; choose a multiple of --nproc_per_node")
        self.model_config, self.config = model_config, train_config
        self.source, self.out_dir, self.metadata = source, Path(out_dir), metadata
        self.eval_set, self.ranks = eval_set, ranks
        self.model = EqRModel(model_config, seed=train_config.seed).train()
        self.optimizer = AdamATan2(self.model.parameters(), lr=0.0, betas=(train_config.beta1, train_config.beta2),
                                   weight_decay=train_config.weight_decay)
        self.ema = EMA(self.model, train_config.ema_rate) if train_config.ema else None
        # initial states and exploration: identical on every rank (global draws, sliced)
        self.shared_gen = torch.Generator().manual_seed(step_seed(train_config.seed, 0, 1))
        # path noise: one stream per rank
        self.noise_gen = torch.Generator().manual_seed(step_seed(train_config.seed, ranks.rank, 2))
        self.step = 0
        self.stage = 0
        self.window = torch.zeros(2, dtype=torch.float64)  # [correct, halted] since the last promotion check
        self.wall_time_s = 0.0
        self.carry: Carry | None = None
        self.last_eval: dict[str, Any] | None = None

    # ----------------------------------------------------------- curriculum

    def stage_settings(self) -> tuple[dict[str, Any], int]:
        """(task options, N_sup) of the current curriculum stage."""
        if not self.config.curriculum:
            return {}, self.model_config.halt_max_steps
        stage = self.config.curriculum[self.stage]
        return dict(stage.get("options", {})), int(stage.get("halt_max_steps", self.model_config.halt_max_steps))

    def _maybe_promote(self, correct: float, halted: float) -> None:
        self.window += torch.tensor([correct, halted], dtype=torch.float64)
        if (self.step % self.config.promote_window or not self.config.curriculum
                or self.stage >= len(self.config.curriculum) - 1):
            return
        accuracy = float(self.window[0] / self.window[1].clamp_min(1))
        if accuracy >= self.config.promote_accuracy:
            self.stage += 1
            log.info("step %d: train exact %.3f >= %.3f, curriculum stage %d: %s", self.step, accuracy,
                     self.config.promote_accuracy, self.stage, self.config.curriculum[self.stage])
        self.window.zero_()

    # ----------------------------------------------------------- one optimizer step

    def train_step(self) -> dict[str, float]:
        cfg, model = self.config, self.model
        G, rows = cfg.global_batch_size, self.ranks.rows(cfg.global_batch_size)
        options, n_sup = self.stage_settings()
        batch_inputs, batch_labels = self.source.batch(self.step, G, options)  # [G, L] each
        fresh = model.initial_state(G, self.shared_gen)  # [G, L, D] each
        explore = torch.rand(G, generator=self.shared_gen)[rows] < model.config.halt_exploration_prob  # [B]
        min_steps = torch.randint(2, max(n_sup, 2) + 1, (G,), generator=self.shared_gen)[rows]  # [B]

        state, inputs, labels, steps = self._refill(batch_inputs[rows], batch_labels[rows],
                                                    LatentState(fresh.z_H[rows], fresh.z_L[rows]))
        model.train()
        out = model.step(state, inputs, noise=model.config.noise_scale, generator=self.noise_gen)
        correct = exact_correct(out.logits.detach(), labels)  # [B]
        lm_loss = stablemax_cross_entropy(out.logits, labels)
        q_loss = q_halt_loss(out.q_halt, correct)
        loss = (lm_loss + cfg.q_loss_weight * q_loss) / G
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                self.ranks.sum_(p.grad)
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(model)

        steps = steps + 1
        halted = self._halted(steps, out.q_halt.detach(), n_sup, torch.where(explore, min_steps, 0))
        self.carry = Carry(out.state, steps.int(), halted, inputs, labels)
        self.step += 1

        valid = labels != -100
        cell_hits = ((out.logits.detach().argmax(-1) == labels) & valid).sum(-1) / valid.sum(-1).clamp_min(1)
        sums = torch.stack([lm_loss.detach().double(), q_loss.detach().double(), torch.tensor(float(len(labels))),
                            halted.sum().double(), (correct & halted).sum().double(),
                            (cell_hits * halted).sum().double(), (steps * halted).sum().double()])
        lm, q, n, n_halted, n_correct, cell, steps_sum = self.ranks.sum_(sums).tolist()
        self._maybe_promote(n_correct, n_halted)
        return {"step": self.step, "stage": self.stage, "n_sup": n_sup, "lr": lr, "lm_loss": lm / n,
                "q_loss": q / n, "halted": n_halted, "exact": n_correct / max(n_halted, 1),
                "cell": cell / max(n_halted, 1), "mean_steps": steps_sum / max(n_halted, 1)}

    def _refill(self, batch_inputs: torch.Tensor, batch_labels: torch.Tensor, fresh: LatentState,
                ) -> tuple[LatentState, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows that halted last step take this step's puzzle and a fresh random state; the rest continue."""
        model = self.model
        if self.carry is None:
            self.carry = Carry.empty(len(batch_inputs), model.config.seq_len, model.config.hidden_size, model.dtype)
        carry, reset = self.carry, self.carry.halted  # reset: [B]
        z_H = torch.where(reset[:, None, None], fresh.z_H, carry.state.z_H)  # [B, L, D]
        z_L = torch.where(reset[:, None, None], fresh.z_L, carry.state.z_L)  # [B, L, D]
        inputs = torch.where(reset[:, None], batch_inputs, carry.inputs)  # [B, L]
        labels = torch.where(reset[:, None], batch_labels, carry.labels)  # [B, L]
        return LatentState(z_H, z_L), inputs, labels, torch.where(reset, 0, carry.steps)

    @staticmethod
    def _halted(steps: torch.Tensor, q_halt: torch.Tensor, n_sup: int, min_steps: torch.Tensor) -> torch.Tensor:
        """[B] halt at the N_sup cap, or once q_halt > 0 but not before the exploration minimum
        (docs/training.md#halting-and-exploration)."""
        halted = steps >= n_sup
        if n_sup > 1:
            halted |= q_halt > 0
            halted &= steps >= min_steps
        return halted

    # ----------------------------------------------------------- evaluation

    def ema_model(self) -> EqRModel:
        """A copy of the model carrying the EMA weights (what evaluation and export use)."""
        model = copy.deepcopy(self.model)
        if self.ema is not None:
            model.load_state_dict(self.ema.state_dict(self.model))
        return model.eval()

    def run_eval(self) -> dict[str, Any]:
        assert self.eval_set is not None
        report = evaluate(self.ema_model(), self.eval_set.inputs, self.eval_set.labels, self.config.eval_depths,
                          seed=step_seed(self.config.seed, self.step, 3), tiers=self.eval_set.tiers)
        self.last_eval = report
        return report

    # ----------------------------------------------------------- checkpoints

    def train_state(self) -> dict[str, Any]:
        """Everything resume needs; plain containers and tensors only (weights_only loading)."""
        assert self.carry is not None
        carry = {k: self.ranks.gather_rows(v) for k, v in self.carry.to_dict().items()}
        noise_states = self.ranks.gather_rows(self.noise_gen.get_state()[None])  # [world, S]
        return {"step": self.step, "stage": self.stage, "window": self.window.clone(),
                "wall_time_s": self.wall_time_s, "world_size": self.ranks.world,
                "optimizer": self.optimizer.state_dict(), "carry": carry,
                "shared_gen": self.shared_gen.get_state(), "noise_gens": noise_states}

    def save(self, path: Path | None = None) -> Path:
        """Write `last.pt` atomically (collective: every rank must call it)."""
        path = path or self.out_dir / CHECKPOINT_NAME
        state = self.train_state()
        if self.ranks.is_main:
            metadata = self.metadata | {"train_config": self.config.to_dict(), "wall_time_s": self.wall_time_s,
                                        "metrics": {"step": self.step, "stage": self.stage,
                                                    "last_eval": self.last_eval}}
            ema_state = self.ema.state_dict(self.model) if self.ema is not None else None
            save_checkpoint(path, self.model_config, self.model.state_dict(), ema_state, metadata, state)
        return path

    def load(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
        state = ckpt.train_state
        if ckpt.kind != "eqr" or not state:
            raise EqRError(f"{path}: has no training state to resume from; start a new run with another --out")
        self.model.load_state_dict(ckpt.model)
        if self.ema is not None and ckpt.ema is not None:
            self.ema.load_state_dict(ckpt.ema)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.stage = int(state["step"]), int(state["stage"])
        self.window = state["window"].clone()
        self.wall_time_s = float(state["wall_time_s"])
        rows = self.ranks.rows(self.config.global_batch_size)
        self.carry = Carry.from_dict({k: v[rows].clone() for k, v in state["carry"].items()})
        self.shared_gen.set_state(state["shared_gen"])
        if int(state["world_size"]) == self.ranks.world:
            self.noise_gen.set_state(state["noise_gens"][self.ranks.rank].clone())
        else:
            log.warning("resuming on %d processes from a %d-process run: path noise streams are reseeded",
                        self.ranks.world, int(state["world_size"]))
            self.noise_gen.manual_seed(step_seed(self.config.seed, self.ranks.rank + 1000 * self.step, 2))
        self.last_eval = (ckpt.metadata.get("metrics") or {}).get("last_eval")
        if self.ranks.is_main:
            _trim_jsonl(self.out_dir / METRICS_NAME, self.step)

    def init_from(self, path: Path) -> dict[str, Any]:
        """Start from another run's weights and EMA (fresh optimizer and carry); returns its provenance."""
        from eqr.model.checkpoint import check_state_dict

        ckpt = read_checkpoint(path)
        check_state_dict(self.model.state_dict(), ckpt.model, f"{path} (--init-from)")
        self.model.load_state_dict(ckpt.model)
        if self.ema is not None:
            self.ema.load_state_dict(ckpt.ema if ckpt.ema is not None else ckpt.model)
        meta = ckpt.metadata
        return {"path": str(path), "sha256": ckpt.sha256, "train_command": meta.get("train_command"),
                "preset": meta.get("preset"), "train_config": meta.get("train_config"),
                "steps": (meta.get("metrics") or {}).get("step"), "wall_time_s": meta.get("wall_time_s", 0.0),
                "last_eval": (meta.get("metrics") or {}).get("last_eval"), "init_from": meta.get("init_from")}

    # ----------------------------------------------------------- the loop

    def run(self, max_minutes: float | None = None, on_step: Callable[[dict[str, float]], None] | None = None) -> str:
        """Train until `epochs` steps or `max_minutes`; returns "done" or "time"."""
        cfg = self.config
        metrics_path = self.out_dir / METRICS_NAME
        start = time.monotonic()
        base_wall = self.wall_time_s
        reason = "done"
        while self.step < cfg.epochs:
            if max_minutes is not None and self._out_of_time(start, max_minutes):
                reason = "time"
                break
            record = self.train_step()
            self.wall_time_s = base_wall + time.monotonic() - start
            record["wall_time_s"] = round(self.wall_time_s, 2)
            if self.ranks.is_main and (self.step % cfg.log_interval == 0 or self.step == cfg.epochs):
                _append_jsonl(metrics_path, {"type": "train"} | record)
            if self.eval_set is not None and self.ranks.is_main and (
                    self.step % cfg.eval_interval == 0 or self.step == cfg.epochs):
                report = self.run_eval()
                _append_jsonl(metrics_path, {"type": "eval", "step": self.step, "stage": self.stage,
                                             "wall_time_s": round(self.wall_time_s, 2)} | report)
                log.info("step %d eval: %s", self.step,
                         ", ".join(f"D{r['depth']} {r['exact']:.3f}" for r in report["by_depth"]))
            if self.step % cfg.checkpoint_interval == 0:
                self.save()
            if on_step is not None:
                on_step(record)
        self.wall_time_s = base_wall + time.monotonic() - start
        self.save()
        return reason

    def _out_of_time(self, start: float, max_minutes: float) -> bool:
        """Rank 0's clock decides, so that every rank stops at the same step."""
        flag = torch.tensor([float(time.monotonic() - start >= 60.0 * max_minutes)])
        if self.ranks.world > 1:
            dist.broadcast(flag, src=0)
        return bool(flag.item())


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_jsonl(path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log reads as one run."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
