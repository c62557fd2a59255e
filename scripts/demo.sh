#!/usr/bin/env bash
# The main job on the bundled default model (creates or reuses .venv): export its step to
# ONNX (FP32 + FP16, TensorRT engine when available), generate a held-out puzzle set, and
# solve it with convergence gating and breadth on ONNX Runtime. Output goes to out/demo/.
source "$(dirname "$0")/bootstrap.sh"
MODEL="sudoku-small"
OUT="out/demo"
mkdir -p "$OUT"
eqr info "$MODEL"
eqr export "$MODEL" --precision fp16 --out "$OUT/$MODEL-eqr" --force
eqr data generate --task sudoku --size 4 --blanks 4:16 --n 200 --split test --seed 12345 --out "$OUT/data" --force
eqr solve "$OUT/$MODEL-eqr" --input "$OUT/data" --format hrm --precision fp16 --breadth 4 --aggregate converged \
    --json > "$OUT/answers.jsonl"
echo "answers: $OUT/answers.jsonl"
