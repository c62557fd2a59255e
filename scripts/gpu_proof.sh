#!/usr/bin/env bash
# GPU proof that runs on a bare CUDA machine with no package index (and maybe no TensorRT).
# Budget: under 8 minutes on an H200: each step's timeout is PROOF_STEP_S (default 150 s) or what
# is left of the run's PROOF_BUDGET_S (default 450 s), whichever is less; a step left no time is SKIPped.
#
#   install    a venv with --system-site-packages over the image's torch, numpy, onnx, onnxruntime,
#              cuda-bindings; the pure-Python wheels in $WHEELS (click, pytest, polygraphy, ...)
#              with pip --no-index; eqr with `pip install --no-deps --no-build-isolation -e .`, else
#              (no setuptools>=77) a link tree on PYTHONPATH and `python -m eqr` as `eqr`
#   imports    which modules each step needs and which are missing (a step whose imports are
#              missing is SKIPped naming them, never crashes the run)
#   torch-cuda-tests  pytest tests/test_torch_backend.py tests/test_torch_cuda.py: the torch backend on
#              CUDA, the loop, compaction, slots, real CUDA-graph replay, the Scheduler, bf16/fp16
#   torch-paper       scripts/gpu_proof_torch.py: paper-sudoku (random weights) at batch 1/64/256,
#              fp32/bf16/fp16 (norms fp32), eager and CUDA graphs: sample-steps/s, agreement with fp32
#   cuda-python       scripts/gpu_proof_cuda.py: eqr's cuda-python memory, pool, stream and graph
#              helpers (the TensorRT backend's) without TensorRT
#   bench-paper / bench-6x6   `eqr bench --backend torch --device cuda`: the reference vs the runtime
#   tensorrt-*        the TensorRT steps (gpu-marked tests, gpu_check.sh): "skipped: no TensorRT on
#              this machine" when `import tensorrt` fails
# Every log is OUT/<step>.log; OUT/summary.txt has one PASS/FAIL/SKIP line per step and the
# counts. A pytest step is PASS only when a test passed and none failed: all skipped is SKIP.
# Exit 0 only when no step failed and at least one passed.
#
# usage: scripts/gpu_proof.sh [OUT]          (default ./gpu-proof; from anywhere)
#        scripts/gpu_proof.sh --pytest-status LOG   (print a pytest log's status: the summary's rule)
# env:   WHEELS=DIR   pre-downloaded pure-Python wheels, e.g. on a machine with an index:
#          pip download --no-deps --only-binary :all: --python-version 3.12 -d wheels \
#              click pytest pluggy iniconfig packaging polygraphy onnx-graphsurgeon
#        PROOF_PYTHON  the interpreter to build the venv from (default python3)
#        PROOF_STEP_S  per-step timeout in seconds (default 150); PROOF_BUDGET_S the whole run's (450)
set -uo pipefail

