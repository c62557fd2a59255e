"""Configuration dataclasses and the official presets (docs/training.md#recipes).

`ModelConfig` holds everything that defines the step f(z, x); `TrainConfig` holds the
training recipe. Both are frozen, saved as plain JSON-able dicts with `asdict`, and rebuilt
with `from_dict`, which refuses unknown keys so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from eqr.contract.errors import EqRError

POS_ENCODINGS = ("none", "rope", "rope2d")
DTYPES = ("float32", "bfloat16", "float16")


_T = TypeVar("_T", bound="JsonConfig")


class JsonConfig:
    """Saved as JSON with `to_dict`; `from_dict` refuses unknown keys (a typo never falls back
    to a default). Every eqr config dataclass (model, train, solve, export, calib, report) has it."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_T], data: dict[str, Any]) -> _T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise EqRError(f"unknown {cls.__name__} keys: {', '.join(unknown)} (valid: {', '.join(sorted(names))})")
        return cls(**data)


@dataclass(frozen=True)
class ModelConfig(JsonConfig):
    """The EqR architecture. Defaults are the official `config/arch/eqr.yaml` values."""

    seq_len: int = 81  # S: tokens per puzzle (from the data set, not the arch yaml)
    vocab_size: int = 11  # V: token ids 0..V-1 (from the data set)
    hidden_size: int = 512  # D
    num_heads: int = 8  # attention heads; head dim = D / num_heads
    expansion: float = 4.0  # SwiGLU expansion before the 2/3 rule and rounding to 256
    L_layers: int = 2  # blocks in the single shared stack
    H_layers: int = 0  # ignored by EqR (kept for config parity with the official yaml)
    H_cycles: int = 3  # latent recursions per outer step
    L_cycles: int = 6  # z_L updates per latent recursion
    mlp_t: bool = False  # token mixer: MLP over tokens (True) or attention (False)
    pos_encodings: str = "rope"  # none | rope | rope2d (inert when mlp_t)
    board_height: int | None = None  # rope2d board; sqrt(S) when unset
    board_width: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    forward_dtype: str = "float32"  # activations; official runs use bfloat16 on GPU
    lambda_: float = 0.95  # damping: z <- (1 - lambda) z + lambda F(z + u)
    noise_scale: float = 0.01  # sigma of the path noise in training (inference passes its own)
    H_init_std: float = 1.0  # std of the truncated-normal initial z_H
    L_init_std: float = 1.0  # std of the truncated-normal initial z_L
    halt_max_steps: int = 16  # outer steps per puzzle in training (depth D at evaluation)
    halt_exploration_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.pos_encodings not in POS_ENCODINGS:
            raise EqRError(f"pos_encodings must be one of {', '.join(POS_ENCODINGS)}, got {self.pos_encodings!r}")
        if self.forward_dtype not in DTYPES:
            raise EqRError(f"forward_dtype must be one of {', '.join(DTYPES)}, got {self.forward_dtype!r}")
        if not self.mlp_t and self.hidden_size % self.num_heads:
            raise EqRError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if min(self.seq_len, self.vocab_size, self.hidden_size, self.L_layers, self.H_cycles, self.L_cycles) < 1:
            raise EqRError("seq_len, vocab_size, hidden_size, L_layers, H_cycles and L_cycles must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def updates_per_step(self) -> int:
        """Damped updates in one outer step (U; each adds its own path noise): H_cycles x (L_cycles + 1)."""
        return self.H_cycles * (self.L_cycles + 1)

    @property
    def blocks_per_step(self) -> int:
        """Block applications in one outer step: H_cycles x (L_cycles + 1) x L_layers."""
        return self.updates_per_step * self.L_layers


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """The training recipe. Defaults are the official `cfg_pretrain.yaml` / `eqr_sudoku.yaml`."""

    global_batch_size: int = 768
    epochs: int = 50_000  # = optimizer steps (one batch per epoch, docs/training.md#optimizer-and-schedule)
    lr: float = 1e-4
    lr_warmup_steps: int = 2000
    lr_min_ratio: float = 1.0  # 1.0: constant after warmup
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 1.0  # applied to every parameter, as official
    ema: bool = True
    ema_rate: float = 0.999
    eval_interval: int = 5000
    checkpoint_interval: int = 5000
    seed: int = 0
    q_loss_weight: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)  # recipe knobs of small CPU presets
    # --- CPU recipe (docs/training.md#recipes); the defaults are the official behaviour.
    # Curriculum stages, easiest first: {"options": task.generate options (e.g. {"blanks": [1, 4]}),
    # "halt_max_steps": N_sup in this stage (optional; ModelConfig.halt_max_steps otherwise)}.
    curriculum: tuple[dict[str, Any], ...] = ()
    promote_accuracy: float = 0.9  # go to the next stage once train exact accuracy over a window reaches this
    promote_window: int = 50  # optimizer steps per promotion check
    eval_depths: tuple[int, ...] = (1, 2, 4, 8, 16)  # outer steps at which periodic evaluation scores exact accuracy
    eval_size: int = 256  # held-out puzzles per periodic evaluation
    log_interval: int = 10  # optimizer steps per JSONL metrics line

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the dataclass hashable-ish and comparable.
        object.__setattr__(self, "curriculum", tuple(dict(s) for s in self.curriculum))
        object.__setattr__(self, "eval_depths", tuple(int(d) for d in self.eval_depths))
        if self.global_batch_size < 1 or self.epochs < 0:
            raise EqRError(f"global_batch_size must be >= 1 and epochs >= 0, "
                           f"got {self.global_batch_size}, {self.epochs}")


