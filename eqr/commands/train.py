"""`eqr train` and its torchrun entry point `python -m eqr.commands.train` (same flags).

\b
    eqr train --preset cpu-sudoku-4x4 --out runs/sudoku4 --max-minutes 30
    torchrun --nproc_per_node 2 -m eqr.commands.train --preset cpu-sudoku-4x4 --out runs/sudoku4
"""
from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from eqr.commands.options import batch_option, force_option, out_option, run_command
from eqr.contract.config import PRESETS, ModelConfig, TrainConfig, preset
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress
from eqr.tasks import TASKS, get_task
from eqr.training.data import ArraySource, BatchSource, GeneratedSource, step_seed, to_training_labels
from eqr.training.loop import CHECKPOINT_NAME, METRICS_NAME, EvalSet, Trainer, ranks_from_env

EVAL_SEED_STREAM = 4  # held-out puzzles during training: a seed stream no training batch uses


def build_source(train_config: TrainConfig, task_name: str | None, size: int | None,
                 data: Path | None) -> tuple[BatchSource, EvalSet | None, dict[str, Any], dict[str, Any]]:
    """-> (training source, held-out set, metadata["task"], metadata["data"])."""
    if data is not None:
        from eqr.tasks.dataset import load_dataset

        train = load_dataset(data, "train")
        source = ArraySource(np.asarray(train.inputs), np.asarray(train.labels), int(train.metadata["vocab_size"]),
                             train_config.seed, np.asarray(train.group_indices))
        task = train.task
        eval_set = None
        if (data / "test").is_dir():
            test = load_dataset(data, "test")
            n = train_config.eval_size
            inputs = torch.as_tensor(np.asarray(test.inputs[:n])).long()
            tiers = [str(t) for t in task.tier_of(np.asarray(test.inputs[:n]))] if task is not None else None
            eval_set = EvalSet(inputs, to_training_labels(test.labels[:n]), tiers)
        task_meta = task.describe() if task is not None else {"name": "dataset", "seq_len": source.seq_len,
                                                               "vocab_size": source.vocab_size}
        return source, eval_set, task_meta, {"source": "dataset", "path": str(data), "rows": len(train.inputs)}
    if task_name is None or size is None:
        raise EqRError("no training data: pass --data DIR (from `eqr data generate`) or --task and --size "
                       "(puzzles generated on the fly), or use a preset that names its task")
    task = get_task(task_name, size)
    source = GeneratedSource(task, train_config.seed)
    options = dict(train_config.curriculum[-1].get("options", {})) if train_config.curriculum else {}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    held_out = task.generate(train_config.eval_size, seed=step_seed(train_config.seed, 0, EVAL_SEED_STREAM),
                             **options)
    eval_set = EvalSet(torch.as_tensor(held_out.inputs).long(), to_training_labels(held_out.labels),
                       [str(t) for t in held_out.tiers])
    data_meta = {"source": "generated", "seed": train_config.seed,
                 "curriculum": [dict(s) for s in train_config.curriculum]}
    return source, eval_set, task.describe(), data_meta


def configs_for(preset_name: str, overrides: dict[str, Any], seq_len: int,
                vocab: int) -> tuple[ModelConfig, TrainConfig]:
    model_config, train_config = preset(preset_name)
    model_config = dataclasses.replace(model_config, seq_len=seq_len, vocab_size=vocab)
    return model_config, dataclasses.replace(train_config, **overrides)


def prepare_out_dir(out: Path, resume: bool, force: bool) -> None:
    checkpoint = out / CHECKPOINT_NAME
    if resume:
        if not checkpoint.exists():
            raise EqRError(f"{checkpoint}: nothing to resume; run without --resume to start training in {out}")
        return
    if checkpoint.exists() or (out / METRICS_NAME).exists():
        if not force:
            raise EqRError(f"{out} already holds a training run; pass --resume to continue it or --force to start over")
        for name in (CHECKPOINT_NAME, METRICS_NAME):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# Settings a resumed run may change: none of them alters the weights it computes.
