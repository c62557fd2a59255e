#!/usr/bin/env bash
# The main job on the bundled default model (creates or reuses .venv): export its step to
# ONNX (FP32 + FP16, TensorRT engine when available), generate a held-out puzzle set, and
# solve it with convergence gating and breadth on ONNX Runtime. Output goes to out/demo/.
# sudoku-6x6 rather than the faster sudoku-small: its hard puzzles take more outer steps, so
# the gating has work to do (the whole script: 12 s on an idle 2-core CPU, sudoku-small 10 s).
source "$(dirname "$0")/bootstrap.sh"
MODEL="sudoku-6x6"
OUT="out/demo"
mkdir -p "$OUT"
eqr info "$MODEL"
eqr export "$MODEL" --precision fp16 --out "$OUT/$MODEL-eqr" --force
eqr data generate --task sudoku --size 6 --blanks 10:28 --n 200 --split test --seed 12345 --out "$OUT/data" --force
eqr solve "$OUT/$MODEL-eqr" --input "$OUT/data" --format hrm --precision fp16 --breadth 4 --aggregate converged \
    --json > "$OUT/answers.jsonl"
echo "answers: $OUT/answers.jsonl"
