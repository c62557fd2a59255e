#!/usr/bin/env bash
# GPU check of the TensorRT path, end to end through the CLI a user runs first:
#   1. `eqr export` of MODEL to fp32/fp16/int8 ONNX with TensorRT engines (and their sidecars),
#   2. per precision: the engine's sidecar check, `eqr solve --backend tensorrt` (static batch,
#      CUDA-graph replay) on generated puzzles of the export's task, and the same puzzles through
#      `eqr solve --backend onnxruntime` (same graph, same seed): answers must mostly agree and
#      the step counts stay close.
# Every step prints PASS or FAIL and the script carries on (a step whose input failed is
# SKIPped); a summary is written to WORKDIR/summary.txt. Exit 0 only when no step failed.
#
# usage: scripts/gpu_check.sh [MODEL] [WORKDIR]
#        scripts/gpu_check.sh --agreement WORKDIR PRECISION   (only the agreement of trt.P.jsonl and
#        ort.P.jsonl in WORKDIR; exit 0 only on PASS, non-zero when it fails or raises)
#   MODEL    bundled model name, checkpoint or preset (default: the first bundled model,
#            else paper-sudoku)
#   WORKDIR  scratch directory (default: a new temporary one)
# env:     PUZZLES (default 64), BATCH (TensorRT profile MIN:OPT:MAX, default 1:32:64)
# needs:   a CUDA GPU, `pip install -e '.[tensorrt]'` (TensorRT + cuda-python) or JetPack.
set -uo pipefail

agreement() {  # agreement WORK PRECISION -> "PASS|FAIL detail": trt.P.jsonl vs ort.P.jsonl in WORK.
    # FAIL (never an empty status) when the comparison itself raises: its exit status is checked.
    local out rc
    out="$(python - "$1" "$2" 2>&1 <<'PY'
import json, sys

work, precision = sys.argv[1], sys.argv[2]
rows = {b: [json.loads(l) for l in open(f"{work}/{b}.{precision}.jsonl")] for b in ("trt", "ort")}
trt, ort = rows["trt"], rows["ort"]
same = sum(a["answer"] == b["answer"] for a, b in zip(trt, ort)) / max(len(ort), 1)
steps = (sum(a["steps"] for a in trt), sum(b["steps"] for b in ort))
correct = [sum(bool(r.get("correct")) for r in rows[b]) / max(len(rows[b]), 1) for b in ("trt", "ort")]
min_same = {"fp32": 0.97, "fp16": 0.9, "int8": 0.85}[precision]
ok = len(trt) == len(ort) > 0 and same >= min_same and abs(steps[0] - steps[1]) <= 0.15 * max(steps[1], 1)
print(f"{'PASS' if ok else 'FAIL'} answers equal {same:.1%} (>= {min_same:.0%}), steps {steps[0]} vs {steps[1]}, "
      f"correct {correct[0]:.1%} vs {correct[1]:.1%}, rows {len(trt)} vs {len(ort)}")
PY
)"
    rc=$?
    case "$out" in
        PASS*|FAIL*) [ $rc = 0 ] && { echo "$out" | tail -n 1; return 0; } ;;
    esac
    echo "FAIL the agreement check raised (exit $rc): $(echo "$out" | tail -n 1)"
}

if [ "${1:-}" = "--agreement" ]; then  # only the agreement part: gpu_check.sh --agreement WORK PRECISION
    line="$(agreement "$2" "$3")"
    echo "$line"
    [ "${line%% *}" = PASS ]
    exit
fi

MODEL="${1:-$(python -c 'from eqr.contract.bundled import bundled_names; print((bundled_names() or ["paper-sudoku"])[0])')}"
WORK="${2:-$(mktemp -d -t eqr-gpu-check.XXXXXX)}"
PUZZLES="${PUZZLES:-64}"
BATCH="${BATCH:-1:32:64}"
mkdir -p "$WORK"
SUMMARY="$WORK/summary.txt"
: >"$SUMMARY"
failed=0
echo "model $MODEL, work dir $WORK" | tee -a "$SUMMARY" >&2

