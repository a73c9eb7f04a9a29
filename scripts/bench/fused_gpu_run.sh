#!/usr/bin/env bash
# One GPU request for issue 15 (fused-2): the fused MLP kernels' GPU tests, the per-network timings
# with a sweep of launch shapes that fit sm_90, then the fast step on tennis for torch / compile /
# triton in one run, triton with the sweep's fastest shape. Every result under $OUT; each part
# has its own time limit (about 230 s in all) so a slow part cannot cost the others.
#   OUT=/tmp/o bash scripts/bench/fused_gpu_run.sh [DATA_DIR]
set -u
OUT=${OUT:?set OUT}
DATA=${1:-data}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
( nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c "import torch, triton; print(torch.__version__, triton.__version__)" ) > "$OUT/device.txt" 2>&1
t0=$SECONDS
timeout 80 $PY -m pytest -v -p no:cacheprovider tests/engine/test_fused_mlp.py tests/engine/test_fused_mlp_train.py \
  > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$? $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
t0=$SECONDS
timeout 60 $PY scripts/bench/mlp_kernels.py --backends torch triton --sweep --json "$OUT/mlp_kernels.json" \
  > "$OUT/mlp_kernels.txt" 2>&1; echo "mlp_kernels rc=$? $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
best=$($PY -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get('best_options', {})))" "$OUT/mlp_kernels.json" 2>/dev/null)
[ -n "$best" ] && [ "$best" != "{}" ] && export NEURAL_ATLAS_FUSED_OPTIONS="$best"
echo "fused options: ${NEURAL_ATLAS_FUSED_OPTIONS:-defaults}" | tee -a "$OUT/parts.txt"
t0=$SECONDS
timeout 95 $PY scripts/bench/step_profile.py --clip tennis --tennis "$DATA/tennis" --json "$OUT/step_profile.json" \
  --variants fast 'fast+model.mlp_backend="triton"' 'fast+model.mlp_backend="compile"+train.compile_losses=true' \
  'fast+model.mlp_backend="triton"+train.compile_losses=true' \
  > "$OUT/step_profile.txt" 2>&1; echo "step_profile rc=$? $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
exit 0
