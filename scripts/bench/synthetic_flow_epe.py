#!/usr/bin/env python3
"""DIS optical flow against the synthetic clip's true motion: how right is the flow the flow loss
pulls the mapping towards?

Usage: .venv/bin/python scripts/bench/synthetic_flow_epe.py [--size 1920x1080] [--frames 12]
           [--objects 1] [--flow-long-edge N] [--json OUT.json]

The synthetic clip (backend/synthetic, the demo's) knows every pixel's motion
(``synthetic_flow``: the motion of the layer seen there). For the engine's DIS flow at the
clip's size (as the demo computes it) this prints the end-point error (mean, median, 95th
percentile) over all pixels and over the pixels DIS marks forward-backward consistent, the
signed mean error per axis (a bias would accumulate along a chain of frames; noise does not),
and the same restricted to pixels more than 4 px from a layer boundary (occlusion edges are
where any flow is wrong). Accuracy only: no timing claims.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backend.preprocess.flow import compute_flow  # noqa: E402
from backend.synthetic import make_synthetic_clip  # noqa: E402
from backend.synthetic.stickiness import synthetic_flow  # noqa: E402


def _stats(err: np.ndarray, d: np.ndarray) -> dict:
    return {"pixels": int(err.size), "epe_mean": round(float(err.mean()), 4),
            "epe_median": round(float(np.median(err)), 4), "epe_p95": round(float(np.percentile(err, 95)), 4),
            "bias_x": round(float(d[:, 0].mean()), 4), "bias_y": round(float(d[:, 1].mean()), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--objects", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flow-long-edge", type=int, help="compute DIS at most at this long edge")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    scene = make_synthetic_clip(width=w, height=h, n_frames=args.frames, seed=args.seed, n_objects=args.objects)
    flow = compute_flow(scene.clip, "dis", long_edge=args.flow_long_edge)
    true = synthetic_flow(scene)
    import cv2
    rows = {"all": [], "consistent": [], "interior": []}
    per_frame = []
    for t in range(args.frames - 1):
        d = (np.asarray(flow.forward[t], np.float32) - true[t]).reshape(-1, 2)
        err = np.linalg.norm(d, axis=1)
        ok = np.asarray(flow.forward_ok[t]).ravel()
        # layer boundaries: where the owning layer changes within 4 px
        owner = np.full((h, w), args.objects, np.uint8)
        for k in range(args.objects - 1, -1, -1):
            owner[scene.clip.masks[t, ..., k] >= 0.5] = k
        edge = (cv2.dilate(owner, np.ones((9, 9), np.uint8)) != cv2.erode(owner, np.ones((9, 9), np.uint8))).ravel()
        rows["all"].append((err, d))
        rows["consistent"].append((err[ok], d[ok]))
        rows["interior"].append((err[~edge], d[~edge]))
        per_frame.append({"pair": t, "epe_mean": round(float(err.mean()), 4),
                          "bias_x": round(float(d[:, 0].mean()), 4), "bias_y": round(float(d[:, 1].mean()), 4),
                          "true_motion_mean_px": round(float(np.linalg.norm(true[t], axis=-1).mean()), 3)})
    out = {"clip": {"width": w, "height": h, "frames": args.frames, "objects": args.objects, "seed": args.seed},
           "flow": {"method": flow.method, "tag": getattr(flow, "tag", None), "long_edge": args.flow_long_edge},
           "per_pair": per_frame}
    print(f"synthetic clip {w}x{h}, {args.frames} frames, {args.objects} object(s); DIS ({flow.method}) "
          f"against the true motion (mean {np.mean([p['true_motion_mean_px'] for p in per_frame]):.2f} px a frame)")
    print(f"{'pixels':<11}{'count':>11}{'EPE mean':>10}{'median':>9}{'p95':>8}{'bias x':>9}{'bias y':>9}")
    for name, parts in rows.items():
        s = _stats(np.concatenate([e for e, _ in parts]), np.concatenate([d for _, d in parts]))
        out[name] = s
        print(f"{name:<11}{s['pixels']:>11}{s['epe_mean']:>10.3f}{s['epe_median']:>9.3f}{s['epe_p95']:>8.3f}"
              f"{s['bias_x']:>9.3f}{s['bias_y']:>9.3f}")
    print("EPE and bias in px of the clip; interior: > 4 px from a layer boundary")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
