#!/usr/bin/env python3
"""Edit re-render speed at a given frame size: the fused Triton pass against the PyTorch pass.

    python scripts/bench/edit_fps.py --size 1920x1080 --layers 2 --atlas 1000

Measured in one run on one device:
* ``torch``: the PyTorch composite (grid_sample per layer) with maps resident on the GPU;
* ``fused``: the Triton pass with maps resident on the GPU;
* ``fused+stream``: maps (uv float32, alpha and residual float16) and the frame streamed from
  pinned host memory each frame, the 8-bit result copied back: what a long shot costs when its
  baked maps do not fit on the card. Copies overlap the kernel on two CUDA streams.
Prints frames per second and the ratio against ``torch``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from backend.edit.fused import composite_delta, composite_delta_torch  # noqa: E402


def timed(fn, n: int) -> float:
    for _ in range(3):
        fn(0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(n):
        fn(k)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--atlas", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=8, help="distinct frames in rotation")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    W, H = (int(v) for v in args.size.split("x"))
    N, S, K = args.layers, args.atlas, args.frames
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    frames = torch.randint(0, 256, (K, H, W, 3), device=dev, dtype=torch.uint8, generator=g)
    uv = torch.rand(K, N, H, W, 2, device=dev, generator=g) * 2 - 1
    alpha = torch.rand(K, N, H, W, device=dev, generator=g).half()
    res = (torch.rand(K, N, H, W, 3, device=dev, generator=g) + 0.5).half()
    deltas = torch.randn(N, S, S, 3, device=dev, generator=g) * 0.1
    out = torch.empty(H, W, 3, dtype=torch.uint8, device=dev)

    results = {}
    results["torch"] = timed(lambda k: composite_delta_torch(frames[k % K], uv[k % K], alpha[k % K], res[k % K],
                                                             deltas), max(args.n // 4, 20))
    results["fused"] = timed(lambda k: composite_delta(frames[k % K], uv[k % K], alpha[k % K], res[k % K],
                                                       deltas, out=out), args.n)
    # streamed from pinned host memory, double-buffered
    h_frames, h_uv, h_alpha, h_res = (t.cpu().pin_memory() for t in (frames, uv, alpha, res))
    h_out = torch.empty(K, H, W, 3, dtype=torch.uint8).pin_memory()
    bufs = [[torch.empty_like(t[0]) for t in (frames, uv, alpha, res)] + [torch.empty_like(out)] for _ in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]

    def streamed(k):
        b, s = bufs[k % 2], streams[k % 2]
        with torch.cuda.stream(s):
            for dst, src in zip(b[:4], (h_frames, h_uv, h_alpha, h_res)):
                dst.copy_(src[k % K], non_blocking=True)
            composite_delta(b[0], b[1], b[2], b[3], deltas, out=b[4])
            h_out[k % K].copy_(b[4], non_blocking=True)

    results["fused+stream"] = timed(streamed, args.n)
    name = torch.cuda.get_device_name(dev)
    bytes_per_frame = H * W * (3 + 3 + N * (8 + 2 + 6))
    print(f"device: {name}; {W}x{H}, {N} edited layers, atlas {S}; host<->device bytes/frame "
          f"{bytes_per_frame / 1e6:.1f} MB")
    for k, v in results.items():
        print(f"{k:14} {v:9.1f} fps   x{v / results['torch']:.1f} vs torch")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "size": [W, H], "layers": N, "atlas": S,
                                         "fps": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
