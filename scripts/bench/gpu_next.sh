#!/usr/bin/env bash
# What the 2026-12-03 (4) session left for a device session (docs/benchmarks.md, "Run fused-6"),
# one mode per device call:
#   OUT=/tmp/o bash scripts/bench/gpu_next.sh check     (~2 min)
#     the fused-MLP GPU tests with the revised TF32 judgements (truncating "tf32" within 3x torch's
#     TF32 error, "tf32rn" within 1.25x, 3xTF32 at fp32's level or 10x better than TF32: not run on
#     a GPU in that form), the graph pretraining and the graph step
#   OUT=/tmp/o CLIP=path/to/car-turn bash scripts/bench/gpu_next.sh carturn   (~10 min)
#     car-turn at 1920x1080 through `decompose --preset quality --budget 9m15s` with the shot-sized
#     grids (2^21, space-time scale 1.314), `auto = triton` and the faster flow and pretraining:
#     against 32.22 dB (2026-12-02: 2^19 grids, torch MLPs)
#   OUT=/tmp/o bash scripts/bench/gpu_next.sh e2e       (~6 min)
#     100 frames of synthetic 1080p, `decompose --preset fast`, torch and fused (`auto`) MLPs in one
#     call: the same-run PSNR and end-to-end pair that fused-6 measured in two calls
set -u
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
case "${1:-}" in
check)
  t0=$SECONDS
  timeout 170 $PY -m pytest -v -p no:cacheprovider --tb=long tests/engine/test_fused_mlp.py \
    tests/engine/test_gpu_train.py > "$OUT/pytest.txt" 2>&1
  echo "pytest rc=$? $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
  grep -E "^(FAILED|E  )" "$OUT/pytest.txt" | head -40
  ;;
carturn)
  CLIP=${CLIP:?set CLIP to the car-turn folder}
  t0=$SECONDS
  timeout -s INT 590 $PY -m backend decompose "$CLIP" --out /tmp/d_ct --preset quality --budget 9m15s \
    --long-edge 1920 --flow-long-edge 960 --device cuda > "$OUT/carturn.log" 2>&1
  echo "carturn rc=$? wall $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
  cp /tmp/d_ct/report.json "$OUT/report_carturn.json" 2>/dev/null
  grep -E "\[grids\]|\[schedule\]" "$OUT/carturn.log" | head -4
  ;;
e2e)
  CLIP=${CLIP:-/tmp/syn1080}
  [ -d "$CLIP/video_frames" ] || $PY -c "from backend.synthetic import make_synthetic_clip as m; m(1920, 1080, 100, seed=0).write('$CLIP')"
  for v in torch auto; do
    t0=$SECONDS
    timeout -s INT 200 $PY -m backend decompose "$CLIP" --out "/tmp/d_$v" --preset fast --long-edge 1920 \
      --flow-long-edge 960 --device cuda --set model.mlp_backend=$v > "$OUT/$v.log" 2>&1
    echo "$v rc=$? wall $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
    cp "/tmp/d_$v/report.json" "$OUT/report_$v.json" 2>/dev/null
    rm -rf "/tmp/d_$v"
  done
  ;;
*) echo "usage: OUT=DIR $0 check|carturn|e2e" >&2; exit 2 ;;
esac
exit 0
