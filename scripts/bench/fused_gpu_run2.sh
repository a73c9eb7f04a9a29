#!/usr/bin/env bash
# fused-2's second request: time to PSNR on tennis, the fast preset (torch) against VARIANT in the
# same run, each variant's cosine schedule fitted to BUDGET seconds (default 75).
#   OUT=/tmp/o bash scripts/bench/fused_gpu_run2.sh 'fast+model.mlp_backend="triton"' [BUDGET] [DATA_DIR]
set -u
OUT=${OUT:?set OUT}
VARIANT=${1:?variant}
BUDGET=${2:-75}
DATA=${3:-data}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout $((2 * BUDGET + 70)) $PY scripts/bench/time_to_psnr.py --clip tennis --tennis "$DATA/tennis" --eval-every 500 \
  --targets 26.2 28 30 --fit-iterations --variants "fast:$BUDGET" "$VARIANT:$BUDGET" --json "$OUT/time_to_psnr.json" \
  > "$OUT/time_to_psnr.txt" 2>&1; echo "time_to_psnr rc=$?" | tee -a "$OUT/parts.txt"
exit 0
