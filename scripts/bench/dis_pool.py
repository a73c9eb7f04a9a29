"""DIS flow over a chunk of frame pairs: one pair at a time with OpenCV's own threading (the
previous way, the baseline) against a pool of single-threaded DIS workers, one pair each.

Usage: python scripts/bench/dis_pool.py [--size 960x540] [--pairs 16] [--workers N] [--repeats 3] [--json OUT]

Both directions of every pair, as compute_flow asks for them (2 x pairs flows per call), on
textured frames panning 3 px a frame. Prints the CPU, the cores this process may use, the
median time per flow of each way and their ratio, and checks that both give the same flows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backend.preprocess.flow import dis_flow, dis_workers  # noqa: E402
from flow_epe import cpu_name  # noqa: E402  (sibling bench scripts)
from flow_speed import frames  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="960x540")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="pool size (default: the usable cores)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    workers = args.workers or dis_workers()
    seq = frames(args.pairs + 1, w, h)
    src = np.concatenate([seq[:-1], seq[1:]])
    dst = np.concatenate([seq[1:], seq[:-1]])
    n = src.shape[0]
    print(f"cpu: {cpu_name()}; usable cores {dis_workers()}; OpenCV {cv2.__version__} "
          f"({cv2.getNumThreads()} threads); {n} flows of {w}x{h}", flush=True)
    dis_flow(src[:2], dst[:2], workers=1)  # warm-up
    ways = {"serial, OpenCV threads": 1, f"pool of {workers}": workers}
    ms, flows = {}, {}
    for name, k in ways.items():
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            flows[name] = dis_flow(src, dst, workers=k)
            times.append(time.perf_counter() - t0)
        ms[name] = 1000 * float(np.median(times)) / n
        print(f"{name:24s} {ms[name]:8.1f} ms/flow", flush=True)
    base, pooled = ms.values()
    same = bool(np.array_equal(*flows.values()))
    print(f"pool vs serial: {base / pooled:.2f}x; identical flows: {same}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "cores": dis_workers(), "size": args.size,
                                         "flows": n, "ms_per_flow": ms, "ratio": round(base / pooled, 3),
                                         "identical": same}, indent=1))


if __name__ == "__main__":
    main()
