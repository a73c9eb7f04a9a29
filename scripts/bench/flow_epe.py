"""DIS optical flow against the tennis clip's RAFT reference: end-point error and speed.

Usage: .venv/bin/python scripts/bench/flow_epe.py [--data ../shared/data/tennis] [--presets fine,medium]

For each DIS preset it prints the mean end-point error (EPE, px) of the
forward flow against ``reference_flow_forward_raft.npz`` over all pixels and
over the pixels DIS itself marks forward-backward consistent (< 1 px), the
share of consistent pixels, and the median time per frame pair (forward +
backward flow) on this CPU. It also reports how much storing flows as float16 (the
flow cache format) changes them. RAFT is a reference here, not ground truth.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backend.clip import load_clip  # noqa: E402
from backend.preprocess.flow import DIS_PRESETS, consistency_mask, dis_flow, to_uint8  # noqa: E402
from backend.hostinfo import cpu_model as cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "../shared/data/tennis")
    ap.add_argument("--presets", default=",".join(DIS_PRESETS),
                    help="comma-separated DIS presets (default: all)")
    args = ap.parse_args()
    ref_path = args.data / "reference_flow_forward_raft.npz"
    if not ref_path.is_file():
        sys.exit(f"reference flow not found: {ref_path}")

    clip = load_clip(args.data, masks=[])
    with np.load(ref_path) as data:
        ref = data["flow"].astype(np.float32)
    if ref.shape != (clip.n_frames - 1, clip.height, clip.width, 2):
        sys.exit(f"reference shape {ref.shape} does not match the clip {clip.frames.shape}")
    u8 = to_uint8(clip.frames)
    pairs = clip.n_frames - 1
    print(f"cpu: {cpu_name()} ({cv2.getNumThreads()} OpenCV threads), opencv {cv2.__version__}, "
          f"python {platform.python_version()}")
    print(f"clip: {args.data.resolve()} {clip.n_frames} frames {clip.width}x{clip.height}, "
          f"{pairs} pairs")
    print(f"{'preset':12s} {'EPE all':>8s} {'EPE cons':>9s} {'cons %':>7s} {'ms/pair':>8s} "
          f"{'f16 max':>8s}")
    for preset in args.presets.split(","):
        fwd = np.empty((pairs, clip.height, clip.width, 2), np.float32)
        bwd = np.empty_like(fwd)
        seconds = []
        for i in range(pairs):
            t0 = time.perf_counter()
            fwd[i] = dis_flow(u8[i:i + 1], u8[i + 1:i + 2], preset=preset)[0]
            bwd[i] = dis_flow(u8[i + 1:i + 2], u8[i:i + 1], preset=preset)[0]
            seconds.append(time.perf_counter() - t0)
        ms = 1000.0 * float(np.median(seconds))  # the median resists other jobs on a shared CPU
        ok = consistency_mask(fwd, bwd, 1.0)
        epe = np.linalg.norm(fwd - ref, axis=-1)
        f16 = np.abs(fwd.astype(np.float16).astype(np.float32) - fwd).max()
        print(f"{preset:12s} {epe.mean():8.3f} {epe[ok].mean():9.3f} {100 * ok.mean():7.1f} "
              f"{ms:8.1f} {f16:8.4f}", flush=True)
    print("EPE in px against RAFT; 'cons' = pixels DIS marks forward-backward consistent (< 1 px);")
    print("ms/pair = median time of forward + backward flow for one pair;")
    print("f16 max = largest change from storing flows as float16 (the cache format).")


if __name__ == "__main__":
    main()
