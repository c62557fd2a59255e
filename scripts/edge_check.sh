#!/usr/bin/env bash
# The edge install, end to end (run by .ci/run after the suite): a fresh venv with
# `pip install '.[cpu]'` alone (no torch) solves a generated puzzle set with an export made by
# the dev venv, and its answers equal the dev venv's for the same seed.
source "$(dirname "$0")/bootstrap.sh"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

eqr export sudoku-small --out "$WORK/export" --precision int8 --engine never > "$WORK/export.log" 2>&1 \
    || { cat "$WORK/export.log" >&2; exit 1; }
eqr data generate --task sudoku --size 4 --blanks 4:16 --n 64 --split test --seed 7 --out "$WORK/data" >/dev/null
for precision in fp32 int8; do
    eqr solve "$WORK/export" -i "$WORK/data" --format hrm --precision "$precision" --breadth 2 --seed 3 --json \
        > "$WORK/dev.$precision.jsonl"
done

echo "eqr: edge venv (pip install '.[cpu]' only) in $WORK/edge" >&2
"$PYTHON" -m venv "$WORK/edge"
"$WORK/edge/bin/python" -m pip install -q --disable-pip-version-check "$ROOT[cpu]"
if "$WORK/edge/bin/python" -c "import torch" 2>/dev/null; then
    echo "edge check: torch is installed in the [cpu]-only venv" >&2
    exit 1
fi
for precision in fp32 int8; do
    (cd "$WORK" && "$WORK/edge/bin/eqr" solve "$WORK/export" -i "$WORK/data" --format hrm --precision "$precision" \
        --breadth 2 --seed 3 --json > "$WORK/edge.$precision.jsonl")
    if ! cmp -s "$WORK/dev.$precision.jsonl" "$WORK/edge.$precision.jsonl"; then
        echo "edge check: $precision answers of the [cpu]-only venv differ from the dev venv's:" >&2
        diff "$WORK/dev.$precision.jsonl" "$WORK/edge.$precision.jsonl" | head -5 >&2
        exit 1
    fi
done
numpy_of() { "$1" -c "import numpy; print(numpy.__version__)"; }
echo "edge check: fp32 and int8 answers of $(wc -l < "$WORK/edge.fp32.jsonl") puzzles equal" \
     "(dev numpy $(numpy_of "$VENV/bin/python"), edge numpy $(numpy_of "$WORK/edge/bin/python"), no torch)"
echo "edge: 2 passed, 0 failed"
