#!/usr/bin/env python3
"""The optical-flow phase of a decomposition at production size (DIS at a lower resolution,
rescaled to the working size, cached as float16, consistency masks): the previous code path
against ``compute_flow`` in the same run, on this machine's CPU.

    python scripts/bench/flow_phase.py --size 1920x1080 --frames 17 --flow-long-edge 960 [--clip DIR] [--json OUT]

* baseline: the previous path: per chunk of pairs the flow method (DIS on its pool), then on the
  reading thread each flow rescaled and stored into the float16 cache one after another; after
  every pair, the consistency masks read back from the cache, 8 pairs at a time, on one thread;
* ``compute_flow``: each pair's rescaling, store and masks on a pool while DIS computes the next
  chunk (backend/preprocess/flow.py, ``_run_method``).

Both write their cache into a fresh folder; the flows and masks are checked equal. Without
``--clip`` a synthetic clip (``backend.synthetic``, PNG frames) is written and loaded first (uint8
frames, as a real clip's are). Each variant runs ``--repeat`` times; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from backend.clip import load_clip  # noqa: E402
from backend.clip.source import working_size  # noqa: E402
from backend.hostinfo import cpu_model  # noqa: E402
from backend.preprocess.flow import (compute_flow, consistency_mask, dis_flow, dis_workers,  # noqa: E402
                                     rescale_flow)


def previous(clip, flow_long_edge: int, folder: Path, px: float = 1.0):
    """The previous ``compute_flow`` code path for DIS into a cache folder (see the module doc)."""
    total, H, W = clip.n_frames - 1, clip.height, clip.width
    fw, fh = working_size(W, H, flow_long_edge)
    folder.mkdir(parents=True)
    shape = (total, H, W, 2)
    forward = np.lib.format.open_memmap(folder / "forward.npy", mode="w+", dtype=np.float16, shape=shape)
    backward = np.lib.format.open_memmap(folder / "backward.npy", mode="w+", dtype=np.float16, shape=shape)
    step = max(8, (dis_workers() + 1) // 2)
    for i in range(0, total, step):
        j = min(total, i + step)
        u8 = np.stack([cv2.resize(np.ascontiguousarray(f), (fw, fh), interpolation=cv2.INTER_AREA)
                       for f in clip.frames_uint8(i, j + 1)])
        first, second = u8[:-1], u8[1:]
        both = rescale_flow(dis_flow(np.concatenate([first, second]), np.concatenate([second, first])), W, H)
        forward[i:j] = both[: j - i]
        backward[i:j] = both[j - i:]
    forward.flush()
    backward.flush()
    ok = np.lib.format.open_memmap(folder / "ok.npy", mode="w+", dtype=bool, shape=(2,) + shape[:3])
    for a in range(0, total, 8):
        b = min(total, a + 8)
        f = np.asarray(forward[a:b], np.float32)
        k = np.asarray(backward[a:b], np.float32)
        ok[0, a:b] = consistency_mask(f, k, px)
        ok[1, a:b] = consistency_mask(k, f, px)
    ok.flush()
    return forward, backward, ok[0], ok[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", type=Path, help="a clip folder (default: a synthetic clip)")
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--flow-long-edge", type=int, default=960)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.clip is None:
            from backend.synthetic import make_synthetic_clip
            w, h = (int(v) for v in args.size.split("x"))
            src = make_synthetic_clip(w, h, args.frames, seed=0).write(tmp / "clip")
        else:
            src = args.clip
        w = int(args.size.split("x")[0])
        clip = load_clip(src, long_edge=w, max_frames=args.frames)
        times: dict[str, list[float]] = {"previous": [], "compute_flow": []}
        results = {}
        for r in range(args.repeat):
            for name in times:
                out = tmp / f"{name}_{r}"
                t0 = time.perf_counter()
                if name == "previous":
                    got = previous(clip, args.flow_long_edge, out)
                else:
                    fs = compute_flow(clip, cache_dir=out, long_edge=args.flow_long_edge)
                    got = (fs.forward, fs.backward, fs.forward_ok, fs.backward_ok)
                times[name].append(time.perf_counter() - t0)
                results[name] = [np.asarray(a) for a in got]
        for a, b in zip(results["previous"], results["compute_flow"]):
            np.testing.assert_array_equal(a, b)
    pairs = clip.n_frames - 1
    med = {k: statistics.median(v) for k, v in times.items()}
    device = f"{cpu_model()} ({os.cpu_count()} logical cores, {dis_workers()} usable)"
    print(f"device: {device}; clip {clip.width}x{clip.height}, {pairs} pairs, flow at long edge "
          f"{args.flow_long_edge}; median of {args.repeat}; results equal")
    for k, v in med.items():
        print(f"  {k:13} {v:7.2f} s  ({1000 * v / pairs:6.1f} ms/pair)")
    print(f"  ratio previous / compute_flow: {med['previous'] / med['compute_flow']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"bench": "flow_phase", "device": device, "pairs": pairs,
                                         "size": [clip.width, clip.height], "flow_long_edge": args.flow_long_edge,
                                         "seconds": times, "median_s": med,
                                         "ratio": med["previous"] / med["compute_flow"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
