"""Training mechanics on synthetic token data: losses, optimizer, EMA, rolling carry, resume."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from eqr.contract.config import TrainConfig
from eqr.model.network import EqRModel
from eqr.training.data import ArraySource
from eqr.training.ema import EMA
from eqr.training.evaluate import steps_to_stable
from eqr.training.loop import CHECKPOINT_NAME, Trainer
from eqr.training.losses import exact_correct, q_halt_loss, stablemax_cross_entropy, stablemax_log_probs
from eqr.training.optim import AdamATan2, lr_at

# --------------------------------------------------------------------------- losses


def test_stablemax_log_probs_follow_the_definition():
    logits = torch.tensor([[2.0, 0.0, -1.0, -3.0]])
    s = torch.tensor([3.0, 1.0, 1 / 2, 1 / 4], dtype=torch.float64)
    expected = torch.log(s / s.sum())
    got = stablemax_log_probs(logits)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[0], expected)


def test_stablemax_cross_entropy_is_sum_of_per_row_means_over_valid_tokens():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, -100], [0, 4, 3]])
    log_p = stablemax_log_probs(logits)
    row0 = -(log_p[0, 0, 1] + log_p[0, 1, 2]) / 2
    row1 = -(log_p[1, 0, 0] + log_p[1, 1, 4] + log_p[1, 2, 3]) / 3
    torch.testing.assert_close(stablemax_cross_entropy(logits, labels), row0 + row1)


def test_exact_correct_ignores_unlabelled_positions_and_q_loss_is_summed_bce():
    logits = torch.zeros(2, 2, 3)
    logits[0, :, 1] = 1.0  # predicts 1, 1
    logits[1, :, 2] = 1.0  # predicts 2, 2
    labels = torch.tensor([[1, -100], [2, 0]])
    assert exact_correct(logits, labels).tolist() == [True, False]
    q = torch.tensor([0.0, 0.0])
    torch.testing.assert_close(q_halt_loss(q, torch.tensor([True, False])), torch.tensor(2 * math.log(2.0)))


# --------------------------------------------------------------------------- optimizer, schedule, EMA


def test_adam_atan2_steps_match_the_formula():
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    grads = [torch.tensor([0.1, -0.2, 0.0]), torch.tensor([0.3, 0.1, -0.5])]
    opt = AdamATan2([p], lr=0.01, betas=(0.9, 0.95), weight_decay=0.5)
    ref, m, v = p.detach().clone(), torch.zeros(3), torch.zeros(3)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - 0.01 * 0.5)
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        ref = ref - 0.01 / (1 - 0.9**t) * torch.atan2(m, v.sqrt() / math.sqrt(1 - 0.95**t))
    torch.testing.assert_close(p.detach(), ref)


def test_adam_atan2_step_is_bounded_without_epsilon():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AdamATan2([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.tensor([1e6, 0.0])
    opt.step()
    assert abs(p[0].item()) <= 0.1 * math.pi / 2 / (1 - 0.9) + 1e-6
    assert p[1].item() == 0.0  # atan2(0, 0) = 0


def test_lr_warmup_then_constant_as_official():
    cfg = TrainConfig(lr=1e-4, lr_warmup_steps=2000, epochs=50_000)
    assert lr_at(0, cfg) == pytest.approx(1e-4 / 2000)
    assert lr_at(998, cfg) == pytest.approx(1e-4 * 999 / 2000)
    assert lr_at(1999, cfg) == pytest.approx(1e-4)
    assert lr_at(40_000, cfg) == pytest.approx(1e-4)
    cosine = dataclasses.replace(cfg, lr_min_ratio=0.1)
    assert lr_at(49_999, cosine) == pytest.approx(1e-5)


def test_ema_moves_toward_parameters():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(model, rate=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], start + 0.1)


# --------------------------------------------------------------------------- data


def synthetic_data(n: int = 64, seq_len: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tokens 1..5; the label of each token is a fixed permutation of it (learnable per token)."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, 6, size=(n, seq_len)).astype(np.uint8)
    permutation = np.array([0, 3, 5, 1, 2, 4], dtype=np.uint8)
    return inputs, permutation[inputs]


def test_array_source_is_a_pure_function_of_step_and_covers_each_epoch_once():
    inputs, labels = synthetic_data(n=12)
    source = ArraySource(inputs, labels, vocab_size=6, seed=3)
    a, _ = source.batch(5, 4, {})
    b, _ = source.batch(5, 4, {})
    assert torch.equal(a, b)
    epoch = torch.cat([source.batch(s, 4, {})[0] for s in range(3)])  # 3 batches of 4 = one epoch of 12
    rows = {tuple(r.tolist()) for r in epoch}
    assert rows == {tuple(r.tolist()) for r in torch.as_tensor(inputs).long()}


# --------------------------------------------------------------------------- trainer


def make_trainer(tmp_path, epochs: int = 6, halt_max_steps: int = 3, noise: float = 0.01, **train) -> Trainer:
    inputs, labels = synthetic_data()
    model_config = tiny_config(halt_max_steps=halt_max_steps, noise_scale=noise, H_init_std=0.1, L_init_std=0.1)
    base = dict(global_batch_size=8, epochs=epochs, lr=3e-3, lr_warmup_steps=2, weight_decay=0.1, ema_rate=0.9,
                eval_interval=10_000, checkpoint_interval=3, log_interval=1)
    config = TrainConfig(**(base | train))
    source = ArraySource(inputs, labels, vocab_size=6, seed=config.seed)
    return Trainer(model_config, config, source, tmp_path, {"task": {"name": "synthetic"}})


def test_rolling_carry_keeps_rows_until_they_halt(tmp_path):
    trainer = make_trainer(tmp_path, halt_max_steps=3)
    trainer.train_step()
    first = trainer.carry
    assert first.steps.tolist() == [1] * 8 and not first.halted.any()  # q_halt starts at -5: nobody halts
    assert not first.state.z_H.requires_grad  # the carry is detached between outer steps
    trainer.train_step()
    assert torch.equal(trainer.carry.inputs, first.inputs)  # same puzzles continue
    trainer.train_step()
    assert trainer.carry.steps.tolist() == [3] * 8 and trainer.carry.halted.all()  # the N_sup cap
    trainer.train_step()
    assert trainer.carry.steps.tolist() == [1] * 8  # refilled from the step's batch
    assert not torch.equal(trainer.carry.inputs, first.inputs)


def test_training_lowers_the_loss(tmp_path):
    trainer = make_trainer(tmp_path, epochs=60, halt_max_steps=1)
    first = trainer.train_step()["lm_loss"]
    for _ in range(59):
        last = trainer.train_step()
    assert last["lm_loss"] < 0.5 * first
    assert last["cell"] > 0.8


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a", epochs=6)
    (tmp_path / "a").mkdir()
    straight.run()

    (tmp_path / "b").mkdir()
    interrupted = make_trainer(tmp_path / "b", epochs=3)
    interrupted.run()  # checkpoint at step 3, like a kill right after it
    resumed = make_trainer(tmp_path / "b", epochs=6)
    resumed.load(tmp_path / "b" / CHECKPOINT_NAME)
    assert resumed.step == 3
    resumed.run()

    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in straight.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[key]), key
    for key, value in straight.carry.to_dict().items():
        assert torch.equal(value, resumed.carry.to_dict()[key]), key
    lines_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in __import__("json").loads(line).items() if k != "wall_time_s"}  # noqa: E731
    assert [strip(x) for x in lines_a] == [strip(x) for x in lines_b]


def test_checkpoint_holds_ema_weights_and_plain_train_state(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3)
    trainer.run()
    raw = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert raw["train_state"]["step"] == 3
    assert set(raw["ema"]) == set(raw["model"])
    assert not all(torch.equal(raw["ema"][k], raw["model"][k]) for k in raw["model"])
    assert raw["metadata"]["train_config"]["epochs"] == 3


def test_curriculum_promotes_when_train_accuracy_reaches_the_threshold(tmp_path):
    stages = ({"options": {}, "halt_max_steps": 1}, {"options": {}, "halt_max_steps": 2})
    trainer = make_trainer(tmp_path, curriculum=stages, promote_accuracy=0.0, promote_window=2)
    assert trainer.stage_settings() == ({}, 1)
    trainer.train_step()
    assert trainer.stage == 0
    trainer.train_step()
    assert trainer.stage == 1 and trainer.stage_settings() == ({}, 2)
    never = make_trainer(tmp_path, curriculum=stages, promote_accuracy=1.01, promote_window=1)
    for _ in range(3):
        never.train_step()
    assert never.stage == 0


def test_steps_to_stable_counts_from_the_last_change():
    preds = torch.tensor([[[1]], [[2]], [[2]], [[2]]])  # [N=4, B=1, L=1]: changes at step 2, then stable
    preds = torch.cat([preds, torch.tensor([[[3]], [[3]], [[3]], [[3]]])], dim=1)  # row 2 stable from step 1
    assert steps_to_stable(preds.to(torch.uint8)).tolist() == [2, 1]


def test_model_from_trainer_is_an_eqr_model(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.train_step()
    assert isinstance(trainer.ema_model(), EqRModel)


def test_halting_follows_cap_q_head_and_exploration_minimum():
    steps = torch.tensor([1, 1, 2, 4])
    q_halt = torch.tensor([1.0, 1.0, -1.0, -1.0])
    min_steps = torch.tensor([0, 3, 0, 0])
    # row 0: q says halt; row 1: q says halt but exploration wants 3 steps; row 3: cap
    assert Trainer._halted(steps, q_halt, 4, min_steps).tolist() == [True, False, False, True]
    assert Trainer._halted(steps, q_halt, 1, min_steps).tolist() == [True, True, True, True]  # N_sup 1: cap only


@pytest.mark.parametrize("name", ["cpu-sudoku-4x4", "cpu-sudoku-6x6", "cpu-maze-9"])
def test_cpu_preset_fits_its_task_and_every_curriculum_stage_generates(name):
    from eqr.contract.config import preset
    from eqr.tasks import get_task

    model_config, train_config = preset(name)
    task = get_task(train_config.extra["task"]["name"], train_config.extra["task"]["size"])
    assert (model_config.seq_len, model_config.vocab_size) == (task.seq_len, task.vocab_size)
    for stage in train_config.curriculum:
        options = {k: tuple(v) for k, v in stage["options"].items()}
        puzzles = task.generate(2, seed=0, **options)
        assert puzzles.inputs.shape == (2, task.seq_len)
