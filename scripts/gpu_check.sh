#!/usr/bin/env bash
# GPU check of `eqr export`: build the fp32, fp16 and int8 TensorRT engines of a bundled model,
# then compare each engine with ONNX Runtime outputs of the same graph saved on the CPU
# (Polygraphy's --save-outputs / --load-outputs pattern). One PASS/FAIL line per precision;
# exit 0 only when all three pass.
#
# usage: scripts/gpu_check.sh [MODEL] [WORKDIR]
#   MODEL    bundled model name, checkpoint or preset (default: the first bundled model,
#            else paper-sudoku)
#   WORKDIR  scratch directory (default: a new temporary one)
# needs: a CUDA GPU, `pip install -e .[tensorrt]` (tensorrt + onnxruntime-gpu) or JetPack.
set -euo pipefail

MODEL="${1:-$(python -c 'from eqr.load import bundled_names; print((bundled_names() or ["paper-sudoku"])[0])')}"
WORK="${2:-$(mktemp -d -t eqr-gpu-check.XXXXXX)}"
BATCH=4
mkdir -p "$WORK"
echo "model $MODEL, work dir $WORK" >&2

# 1. Export every precision with engines (exit 1 here if TensorRT or the GPU is missing).
eqr export "$MODEL" --precision fp16 --precision int8 --engine always --batch "1:$BATCH:8" \
    --out "$WORK/export" --force >&2

# 2. One set of inputs for every runner: task puzzles and random initial states (seeded).
python - "$WORK" "$BATCH" <<'PY'
import sys
import torch
from polygraphy.json import save_json
from eqr.export import read_manifest
from eqr.export.inputs import TaskInfo, task_inputs
from eqr.model import EqRModel
from eqr.config import ModelConfig

work, batch = sys.argv[1], int(sys.argv[2])
manifest = read_manifest(f"{work}/export")
model = EqRModel(ModelConfig.from_dict(manifest["config"]))  # sizes and init stds only
task = TaskInfo(manifest["task"]["name"], manifest["task"]["size"], manifest["task"]["token_ids"])
g = torch.Generator().manual_seed(1234)
state = model.initial_state(batch, generator=g)
feeds = [{"tokens": task_inputs(task, model, batch, seed=1234).numpy(),
          "z_H": state.z_H.float().numpy(), "z_L": state.z_L.float().numpy()}]
save_json(feeds, f"{work}/inputs.json", description="eqr gpu_check inputs")
PY

# 3. Per precision: ONNX Runtime on CPU saves outputs, the engine runs on the same inputs.
status=0
for precision in fp32 fp16 int8; do
    onnx_file="$(python -c "from eqr.export import read_manifest; print(read_manifest('$WORK/export')['precisions']['$precision']['onnx'])")"
    engine_file="$(python -c "from eqr.export import read_manifest; print(read_manifest('$WORK/export')['engines']['$precision']['engine'])")"
    python -c "from eqr.export import check_engine; check_engine('$WORK/export/$engine_file')"  # sidecar: this TRT, this GPU
    polygraphy run "$WORK/export/$onnx_file" --onnxrt --providers cpu --load-inputs "$WORK/inputs.json" \
        --save-outputs "$WORK/ort.$precision.json" >"$WORK/ort.$precision.log" 2>&1
    polygraphy run "$WORK/export/$engine_file" --model-type engine --trt --load-inputs "$WORK/inputs.json" \
        --save-outputs "$WORK/trt.$precision.json" >"$WORK/trt.$precision.log" 2>&1
    # Compare: states within atol + rtol * |ref| (per precision), argmax answers mostly equal.
    if python - "$WORK" "$precision" <<'PY'
import sys
import numpy as np
from polygraphy.comparator import RunResults

work, precision = sys.argv[1], sys.argv[2]
atol, rtol, min_agree = {"fp32": (1e-3, 1e-3, 0.99), "fp16": (5e-2, 5e-2, 0.95), "int8": (1e-1, 1e-1, 0.90)}[precision]
ort = RunResults.load(f"{work}/ort.{precision}.json")[0][1][0]
trt = RunResults.load(f"{work}/trt.{precision}.json")[0][1][0]
worst, ok = {}, True
for name in ("z_H_out", "z_L_out", "residual", "logit_delta", "q_halt"):
    ref, got = np.asarray(ort[name], np.float64), np.asarray(trt[name], np.float64)
    err = np.abs(got - ref)
    worst[name] = float(err.max())
    ok &= bool(np.isfinite(got).all() and (err <= atol + rtol * np.abs(ref)).all())
agree = float(np.mean(np.asarray(ort["preds"]) == np.asarray(trt["preds"])))
ok &= agree >= min_agree
detail = ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
print(f"{'PASS' if ok else 'FAIL'} {precision}: max abs error {detail}; preds agree {agree:.1%} "
      f"(atol {atol:g}, rtol {rtol:g}, preds >= {min_agree:.0%})")
sys.exit(0 if ok else 1)
PY
    then :; else status=1; fi
done
exit $status
