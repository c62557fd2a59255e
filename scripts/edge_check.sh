#!/usr/bin/env bash
# The edge install, end to end (run by .ci/run after the suite): a fresh venv with
# `pip install '.[cpu]'` alone (no torch) solves a generated puzzle set with an export made by
# the dev venv, and its answers equal the dev venv's for the same seed. Then the same venv gets
# the calibrate extra ('.[cpu,calibrate]', still no torch) and calibrates a copy of the export
# on the target: its INT8 graph and fitted stopping rule equal the dev venv's calibration, its
# INT8 answers equal the dev venv's, and `eqr report` runs without the torch column.
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
# small: 8 puzzles x 2 starts recorded, rules fitted on 64 puzzles over 16 steps
CALIBRATE=(--precision int8 --force --generate 8 --starts 2 --depths 0,1,2,4,8,16 --rule-puzzles 64 --rule-steps 16 -q)
cp -r "$WORK/export" "$WORK/dev-calibrated"
eqr calibrate "$WORK/dev-calibrated" "${CALIBRATE[@]}"
eqr solve "$WORK/dev-calibrated" -i "$WORK/data" --format hrm --precision int8 --seed 3 --json > "$WORK/dev.calibrated.jsonl"

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

echo "eqr: calibration on the target: pip install '.[cpu,calibrate]' in $WORK/edge" >&2
"$WORK/edge/bin/python" -m pip install -q --disable-pip-version-check "$ROOT[cpu,calibrate]"
if "$WORK/edge/bin/python" -c "import torch" 2>/dev/null; then
    echo "edge check: the calibrate extra installed torch" >&2
    exit 1
fi
cp -r "$WORK/export" "$WORK/target"
(cd "$WORK" && "$WORK/edge/bin/eqr" calibrate "$WORK/target" "${CALIBRATE[@]}") \
    || { echo "edge check: eqr calibrate failed in the torch-free venv" >&2; exit 1; }
if ! cmp -s "$WORK/dev-calibrated/model.step.int8.onnx" "$WORK/target/model.step.int8.onnx"; then
    echo "edge check: the INT8 graph calibrated without torch differs from the dev venv's" >&2
    exit 1
fi
"$WORK/edge/bin/python" - "$WORK/dev-calibrated" "$WORK/target" <<'PY' || exit 1
import json, sys
dev, target = (json.load(open(f"{d}/manifest.json"))["precisions"] for d in sys.argv[1:])
for precision in ("fp32", "int8"):
    if "stopping" not in target[precision]:
        sys.exit(f"edge check: no {precision} stopping rule fitted in the torch-free venv")
    if target[precision]["stopping"] != dev[precision]["stopping"]:
        sys.exit(f"edge check: the {precision} stopping rule fitted without torch differs from the dev venv's")
print(f"edge check: int8 stopping rule {target['int8']['stopping']['rule']}, fitted without torch as in the dev venv")
PY
(cd "$WORK" && "$WORK/edge/bin/eqr" solve "$WORK/target" -i "$WORK/data" --format hrm --precision int8 --seed 3 --json \
    > "$WORK/edge.calibrated.jsonl")
if ! cmp -s "$WORK/dev.calibrated.jsonl" "$WORK/edge.calibrated.jsonl"; then
    echo "edge check: int8 answers of the export calibrated without torch differ from the dev venv's:" >&2
    diff "$WORK/dev.calibrated.jsonl" "$WORK/edge.calibrated.jsonl" | head -5 >&2
    exit 1
fi
(cd "$WORK" && "$WORK/edge/bin/eqr" report "$WORK/target" --precision fp32,int8 --generate 16 --depths 4,16 \
    --breadth 1 --max-steps 16 --out "$WORK/report" > "$WORK/report.txt") \
    || { cat "$WORK/report.txt" >&2; echo "edge check: eqr report failed in the torch-free venv" >&2; exit 1; }
grep -q "^not run: torch: " "$WORK/report.txt" \
    || { cat "$WORK/report.txt" >&2; echo "edge check: eqr report did not note its torch column" >&2; exit 1; }
echo "edge check: eqr calibrate (int8 graph and stopping rules as the dev venv's), solve int8" \
     "($(wc -l < "$WORK/edge.calibrated.jsonl") puzzles) and report ran without torch"
echo "edge: 3 passed, 0 failed"
