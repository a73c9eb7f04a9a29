#!/usr/bin/env bash
# fused-2's correctness request: per-tensor errors of torch / triton (TF32 and fp32) against float64
# at a step's sizes, then the fused MLP GPU tests that the first request's 80 s did not reach
# (large batches, TF32, the training step through the fused kernels, CUDA-graph capture).
#   OUT=/tmp/o bash scripts/bench/fused_gpu_run3.sh
set -u
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
t0=$SECONDS
timeout 40 $PY scripts/bench/mlp_accuracy.py --json "$OUT/mlp_accuracy.json" > "$OUT/mlp_accuracy.txt" 2>&1
echo "mlp_accuracy rc=$? $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
t0=$SECONDS
TO=""; $PY -c "import pytest_timeout" 2>/dev/null && TO="--timeout 45"
timeout 130 $PY -m pytest -v -p no:cacheprovider $TO tests/engine/test_fused_mlp.py tests/engine/test_fused_mlp_train.py \
  -k "cuda or tf32 or triton-False or triton-True" > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$? $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
exit 0
