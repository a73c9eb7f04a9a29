#!/usr/bin/env python3
"""Loading a clip folder (frames + one object's masks) at production size: the previous loader
against ``load_clip`` in the same run, on this machine's CPU.

    python scripts/bench/clip_load.py --size 1920x1080 --frames 30 [--clip DIR] [--json OUT.json]

* baseline: the previous loader's code path: the same frame stack and sizer with each frame
  decoded in the reading thread, each mask decoded, converted to float RGB in [0, 1] (gray
  replicated to 3 channels) and binarised with a reduce over the channel axis, then resized;
* ``load_clip``: frames and masks decoded on a few threads in order (``_ordered_map``) and masks
  binarised in their own pixel type (backend/clip/source.py).

Both produce the same clip (checked: frames and masks equal). Without ``--clip`` a synthetic clip
(``backend.synthetic``, 8-bit PNG frames and gray masks) is written to a temporary folder first.
Each variant runs ``--repeat`` times; the median is reported (the files are in the page cache
after the first read, for both).
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

from backend.clip import Clip, load_clip  # noqa: E402
from backend.clip.source import _FrameStack, _seed_mask_dirs, _Sizer, list_images  # noqa: E402
from backend.clip.writers import read_image  # noqa: E402
from backend.hostinfo import cpu_model  # noqa: E402


def baseline(folder: Path, long_edge: int) -> tuple[np.ndarray, np.ndarray]:
    """The previous loader (a52301c): the same frame stack and sizer, one frame after another in
    this thread; each mask read as float RGB(A) and binarised with a reduce over the channels."""
    files = list_images(folder / "video_frames")
    stack, sizer = _FrameStack(len(files), {}), _Sizer(long_edge)
    for p in files:
        stack.append(sizer(read_image(p, native=True), str(p)))
    frames = stack.result()
    size = sizer.work
    mask_dirs = sorted(_seed_mask_dirs(folder / "masks"), key=lambda p: p.name)
    masks = np.empty((len(files), size[1], size[0], len(mask_dirs)), np.float32)
    for k, d in enumerate(mask_dirs):
        for i, p in enumerate(list_images(d)):
            f = read_image(p)  # float RGB(A) in [0, 1]
            on = f[:, :, 3] > 0.5 if f.shape[2] == 4 and f[:, :, 3].min() < 1.0 else f[:, :, :3].max(axis=2) > 0.5
            masks[i, :, :, k] = cv2.resize(on.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    return frames, masks


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--clip", type=Path, help="a seed-layout folder (video_frames/, masks/<object>/)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.clip
        if folder is None:
            from backend.synthetic import make_synthetic_clip
            folder = make_synthetic_clip(w, h, args.frames, seed=0).write(Path(tmp) / "clip")
        long_edge = max(w, h)
        base_s, (bf, bm) = timed(lambda: baseline(folder, long_edge), args.repeat)
        new_s, clip = timed(lambda: load_clip(folder, long_edge=long_edge, max_frames=None), args.repeat)
        ref = Clip(frames=bf, frame_names=[str(i) for i in range(len(bf))], source="baseline")
        assert np.array_equal(np.asarray(clip.frames, np.float32), np.asarray(ref.frames, np.float32)), "frames differ"
        assert np.array_equal(np.asarray(clip.masks, np.float32), bm), "masks differ"
    n = bf.shape[0]
    row = {"device": f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)", "size": f"{bf.shape[2]}x{bf.shape[1]}",
           "frames": n, "objects": bm.shape[3], "baseline_s": round(base_s, 3), "load_clip_s": round(new_s, 3),
           "speedup": round(base_s / new_s, 2)}
    print(f"{row['device']}; {row['size']} x {n} frames, {row['objects']} mask(s)")
    print(f"baseline (previous loader)  {base_s:7.2f} s  {1000 * base_s / n:6.1f} ms/frame")
    print(f"load_clip                   {new_s:7.2f} s  {1000 * new_s / n:6.1f} ms/frame   x{base_s / new_s:.2f}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
