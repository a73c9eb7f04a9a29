"""Peak host memory of preprocessing a long 1080p clip: load, DIS flow, training-data preparation.

Usage: .venv/bin/python scripts/bench/large_clip_memory.py [--frames 300] [--width 1920 --height 1080]
       [--long-edge 1920] [--work DIR] [--keep]

1. A child process writes a synthetic clip (a smooth random background panning under the
   camera and a moving disc, JPEG frames) to a temporary folder. It is cheaper than
   backend.synthetic's ground-truth generator, which holds float32 frames in RAM.
2. A fresh child process then runs, with a thread sampling /proc/self/status every 20 ms:
   load_clip (compact uint8 storage, memory-mapped above 512 MiB), compute_flow with a cache
   folder (DIS, streamed into float16 memory-mapped .npy files, consistency masks likewise),
   and a CPU stand-in for the training data: torch tensors over the same memmaps (no copy)
   and 20 batches of 10,000 pixels gathered from them (colours, flows, consistency).

Reported per phase: peak RssAnon (anonymous memory: what must fit in RAM), peak VmRSS and
VmHWM (which also count memory-mapped file pages; the kernel can drop those under pressure)
and the seconds taken. It also prints what the same clip would take held as float32 arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def generate(folder: Path, n: int, width: int, height: int) -> None:
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pan = 2  # px per frame
    bw, bh = width + pan * n + 8, height + 8
    small = rng.random((bh // 16 + 2, bw // 16 + 2, 3), dtype=np.float32)
    bg = cv2.resize(small, (bw, bh), interpolation=cv2.INTER_CUBIC)
    bg += 0.15 * cv2.GaussianBlur(rng.random((bh, bw, 3), dtype=np.float32), (0, 0), 1.2)
    bg = (np.clip(bg / 1.15, 0, 1) * 255).astype(np.uint8)
    del small
    r = height // 8
    for t in range(n):
        frame = np.ascontiguousarray(bg[4:4 + height, 4 + pan * t:4 + pan * t + width])
        cx = int(width * (0.2 + 0.6 * t / max(1, n - 1)))
        cy = int(height * 0.5 + 0.2 * height * np.sin(t / 15))
        cv2.circle(frame, (cx, cy), r, (40, 80, 220), -1, lineType=cv2.LINE_AA)
        cv2.imwrite(str(folder / f"{t:05d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 92])


class Sampler:
    """Samples /proc/self/status; ``mark(name)`` closes a phase and records its peaks."""

    FIELDS = ("RssAnon", "VmRSS", "VmHWM", "RssFile")

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.phases: list[dict] = []
        self._peak = {k: 0 for k in self.FIELDS}
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def read() -> dict:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in Sampler.FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def _sample(self) -> None:
        now = self.read()
        with self._lock:
            for k, v in now.items():
                self._peak[k] = max(self._peak[k], v)

    def mark(self, name: str) -> None:
        self._sample()
        with self._lock:
            t = time.perf_counter()
            self.phases.append({"phase": name, "seconds": round(t - self._t0, 1),
                                **{f"peak_{k}_GB": round(v / 1e9, 3) for k, v in self._peak.items()}})
            self._peak = {k: 0 for k in self.FIELDS}
            self._t0 = t

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(frames_dir: Path, work: Path, long_edge: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(2)
    from backend.clip import load_clip
    from backend.preprocess import compute_flow

    s = Sampler()
    s.mark("start (python, numpy, torch, cv2 imported)")
    clip = load_clip(frames_dir, long_edge=long_edge, max_frames=100000, scratch_dir=work / "scratch")
    s.mark(f"load_clip ({clip.n_frames} frames {clip.width}x{clip.height}, "
           f"{clip.frame_data.dtype}, memory-mapped={clip.memory_mapped})")
    clip.fingerprint()
    s.mark("fingerprint (hash of every pixel)")
    done = [0]
    flow = compute_flow(clip, method="dis", cache_dir=work / "cache",
                        progress=lambda d, n: done.__setitem__(0, d))
    s.mark(f"compute_flow (DIS, {done[0]} pairs, float16 cache + consistency memmaps)")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memmaps: torch warns, we only read
        frames_t = torch.from_numpy(clip.frame_data)
        fw_t = torch.from_numpy(np.asarray(flow.forward))
        bw_t = torch.from_numpy(np.asarray(flow.backward))
        ok_t = torch.from_numpy(np.asarray(flow.forward_ok))
    gen = torch.Generator().manual_seed(0)
    F_, H, W = clip.n_frames, clip.height, clip.width
    for _ in range(20):
        f = torch.randint(F_ - 1, (10000,), generator=gen)
        y = torch.randint(H, (10000,), generator=gen)
        x = torch.randint(W, (10000,), generator=gen)
        rgb = frames_t[f, y, x].float() / 255.0
        vec = fw_t[f, y, x].float() + bw_t[f, y, x].float()
        ok = ok_t[f, y, x]
        assert rgb.shape == (10000, 3) and vec.shape == (10000, 2) and ok.shape == (10000,)
    s.mark("training data on CPU (tensors over the memmaps, 20 batches of 10k pixels)")
    s.stop()
    n = clip.n_frames
    px = clip.height * clip.width
    float32_gb = {"frames": 4 * 3 * px * n / 1e9, "flows (fw+bw)": 2 * 4 * 2 * px * (n - 1) / 1e9,
                  "consistency (bool)": 2 * px * (n - 1) / 1e9}
    compact_gb = {"frames uint8": 3 * px * n / 1e9, "flows float16": 2 * 2 * 2 * px * (n - 1) / 1e9,
                  "consistency bool": 2 * px * (n - 1) / 1e9}
    return {"phases": s.phases, "float32_gb": {k: round(v, 2) for k, v in float32_gb.items()},
            "compact_on_disk_gb": {k: round(v, 2) for k, v in compact_gb.items()},
            "clip": [n, clip.width, clip.height]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--long-edge", type=int, default=1920, help="working resolution (default: full 1080p)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--child", choices=("generate", "measure"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "generate":
        generate(args.work / "frames", args.frames, args.width, args.height)
        return
    if args.child == "measure":
        print(json.dumps(measure(args.work / "frames", args.work, args.long_edge)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="large-clip-", dir=os.environ.get("TMPDIR")))
    try:
        base = [sys.executable, __file__, "--work", str(work), "--frames", str(args.frames),
                "--width", str(args.width), "--height", str(args.height), "--long-edge", str(args.long_edge)]
        t0 = time.perf_counter()
        if not (work / "frames").is_dir():
            subprocess.run(base + ["--child", "generate"], check=True)
        print(f"clip: {args.frames} frames {args.width}x{args.height} JPEG in {work / 'frames'} "
              f"({time.perf_counter() - t0:.0f} s to write)", flush=True)
        out = subprocess.run(base + ["--child", "measure"], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"working resolution: {result['clip'][1]}x{result['clip'][2]}, {result['clip'][0]} frames")
        print(f"{'phase':86s} {'s':>6s} {'RssAnon':>8s} {'VmRSS':>7s} {'VmHWM':>7s}  (peak GB)")
        for p in result["phases"]:
            print(f"{p['phase']:86s} {p['seconds']:6.1f} {p['peak_RssAnon_GB']:8.2f} "
                  f"{p['peak_VmRSS_GB']:7.2f} {p['peak_VmHWM_GB']:7.2f}")
        print("held as float32 in RAM instead (GB):", result["float32_gb"],
              f"= {sum(result['float32_gb'].values()):.1f}")
        print("compact storage, memory-mapped (GB):", result["compact_on_disk_gb"])
        print(json.dumps(result))
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
