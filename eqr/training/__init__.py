"""EqR training (docs/training.md): rolling-batch deep supervision, stablemax + q-halt losses,
AdamATan2, EMA, curriculum, atomic resumable checkpoints, torchrun (gloo) data parallelism.

    losses.py    stablemax cross-entropy (fp64), q-halt BCE
    optim.py     AdamATan2 (pure torch), warmup/cosine schedule
    ema.py       EMA shadow (saved and restored on resume)
    data.py      batches as pure functions of (seed, step): data sets or generated curricula
    loop.py      Trainer: carry, one optimizer step, evaluation, checkpoints, resume, ranks
    evaluate.py  exact accuracy by depth, steps-to-stable-answer by tier

The command is eqr/commands/train.py; bundling a run as a shipped model is eqr/bundling/.
"""