RESUMABLE_OVERRIDES = {"epochs", "eval_interval", "checkpoint_interval"}


def resume_configs(out: Path, overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig, dict[str, Any]]:
    from eqr.model.checkpoint import read_checkpoint

    ckpt = read_checkpoint(out / CHECKPOINT_NAME)
    meta = ckpt.metadata
    train_config = dataclasses.replace(TrainConfig.from_dict(meta["train_config"]), **overrides)
    return ckpt.config, train_config, meta


EPILOG = """\b
Examples:
  eqr train --preset cpu-sudoku-4x4 --out runs/sudoku4 --max-minutes 30
  eqr train --out runs/sudoku4 --resume --max-minutes 30        # continue exactly
  eqr train --preset cpu-maze-9 --out runs/maze9 --steps 200 --batch 32
  eqr train --preset paper-sudoku --data data/sudoku-extreme-full --out runs/paper
  torchrun --nproc_per_node 2 -m eqr.commands.train --preset tiny --task sudoku --size 4 --out runs/t
"""


@click.command(epilog=EPILOG)
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default=None,
              help="Model and recipe preset (ignored with --resume).")
@out_option(type=click.Path(path_type=Path), required=True, help="Run folder: last.pt, metrics.jsonl.")
@click.option("--task", "task_name", type=click.Choice(sorted(TASKS)), default=None,
              help="Generate training puzzles on the fly (seeded, resumable).")
@click.option("--size", type=int, default=None, help="Board side for --task (sudoku 4|6|9, maze 9..30).")
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="A data set folder from `eqr data generate` (train/ and optional test/).")
@click.option("--steps", type=int, default=None, help="Optimizer steps in total (TrainConfig.epochs).")
@batch_option(default=None, type=click.IntRange(min=1),
              help="Global batch (summed over processes).")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--seed", type=int, default=None, help="Seed of weights, data order and all noise.")
@click.option("--eval-interval", type=int, default=None, help="Steps between held-out evaluations.")
@click.option("--checkpoint-interval", type=int, default=None, help="Steps between atomic checkpoints.")
@click.option("--noise-scale", type=float, default=None,
              help="Training path noise sigma (ModelConfig.noise_scale); 0 makes multi-process runs "
                   "bitwise comparable to one process.")
@click.option("--max-minutes", type=float, default=None, help="Stop (and checkpoint) after this much training time.")
@click.option("--init-from", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Start from another run's checkpoint weights and EMA (fresh optimizer, step 0), e.g. to "
                   "continue with a new curriculum; its training time and command are kept in the metadata.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where its checkpoint left it.")