# Official presets (docs/training.md#recipes). seq_len / vocab come from the data sets: Sudoku-Extreme 81 / 11,
# Maze-Unique 30x30 900 / 6.
PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    "paper-sudoku": (
        ModelConfig(seq_len=81, vocab_size=11, hidden_size=512, L_layers=2, H_cycles=3, L_cycles=6, mlp_t=True),
        TrainConfig(epochs=50_000),
    ),
    "paper-maze": (
        ModelConfig(seq_len=900, vocab_size=6, hidden_size=128, L_layers=1, H_cycles=3, L_cycles=4, mlp_t=False),
        TrainConfig(epochs=100_000),
    ),
    # Small CPU recipes (docs/training.md#recipes): small init std, short N_sup ramped up by a
    # curriculum that starts at trivial puzzles, lr x10 with weight decay /10 (same lr * wd).
    # seq_len / vocab are the task's; the task is named in TrainConfig.extra["task"].
    "tiny": (
        ModelConfig(seq_len=16, vocab_size=6, hidden_size=16, num_heads=2, expansion=2.0, L_layers=1, H_cycles=2,
                    L_cycles=2, mlp_t=True, H_init_std=0.1, L_init_std=0.1, halt_max_steps=2),
        TrainConfig(global_batch_size=8, epochs=4, lr=1e-3, lr_warmup_steps=2, weight_decay=0.1, ema_rate=0.9,
                    eval_interval=2, checkpoint_interval=2, eval_size=8, eval_depths=(1, 2), log_interval=1,
                    extra={"task": {"name": "sudoku", "size": 4}}),
    ),
    "cpu-sudoku-4x4": (
        ModelConfig(seq_len=16, vocab_size=6, hidden_size=64, L_layers=2, H_cycles=2, L_cycles=2, mlp_t=True,
                    H_init_std=0.1, L_init_std=0.1, halt_max_steps=4),
        TrainConfig(global_batch_size=64, epochs=20_000, lr=1e-3, lr_warmup_steps=100, weight_decay=0.1,
                    ema_rate=0.998, eval_interval=500, checkpoint_interval=200, eval_size=256,
                    eval_depths=(1, 2, 4, 8, 16, 32), promote_accuracy=0.9, promote_window=50,
                    curriculum=({"options": {"blanks": [1, 3]}, "halt_max_steps": 1},
                                {"options": {"blanks": [1, 6]}, "halt_max_steps": 1},
                                {"options": {"blanks": [2, 9]}, "halt_max_steps": 2},
                                {"options": {"blanks": [4, 11]}, "halt_max_steps": 4},
                                {"options": {"blanks": [4, 16]}, "halt_max_steps": 8}),
                    extra={"task": {"name": "sudoku", "size": 4}}),
    ),
    # 6x6 Sudoku: the 4x4 recipe (token MLP, d 64, init std 0.1 so learning starts, lr 1e-3) with
    # the maze lessons that make answers hold past the supervised depth: exploration 0.5 and
    # N_sup >= 2 from the first stage keep solved puzzles supervised, so their answer must stay put.
    # A light step (L_layers 1, 8 blocks, ~0.2 s per batch of 64 on one core) leaves hard puzzles
    # to several outer steps (adaptive compute): N_sup grows with the blanks up to 16. The last
    # stage, blanks 10-28 (minimal 6x6 puzzles have 24-28), holds the three tiers about equally and
    # is the held-out range. Evaluating to depth 64 (4x N_sup) shows any drift past N_sup; 128
    # puzzles every 1000 steps keep that under a tenth of the time; a checkpoint is ~1 min of work.
    "cpu-sudoku-6x6": (
        ModelConfig(seq_len=36, vocab_size=8, hidden_size=64, L_layers=1, H_cycles=2, L_cycles=3, mlp_t=True,
                    H_init_std=0.1, L_init_std=0.1, halt_max_steps=16, halt_exploration_prob=0.5),
        TrainConfig(global_batch_size=64, epochs=60_000, lr=1e-3, lr_warmup_steps=100, weight_decay=0.1,
                    ema_rate=0.998, eval_interval=1000, checkpoint_interval=200, eval_size=128,
                    eval_depths=(1, 2, 4, 8, 16, 32, 64), promote_accuracy=0.9, promote_window=50,
                    curriculum=({"options": {"blanks": [1, 4]}, "halt_max_steps": 2},
                                {"options": {"blanks": [1, 10]}, "halt_max_steps": 2},
                                {"options": {"blanks": [4, 16]}, "halt_max_steps": 4},
                                {"options": {"blanks": [6, 22]}, "halt_max_steps": 8},
                                {"options": {"blanks": [10, 28]}, "halt_max_steps": 16}),
                    extra={"task": {"name": "sudoku", "size": 6}}),
    ),
    # Attention with 2D RoPE (rope_theta 10: on a 9-wide board theta 1e4 leaves one useful frequency,
    # so attending to a neighbouring square is hard to learn). One outer step learns paths of 2-3
    # moves, so N_sup grows with the path lengths: longer paths are solved over several outer steps.
    # Exploration 0.5 (official 0.1) and N_sup >= 2 from the start keep puzzles supervised after
    # they are solved, so answers stay put past the supervised depth (with 0.1 they drifted away).
    # lr 5e-4: of 3e-3 / 1e-3 / 5e-4 / 3e-4 (same seed, 20-40 min each), 5e-4 learned fastest.
    "cpu-maze-9": (
        ModelConfig(seq_len=81, vocab_size=6, hidden_size=64, num_heads=4, L_layers=1, H_cycles=2, L_cycles=3,
                    mlp_t=False, pos_encodings="rope2d", rope_theta=10.0, H_init_std=0.1, L_init_std=0.1,
                    halt_max_steps=16, halt_exploration_prob=0.5),
        TrainConfig(global_batch_size=32, epochs=60_000, lr=5e-4, lr_warmup_steps=100, weight_decay=0.1,
                    ema_rate=0.995, eval_interval=1000, checkpoint_interval=100, eval_size=128,
                    eval_depths=(1, 2, 4, 8, 16, 32), promote_accuracy=0.8, promote_window=50,
                    curriculum=({"options": {"path_len": [2, 3]}, "halt_max_steps": 2},
                                {"options": {"path_len": [2, 6]}, "halt_max_steps": 4},
                                {"options": {"path_len": [2, 10]}, "halt_max_steps": 8},
                                {"options": {"path_len": [2, 13]}, "halt_max_steps": 16}),
                    extra={"task": {"name": "maze", "size": 9}}),
    ),
}

# Continue cpu-maze-9 (--init-from its checkpoint) so its answers hold past the supervised depth:
# only the final stage (paths of 2-13 moves), supervised to N_sup 32 (exploration keeps solved
# mazes in the batch up to step 32, so drifting away from a correct answer costs loss there), a
# fresh warmup for the new optimizer and a cosine decay of lr to a tenth; evaluated to depth 64.
_maze_model, _maze_train = PRESETS["cpu-maze-9"]
PRESETS["cpu-maze-9-hold"] = (
    dataclasses.replace(_maze_model, halt_max_steps=32),
    dataclasses.replace(_maze_train, epochs=30_000, lr_min_ratio=0.1, eval_depths=(1, 2, 4, 8, 16, 32, 64),
                        curriculum=({"options": {"path_len": [2, 13]}, "halt_max_steps": 32},)),
)


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    try:
        return PRESETS[name]
    except KeyError:
        raise EqRError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