# --------------------------------------------------------------------------- pytest's summary line
pytest_status() {  # pytest_status LOG [RC] -> "PASS|FAIL|SKIP <counts>" from pytest's last summary line
    local log="$1" rc="${2:-}" line passed failed errors skipped deselected
    line="$(grep -E '([0-9]+ (passed|failed|skipped|errors?|deselected))|no tests ran' "$log" 2>/dev/null | tail -n 1)"
    count() { echo "$line" | grep -oE "[0-9]+ $1" | head -n 1 | grep -oE '^[0-9]+' || echo 0; }
    passed=$(count passed); failed=$(count failed); errors=$(count 'errors?'); skipped=$(count skipped)
    deselected=$(count deselected)
    local counts="$passed passed, $failed failed, $errors errors, $skipped skipped"
    if [ -z "$line" ]; then
        echo "FAIL no pytest summary in the log${rc:+ (exit $rc)}"
    elif [ "$failed" -gt 0 ] || [ "$errors" -gt 0 ]; then
        echo "FAIL $counts"
    elif [ "$passed" -gt 0 ]; then
        if [ -n "$rc" ] && [ "$rc" != 0 ]; then echo "FAIL $counts (exit $rc)"; else echo "PASS $counts"; fi
    elif [ "$skipped" -gt 0 ] || [ "$deselected" -gt 0 ]; then
        echo "SKIP every test skipped ($counts): $(grep -m1 -oE 'SKIPPED \[[0-9]+\] [^ ]+: .*' "$log" | cut -c1-160)"
    else
        echo "FAIL no test ran ($counts)"
    fi
}
if [ "${1:-}" = "--pytest-status" ]; then
    pytest_status "$2" "${3:-}"
    exit 0
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="$(mkdir -p "${1:-gpu-proof}" && cd "${1:-gpu-proof}" && pwd)"
SUMMARY="$OUT/summary.txt"
STEP_S="${PROOF_STEP_S:-150}"
BUDGET_S="${PROOF_BUDGET_S:-450}"  # the whole run: 7.5 minutes, inside the 8 the machine allows
START=$(date +%s)
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
status() {  # status PASS|FAIL|SKIP NAME DETAIL
    note "$1 $2${3:+: $3}"
}
missing() {  # missing MODULE... -> the ones python cannot find (empty: all there)
    python - "$@" <<'PY'
import importlib.util, sys
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package ("cuda" of cuda.bindings)
        return False
print(" ".join(m for m in sys.argv[1:] if not found(m)))
PY
}
limit() {  # seconds the next step may take: PROOF_STEP_S, less where the run's budget ends sooner
    local left=$(( START + BUDGET_S - $(date +%s) ))
    if [ "$left" -lt "$STEP_S" ]; then echo "$left"; else echo "$STEP_S"; fi
}
step() {  # step NAME "MODULES" COMMAND...: SKIP when imports are missing, else PASS/FAIL by exit status
    local name="$1" needs="$2" start rc lack; shift 2
    lack="$(missing $needs 2>/dev/null)"
    if [ -n "$lack" ]; then
        status SKIP "$name" "missing $lack (carry the wheels in WHEELS=DIR)"
        return 0
    fi
    local budget; budget=$(limit)
    if [ "$budget" -lt 10 ]; then status SKIP "$name" "out of the run's ${BUDGET_S} s budget"; return 0; fi
    start=$(date +%s)
    timeout "$budget" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local took="$(( $(date +%s) - start )) s"
    if [ $rc = 124 ]; then status FAIL "$name" "timed out after $budget s (log: $OUT/$name.log)"
    elif [ $rc = 0 ]; then status PASS "$name" "$took"
    else status FAIL "$name" "exit $rc in $took, last line: $(tail -n 1 "$OUT/$name.log" | cut -c1-200)"; fi
    return 0
}
pytest_step() {  # pytest_step NAME "MODULES" PYTEST-ARGS...: the status from pytest's summary (all skipped: SKIP)
    local name="$1" needs="$2" start rc lack; shift 2
    lack="$(missing pytest $needs 2>/dev/null)"
    if [ -n "$lack" ]; then status SKIP "$name" "missing $lack (carry the wheels in WHEELS=DIR)"; return 0; fi
    local budget; budget=$(limit)
    if [ "$budget" -lt 10 ]; then status SKIP "$name" "out of the run's ${BUDGET_S} s budget"; return 0; fi
    start=$(date +%s)
    timeout "$budget" python -m pytest -q -rs -p no:cacheprovider "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local line; line="$(pytest_status "$OUT/$name.log" "$rc")"
    [ $rc = 124 ] && line="FAIL timed out after $budget s; ${line#* }"
    status "${line%% *}" "$name" "${line#* } ($(( $(date +%s) - start )) s)"
}

# --------------------------------------------------------------------------- install
note "gpu proof $(date -u +%FT%TZ), tree $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), on" \
     "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
BASE_PY="${PROOF_PYTHON:-python3}"
VENV="$OUT/venv"
rm -rf "$VENV"
# --without-pip: no ensurepip needed; the image's pip (a system site package) installs into the venv
if "$BASE_PY" -m venv --system-site-packages --without-pip "$VENV" >"$OUT/install.log" 2>&1; then
    export PATH="$VENV/bin:$PATH"
else
    note "no venv ($(tail -n 1 "$OUT/install.log")); using $BASE_PY directly"
    mkdir -p "$OUT/bin" && ln -sf "$(command -v "$BASE_PY")" "$OUT/bin/python" && export PATH="$OUT/bin:$PATH"
