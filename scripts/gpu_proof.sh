#!/usr/bin/env bash
# One-shot GPU proof of the TensorRT path (run once on a CUDA machine; GPU time is short).
#   1. a fresh venv: eqr with the `tensorrt` extra, onnxruntime-gpu swapped in for onnxruntime
#      (never both: they install the same module),
#   2. the gpu-marked tests,
#   3. scripts/gpu_check.sh on every bundled model (export fp32/fp16/int8 with engines, eqr solve
#      per engine vs ONNX Runtime),
#   4. paper-sudoku exported with engines; the precision report with the tensorrt backend;
#      `eqr bench --paper` on that export (ONNX Runtime CUDA); TensorRT FP16 and ONNX Runtime
#      CUDA FP32 puzzles/s through `eqr solve` on the same puzzles,
# writing every log and a summary under OUT (default ./gpu-proof). Steps never stop the run.
#
# usage: scripts/gpu_proof.sh [OUT]     (from the repository root)
# env:   PROOF_PYTHON=/path/to/python of an environment that already has eqr[tensorrt],
#        onnxruntime-gpu and the dev tools (a machine that cannot reach a package index)
set -uo pipefail

OUT="$(mkdir -p "${1:-gpu-proof}" && cd "${1:-gpu-proof}" && pwd)"
VENV="$OUT/venv"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, one PASS/FAIL line with seconds
    local name="$1" start rc; shift
    start=$(date +%s)
    "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    note "$([ $rc = 0 ] && echo PASS || echo FAIL) $name ($(( $(date +%s) - start )) s, exit $rc)"
}

note "gpu proof $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
if [ -n "${PROOF_PYTHON:-}" ]; then  # a machine without a package index: an environment prepared there
    export PATH="$(dirname "$PROOF_PYTHON"):$PATH"
    note "using the prepared environment of $PROOF_PYTHON"
else
    step venv sh -c "python3 -m venv '$VENV' && '$VENV/bin/pip' install -q -e '.[tensorrt,dev]' \
        && '$VENV/bin/pip' uninstall -y -q onnxruntime && '$VENV/bin/pip' install -q onnxruntime-gpu"
    export PATH="$VENV/bin:$PATH"
fi
python -c "import tensorrt, onnxruntime; print('tensorrt', tensorrt.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())" 2>&1 | tee -a "$SUMMARY"

step gpu-tests python -m pytest -q -n 0 -m gpu -rs tests
tail -n 3 "$OUT/gpu-tests.log" >>"$SUMMARY"

for model in $(python -c 'from eqr.contract.bundled import bundled_names; print(" ".join(bundled_names()))'); do
    step "gpu-check-$model" scripts/gpu_check.sh "$model" "$OUT/check-$model"
    grep -E '^(PASS|FAIL|SKIP)' "$OUT/check-$model/summary.txt" | sed "s/^/  $model: /" >>"$SUMMARY"
done

PAPER="$OUT/paper-sudoku"
step export-paper eqr export paper-sudoku --precision fp16 --precision int8 --engine always --batch 1:64:256 \
    --out "$PAPER" --force --json
python - "$PAPER" <<'PY' 2>&1 | tee -a "$SUMMARY"
import json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
for p, e in m.get("engines", {}).items():
    print(f"  engine {p}: {e['engine']}, built in {e.get('build_seconds', '?')} s")
PY
step report-paper eqr report "$PAPER" --backend tensorrt,onnxruntime --generate 256 --force --json
step bench-paper eqr bench --paper --export-dir "$PAPER" --json
eqr data generate --task sudoku --size 9 --n 512 --seed 7 --out "$OUT/paper-data" --split test --force >/dev/null 2>&1
for run in "tensorrt fp16" "tensorrt int8" "tensorrt fp32" "onnxruntime fp32" "onnxruntime fp16"; do
    set -- $run
    step "solve-paper-$1-$2" sh -c "eqr solve '$PAPER' -i '$OUT/paper-data/test' --format hrm --backend $1 \
        --precision $2 --batch 256 --json >'$OUT/solve-paper-$1-$2.jsonl'"
    tail -n 1 "$OUT/solve-paper-$1-$2.log" | sed "s/^/  $1 $2: /" >>"$SUMMARY"  # "... N s on <backend>"
done
note "done: logs in $OUT"
