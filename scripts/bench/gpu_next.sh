#!/usr/bin/env bash
# What the 2026-12-03 (3) session left for a device session (docs/benchmarks.md, "Run fused-5",
# "Hash-table sizes at 1080p", "The flow phase at 1080p"), one mode per device call:
#   OUT=/tmp/o bash scripts/bench/gpu_next.sh check     (~3 min)
#     the fused-MLP GPU tests with the kink-row and output-magnitude judgements (never run on a
#     GPU), the flow phase against the previous path on the host's cores
#   OUT=/tmp/o CLIP=path/to/car-turn bash scripts/bench/gpu_next.sh carturn   (~10 min)
#     car-turn at 1920x1080 through `decompose --preset quality --budget 9m15s` with the shot-sized
#     grids (2^21, space-time scale 1.314): against 32.22 dB with the 2^19 grids (2026-12-02)
#   OUT=/tmp/o bash scripts/bench/gpu_next.sh e2e       (~10 min)
#     100 frames of synthetic 1080p, `decompose --preset fast`, torch, fused (TF32) and fused with
#     3xTF32 MLPs: the flow phase's new pool in the end-to-end time, the fused PSNR gap of fused-4
#     repeated or not, and 3xTF32's cost
set -u
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
case "${1:-}" in
check)
  t0=$SECONDS
  timeout 170 $PY -m pytest -v -p no:cacheprovider --tb=short tests/engine/test_fused_mlp.py \
    tests/engine/test_fused_mlp_train.py > "$OUT/pytest.txt" 2>&1
  echo "pytest rc=$? $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
  grep -E "^(FAILED|E  )" "$OUT/pytest.txt" | head -20
  t0=$SECONDS
  timeout 120 $PY scripts/bench/flow_phase.py --frames 41 --json "$OUT/flow_phase.json" > "$OUT/flow_phase.txt" 2>&1
  echo "flow_phase rc=$? $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
  tail -4 "$OUT/flow_phase.txt"
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
  for v in torch triton triton3; do
    E=""; [ $v = triton3 ] && E='{"tf32_mode": "tf32x3"}'
    t0=$SECONDS
    NEURAL_ATLAS_FUSED_OPTIONS="$E" timeout -s INT 200 $PY -m backend decompose "$CLIP" --out "/tmp/d_$v" \
      --preset fast --long-edge 1920 --flow-long-edge 960 --device cuda --set model.mlp_backend=${v%3} \
      > "$OUT/$v.log" 2>&1
    echo "$v rc=$? wall $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
    cp "/tmp/d_$v/report.json" "$OUT/report_$v.json" 2>/dev/null
    rm -rf "/tmp/d_$v"
  done
  ;;
*) echo "usage: OUT=DIR $0 check|carturn|e2e" >&2; exit 2 ;;
esac
exit 0
