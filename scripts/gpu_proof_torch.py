"""gpu_proof.sh's torch section: the torch backend on CUDA for paper-sudoku (random weights) at
batch 1/64/256 in fp32, bf16 and fp16 (norms fp32), eager and CUDA-graph replay: sample-steps/s
and agreement with fp32 from the same states. Prints one line per run and a RESULT line each;
exits 1 when a run fails or half precision disagrees with fp32 beyond the bounds below.

usage: python scripts/gpu_proof_torch.py [--model paper-sudoku] [--batches 1,64,256] [--steps 8]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from eqr.contract.artifact import OUTPUT_NAMES
from eqr.model.load import load_model
from eqr.runtime.backends.torch_backend import TorchBackend

# One step from the same state: share of cells whose prediction equals fp32's. A random paper-size
# step is chaotic (42 block applications), so this is loose: measured on the CPU (torch 2.13
# autocast, batch 2) bf16 agreed on 85.2% of cells, z_H relative difference 0.16. The answer
# agreement of a trained model is tests/test_torch_cuda.py's (>= 0.93 of whole answers).
MIN_ONE_STEP_AGREEMENT = {"bf16": 0.70, "fp16": 0.80}


def run(model, dtype: str, batch: int, graphs: bool, steps: int, feeds0: dict) -> dict:
    backend = TorchBackend(model, device="cuda", dtype=dtype, batch_size=batch, cuda_graphs=graphs,
                           static_shapes=graphs)
    with backend:
        if graphs:
            backend.freeze(np.zeros(batch, bool))
        feeds = {k: v.clone() for k, v in feeds0.items()}
        first = {k: v.clone() for k, v in backend.step(feeds).items()}  # one step from the shared state
        for _ in range(2):  # warm-up (a graph is captured on its first step)
            backend.step(feeds)
        torch.cuda.synchronize()
        started = time.perf_counter()
        state = feeds
        for _ in range(steps):
            out = backend.step(state)
            state = {"tokens": feeds["tokens"], "z_H": out["z_H_out"], "z_L": out["z_L_out"]}
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        failure = backend.graph_failure
    return {"first": first, "seconds": seconds, "graph_failure": failure}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="paper-sudoku")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL torch sees no CUDA device", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__} CUDA {torch.version.cuda} on {torch.cuda.get_device_name(0)}")
    model = load_model(args.model)
    c = model.config
    failed = 0
    for batch in (int(b) for b in args.batches.split(",")):
        rng = np.random.default_rng(batch)
        feeds0 = {"tokens": torch.from_numpy(rng.integers(1, c.vocab_size, (batch, c.seq_len)).astype(np.int32)).cuda(),
                  "z_H": torch.from_numpy(rng.standard_normal((batch, c.seq_len, c.hidden_size), np.float32)).cuda(),
                  "z_L": torch.from_numpy(rng.standard_normal((batch, c.seq_len, c.hidden_size), np.float32)).cuda()}
        base = None
        for dtype in ("fp32", "bf16", "fp16"):
            for graphs in (False, True):
                name = f"{dtype}{'+graphs' if graphs else ''} b{batch}"
                try:
                    got = run(model, dtype, batch, graphs, args.steps, feeds0)
                except Exception as e:  # noqa: BLE001 - one line per failed run, the others go on
                    print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    failed += 1
                    continue
                first = got["first"]
                if base is None:
                    base = first
                agree = float((first["preds"] == base["preds"]).float().mean())
                state_err = float(((first["z_H_out"] - base["z_H_out"]).norm() / base["z_H_out"].norm()))
                rate = batch * args.steps / got["seconds"]
                if dtype == "fp32":  # graph replay runs eager's kernels: the same predictions
                    ok = agree == 1.0
                else:
                    ok = agree >= MIN_ONE_STEP_AGREEMENT[dtype]
                ok = ok and not (graphs and got["graph_failure"])
                failed += not ok
                print(f"{'PASS' if ok else 'FAIL'} {name}: {rate:.1f} sample-steps/s ({1e3 * got['seconds'] / args.steps:.2f} ms/step), "
                      f"one-step cell agreement with fp32 {agree:.4f}, z_H rel. diff {state_err:.2e}"
                      f"{', capture failed: ' + got['graph_failure'] if got['graph_failure'] else ''}")
                print(f"RESULT torch_{dtype}{'_graphs' if graphs else ''}_b{batch}_steps_per_s={rate:.4g} "
                      f"agreement={agree:.4f} state_rel_diff={state_err:.3g}")
        del base
    print(f"{'FAIL' if failed else 'PASS'} torch backend on CUDA ({failed} run(s) failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    assert OUTPUT_NAMES  # the contract's outputs are what `first` holds
    sys.exit(main())