fi
HAVE_PIP=0; python -m pip --version >>"$OUT/install.log" 2>&1 && HAVE_PIP=1
if [ -n "${WHEELS:-}" ]; then
    if [ $HAVE_PIP = 1 ]; then
        python -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl >>"$OUT/install.log" 2>&1 \
            && note "installed $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from $WHEELS" \
            || note "FAIL installing the wheels of $WHEELS (see $OUT/install.log)"
    else  # pure-Python wheels are importable once unpacked
        mkdir -p "$OUT/wheels-site"
        python -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
            "$OUT/wheels-site" "$WHEELS"/*.whl && export PYTHONPATH="$OUT/wheels-site${PYTHONPATH:+:$PYTHONPATH}"
        note "no pip: unpacked the wheels of $WHEELS onto PYTHONPATH"
    fi
fi
if [ $HAVE_PIP = 1 ] && python -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >>"$OUT/install.log" 2>&1; then
    note "eqr installed: pip install --no-deps --no-build-isolation -e ."
else  # no pip or no setuptools>=77 offline: eqr's package-dir layout as links on PYTHONPATH
    LINKS="$OUT/eqr-links"
    rm -rf "$LINKS" && mkdir -p "$LINKS/eqr"
    for entry in "$ROOT"/eqr/*; do ln -s "$entry" "$LINKS/eqr/$(basename "$entry")"; done
    for sub in export runtime calibration; do ln -s "$ROOT/$sub" "$LINKS/eqr/$sub"; done
    export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
    note "eqr on PYTHONPATH through links in $LINKS (pip -e failed: see $OUT/install.log)"
fi
if ! command -v eqr >/dev/null 2>&1; then
    mkdir -p "$OUT/bin" && printf '#!/bin/sh\nexec python -m eqr "$@"\n' >"$OUT/bin/eqr" && chmod +x "$OUT/bin/eqr"
    export PATH="$OUT/bin:$PATH"
fi
python - <<'PY' 2>&1 | tee -a "$SUMMARY"
import importlib, importlib.util, sys, warnings
warnings.simplefilter("ignore")  # click's deprecated __version__
print("python", sys.version.split()[0])
for name in ("numpy", "torch", "click", "onnx", "onnxruntime", "cupy", "cuda.bindings", "pytest", "polygraphy",
             "onnx_graphsurgeon", "tensorrt", "eqr"):
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        print(f"  {name}: missing")
        continue
    try:
        mod = importlib.import_module(name)
        extra = ""
        if name == "torch":
            extra = f" (CUDA {mod.version.cuda}, available {mod.cuda.is_available()}, {mod.cuda.device_count()} device(s))"
        print(f"  {name}: {getattr(mod, '__version__', '?')}{extra}")
    except Exception as e:  # noqa: BLE001
        print(f"  {name}: import fails: {type(e).__name__}: {e}")
PY

# --------------------------------------------------------------------------- what runs without TensorRT
EQR="eqr numpy click onnx torch"
pytest_step torch-cuda-tests "$EQR" tests/test_torch_backend.py tests/test_torch_cuda.py
step torch-paper "$EQR" python scripts/gpu_proof_torch.py --model paper-sudoku --batches 1,64,256
grep -E '^(PASS|FAIL)' "$OUT/torch-paper.log" 2>/dev/null | sed 's/^/    /' | tee -a "$SUMMARY"
step cuda-python "eqr numpy cuda.bindings" python scripts/gpu_proof_cuda.py
grep -E '^(PASS|FAIL)' "$OUT/cuda-python.log" 2>/dev/null | sed 's/^/    /' | tee -a "$SUMMARY"
step bench-paper "$EQR" eqr bench --paper --backend torch --device cuda --puzzles 128 --batch 64 --depth 16 \
    --json --out "$OUT/bench-paper.json" --force
step bench-6x6 "$EQR" eqr bench --model sudoku-6x6 --backend torch --device cuda --only reference_vs_runtime \
    --only adaptive_steps --only host_overhead --json --out "$OUT/bench-6x6.json" --force
for b in bench-paper bench-6x6; do
    [ -f "$OUT/$b.json" ] && python - "$OUT/$b.json" <<'PY' | sed "s/^/    $b: /" | tee -a "$SUMMARY"
import json, sys
run = json.load(open(sys.argv[1]))
for m in run["measurements"]:
    fields = " ".join(f"{k}={v}" for k, v in (m.get("fields") or {}).items()
                      if k.endswith(("per_s", "accuracy", "ms_per_sample_step")))
    print(f"{m.get('name')}={m.get('value')} {fields}")
PY
done

# --------------------------------------------------------------------------- TensorRT
if [ -n "$(missing tensorrt)" ]; then
    for name in tensorrt-gpu-tests tensorrt-gpu-check tensorrt-paper; do
        status SKIP "$name" "skipped: no TensorRT on this machine"
    done
else
    pytest_step tensorrt-gpu-tests "$EQR tensorrt" -m gpu tests/test_runtime_tensorrt.py tests/test_export_tensorrt.py
    step tensorrt-gpu-check "$EQR tensorrt polygraphy onnxruntime" scripts/gpu_check.sh sudoku-6x6 "$OUT/check-sudoku-6x6"
    grep -E '^(PASS|FAIL|SKIP)' "$OUT/check-sudoku-6x6/summary.txt" 2>/dev/null | sed 's/^/    /' >>"$SUMMARY"
    step tensorrt-paper "$EQR tensorrt polygraphy onnxruntime" sh -c "eqr export paper-sudoku --precision fp16 \
        --engine always --batch 1:64:256 --out '$OUT/paper-sudoku' --force --json \
        && eqr data generate --task sudoku --size 9 --n 256 --seed 7 --out '$OUT/paper-data' --split test --force \
        && eqr solve '$OUT/paper-sudoku' -i '$OUT/paper-data/test' --format hrm --backend tensorrt --precision fp16 \
           --batch 256 --json >'$OUT/solve-paper-tensorrt-fp16.jsonl'"
fi

# --------------------------------------------------------------------------- summary
passed=$(grep -cE '^PASS [a-z]' "$SUMMARY"); failed=$(grep -cE '^FAIL [a-z]' "$SUMMARY")
skipped=$(grep -cE '^SKIP [a-z]' "$SUMMARY")
note "---"
note "steps: $passed passed, $failed failed, $skipped skipped in $(( $(date +%s) - START )) s; logs in $OUT"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ]  # nothing passed (every step skipped) is no proof