@force_option(help="Start over in an --out that already holds a run.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train(preset_name: str | None, out: Path, task_name: str | None, size: int | None, data: Path | None,
          steps: int | None, batch: int | None, lr: float | None, seed: int | None, eval_interval: int | None,
          checkpoint_interval: int | None, noise_scale: float | None, max_minutes: float | None,
          init_from: Path | None, resume: bool, force: bool, quiet: bool) -> None:
    """Train an EqR with rolling-batch deep supervision (docs/training.md).

    Checkpoints are atomic: killing the process loses at most the steps since the last one.
    Metrics (train and held-out exact accuracy by depth) go to OUT/metrics.jsonl.

    \b
    Examples:
      eqr train --preset cpu-sudoku-4x4 --out runs/s4 --max-minutes 30
      eqr train --out runs/s4 --resume --steps 4000
      eqr train --preset paper-sudoku --data data/sudoku-extreme --out runs/paper
      torchrun --nproc_per_node 2 -m eqr.commands.train --preset tiny --out runs/ddp --noise-scale 0
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    ranks = ranks_from_env()
    overrides = {k: v for k, v in dict(epochs=steps, global_batch_size=batch, lr=lr, seed=seed,
                                        eval_interval=eval_interval,
                                        checkpoint_interval=checkpoint_interval).items() if v is not None}
    if resume:
        prepare_out_dir(out, resume, force)
        extra = set(overrides) - RESUMABLE_OVERRIDES
        if preset_name or extra or noise_scale is not None or init_from is not None:
            raise EqRError("--resume continues with the run's own settings; only --steps, --max-minutes, "
                           "--eval-interval and --checkpoint-interval may change")
        model_config, train_config, meta = resume_configs(out, overrides)
        task_meta = meta.get("task", {})
        data_meta = meta.get("data", {})
        data = Path(data_meta["path"]) if data_meta.get("source") == "dataset" else None
        source, eval_set, _, _ = build_source(train_config, task_meta.get("name"), task_meta.get("size"), data)
        command = meta.get("train_command", "") + " && " + _command_line()
        preset_name = meta.get("preset")
        prior = meta.get("init_from")
    else:
        if preset_name is None:
            raise EqRError("pass --preset (one of: " + ", ".join(sorted(PRESETS)) + ") or --resume")
        base_train = preset(preset_name)[1]
        task_name, size = _preset_task(base_train, task_name, size, data)
        probe = dataclasses.replace(base_train, **overrides)
        source, eval_set, task_meta, data_meta = build_source(probe, task_name, size, data)
        model_config, train_config = configs_for(preset_name, overrides, source.seq_len, source.vocab_size)
        if noise_scale is not None:
            model_config = dataclasses.replace(model_config, noise_scale=noise_scale)
        if ranks.is_main:
            prepare_out_dir(out, resume, force)
        command = _command_line()
        prior = None
    metadata = {"task": task_meta, "data": data_meta, "train_command": command, "preset": preset_name}
    trainer = Trainer(model_config, train_config, source, out, metadata, eval_set, ranks)
    if resume:
        trainer.load(out / CHECKPOINT_NAME)
    elif init_from is not None:
        prior = trainer.init_from(init_from)
    if prior is not None:
        metadata["init_from"] = prior
    _run_with_progress(trainer, max_minutes, quiet or not ranks.is_main)
    if ranks.world > 1:
        torch.distributed.barrier()  # leave together: a rank tearing gloo down early aborts the others
    if ranks.is_main:
        click.echo(f"{out / CHECKPOINT_NAME}: step {trainer.step}/{train_config.epochs}, "
                   f"wall time {trainer.wall_time_s / 60:.1f} min", err=True)


def _preset_task(train_config: TrainConfig, task_name: str | None, size: int | None,
                 data: Path | None) -> tuple[str | None, int | None]:
    """A CPU preset names its task in TrainConfig.extra["task"]; flags win."""
    if data is not None or task_name is not None:
        return task_name, size
    task = train_config.extra.get("task") or {}
    return task.get("name"), size if size is not None else task.get("size")


def _command_line() -> str:
    args = sys.argv[1:]
    prog = "eqr train" if "train" not in args[:1] else "eqr"
    return " ".join([prog] + [shlex.quote(a) for a in args])


def _run_with_progress(trainer: Trainer, max_minutes: float | None, quiet: bool) -> None:
    total = trainer.config.epochs
    if quiet:
        trainer.run(max_minutes)
        return
    if not sys.stderr.isatty():  # a log: one line at the end (evaluations are logged as they happen)
        with Progress().bar("training steps", total - trainer.step) as advance:
            trainer.run(max_minutes, on_step=lambda record: advance(1))
        return
    with click.progressbar(length=total, label="training", file=sys.stderr, show_pos=True, show_eta=True,
                           item_show_func=lambda r: r and f"exact {r['exact']:.2f} loss {r['lm_loss']:.3f} "
                                                        f"stage {r['stage']}") as bar:
        bar.update(trainer.step)
        trainer.run(max_minutes, on_step=lambda record: bar.update(1, record))


def main() -> None:
    """`python -m eqr.commands.train` / torchrun entry: the `train` command with one-line errors."""
    try:
        run_command(train, "python -m eqr.commands.train")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