report() {  # report STATUS STEP DETAIL...
    local status="$1" step="$2"; shift 2
    echo "$status $step${*:+: $*}" | tee -a "$SUMMARY"
    [ "$status" = FAIL ] && failed=$((failed + 1))
    return 0
}

run_step() {  # run_step STEP LOG COMMAND...: PASS/FAIL by the command's exit status
    local step="$1" log="$2" rc; shift 2
    "$@" >"$log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then report PASS "$step"; return 0; fi
    report FAIL "$step" "exit $rc, last line: $(tail -n 1 "$log")  (log: $log)"
    return 1
}

# 1. Export every precision with engines.
export_ok=0
run_step "export $MODEL fp32,fp16,int8 with engines" "$WORK/export.log" \
    eqr export "$MODEL" --precision fp16 --precision int8 --engine always --batch "$BATCH" \
    --out "$WORK/export" --force --json && export_ok=1

# 2. Puzzles of the export's task (held out: their own seed).
data_ok=0
if [ $export_ok = 1 ]; then
    task_args="$(python -c "
from eqr.contract.artifact import read_manifest
task = read_manifest('$WORK/export')['task']
print(f\"--task {task['name']} --size {task['size']}\")")"
    # shellcheck disable=SC2086
    run_step "generate $PUZZLES puzzles ($task_args)" "$WORK/data.log" \
        eqr data generate $task_args --n "$PUZZLES" --seed 12345 --out "$WORK/data" --split test --force \
        && data_ok=1
else
    report SKIP "generate puzzles" "no export"
fi

# 3. Per precision: sidecar, TensorRT solve, agreement with ONNX Runtime.
for precision in fp32 fp16 int8; do
    if [ $export_ok = 0 ] || [ $data_ok = 0 ]; then
        report SKIP "$precision" "no export or no puzzles"
        continue
    fi
    engine="$(python -c "
from eqr.contract.artifact import read_manifest
print(read_manifest('$WORK/export').get('engines', {}).get('$precision', {}).get('engine', ''))")"
    if [ -z "$engine" ]; then
        report FAIL "$precision engine" "the manifest lists no $precision engine"
        continue
    fi
    run_step "$precision sidecar check ($engine)" "$WORK/check.$precision.log" \
        python -c "from eqr.export import check_engine; check_engine('$WORK/export/$engine')"
    trt_ok=0; ort_ok=0
    run_step "$precision eqr solve --backend tensorrt" "$WORK/solve.trt.$precision.log" \
        sh -c "eqr solve '$WORK/export' -i '$WORK/data/test' --format hrm --backend tensorrt \
               --precision $precision --batch 32 --json >'$WORK/trt.$precision.jsonl'" && trt_ok=1
    run_step "$precision eqr solve --backend onnxruntime" "$WORK/solve.ort.$precision.log" \
        sh -c "eqr solve '$WORK/export' -i '$WORK/data/test' --format hrm --backend onnxruntime \
               --precision $precision --batch 32 --json >'$WORK/ort.$precision.jsonl'" && ort_ok=1
    if [ $trt_ok = 0 ] || [ $ort_ok = 0 ]; then
        report SKIP "$precision agreement" "a solve failed"
        continue
    fi
    line="$(agreement "$WORK" "$precision")"
    report "${line%% *}" "$precision tensorrt vs onnxruntime" "${line#* }"
done

echo "---" | tee -a "$SUMMARY"
passed=$(grep -c '^PASS' "$SUMMARY"); skipped=$(grep -c '^SKIP' "$SUMMARY")
echo "$passed passed, $failed failed, $skipped skipped; summary in $SUMMARY" | tee -a "$SUMMARY"
[ $failed = 0 ]
