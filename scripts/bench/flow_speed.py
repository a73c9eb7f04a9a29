"""Speed of DIS and RAFT per frame pair (forward + backward flow), on the CPU and the GPU.

Usage: python scripts/bench/flow_speed.py [--sizes 448x256,768x432,1920x1080] [--methods dis,raft_small,raft_large]
       [--pairs 6] [--device cpu|cuda] [--iters 12] [--json OUT]

RAFT runs with random weights (weights=None: nothing to download; speed does not depend
on the weights' values) through the same RaftFlow wrapper compute_flow uses (padding to
the multiple of 8, batched pairs, cropping). Times are medians of per-call times divided
by the pairs in the call, after one warm-up call; on CUDA each call is synchronised.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backend.preprocess.flow import dis_flow  # noqa: E402


def frames(n: int, w: int, h: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(0)
    big = cv2.resize(rng.random((h // 8 + 4, w // 8 + 4, 3), dtype=np.float32), (w + 8 * n, h),
                     interpolation=cv2.INTER_CUBIC)
    return np.stack([(np.clip(big[:, 3 * t:3 * t + w], 0, 1) * 255).astype(np.uint8) for t in range(n)])


def time_method(name: str, fn, seq: np.ndarray, pairs: int, per_call: int, sync) -> float:
    src, dst = seq[:-1][:pairs], seq[1:][:pairs]
    per_pair = []
    for rep in range(1 + max(1, pairs // per_call)):
        a = (rep * per_call) % pairs
        s, d = src[a:a + per_call], dst[a:a + per_call]
        if len(s) < per_call:
            s, d = src[:per_call], dst[:per_call]
        sync()
        t0 = time.perf_counter()
        fn(np.concatenate([s, d]), np.concatenate([d, s]))  # both directions, as compute_flow does
        sync()
        if rep > 0:  # the first call warms up (cuDNN, allocator, OpenCV)
            per_pair.append((time.perf_counter() - t0) / len(s))
    return 1000 * float(np.median(per_pair))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="448x256,768x432")
    ap.add_argument("--methods", default="dis,raft_small,raft_large")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--device", default=None)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--amp", action="store_true", help="RAFT under bfloat16 autocast (CUDA)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    print(f"device: {device} {gpu or ''}; cpu threads torch {torch.get_num_threads()}; torch {torch.__version__}; "
          f"python {platform.python_version()}", flush=True)
    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        seq = frames(args.pairs + 1, w, h)
        for method in args.methods.split(","):
            if method == "dis":
                ms = time_method(method, dis_flow, seq, args.pairs, 1, lambda: None)
                batch = 1
            else:
                from backend.preprocess.raft import RaftFlow
                raft = RaftFlow(method, weights=None, device=device, iters=args.iters, amp=args.amp)
                batch = max(1, min(args.pairs, raft.pairs_per_batch(h, w) // 2))
                try:
                    ms = time_method(method, raft, seq, args.pairs, batch, sync)
                except torch.OutOfMemoryError:
                    ms = float("nan")
                del raft
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            row = {"method": method, "size": size, "device": "cpu (OpenCV)" if method == "dis" else device,
                   "ms_per_pair": round(ms, 1), "pairs_per_call": batch,
                   "iters": None if method == "dis" else args.iters, "gpu": gpu}
            rows.append(row)
            print(f"{method:11s} {size:10s} {row['device']:13s} {ms:9.1f} ms/pair (fw+bw)  "
                  f"{batch} pairs/call", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
