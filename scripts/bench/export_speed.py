#!/usr/bin/env python3
"""The export's file writing at a given size: the previous in-loop writer against the thread pool.

    python scripts/bench/export_speed.py --size 1920x1080 --frames 12
    python scripts/bench/export_speed.py --size 1920x1080 --frames 100 --full --preset fast --device cuda
    python scripts/bench/export_speed.py --skip-part1 --full --frames 40 --device cuda --workers 8,16 --rounds 2

Part 1 (always) writes what the export writes per frame for a 2-layer decomposition, from
realistic images (smooth colour, noise, alpha ramps) already in host memory: 6 PNG streams,
the baked maps (uv float32, alpha and residual float16 memory-mapped) and 6 H.264 videos
(when PyAV or imageio-ffmpeg is installed).

* baseline: the previous export's I/O: every PNG and map written in the loop's thread, then
  each video encoded from the PNG files read back (or, with no encoder, the PNG sequence
  written a second time as the "video");
* pooled: ``backend.export.sinks``: the frame's files on a thread pool, each video encoded
  from the frames as they come, no second PNG sequence.

Part 2 (``--full``) times ``export_all`` itself on a model of ``--preset`` pretrained only (the
cost does not depend on the weights beyond the atlas sizes, which the pretrained mapping gives
as a trained shot's): network evaluation on ``--device`` included, at each ``--workers`` count
(the rounds alternate them), with the report's ``export_phases``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from backend.clip import read_image, write_png, write_video  # noqa: E402
from backend.clip.video import writer_library  # noqa: E402
from backend.export.outputs import device_name  # noqa: E402
from backend.export.sinks import FrameWriters, VideoSink, default_workers, png_job, store_job  # noqa: E402

ENCODE = writer_library() is not None  # --no-encoder: as on a machine without PyAV or imageio-ffmpeg
STREAMS = ("reconstruction", "reconstruction_no_residual", "alpha_0", "alpha_1", "residual_0", "residual_1")


def frame_data(w: int, h: int, k: int) -> dict:
    rng = np.random.default_rng(k)
    base = cv2.GaussianBlur(rng.random((h // 8, w // 8, 3), dtype=np.float32), (0, 0), 2)
    rgb = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    rgb = np.clip(rgb + 0.02 * rng.standard_normal(rgb.shape, dtype=np.float32), 0, 1)
    ramp = np.clip(np.linspace(-1, 2, w, dtype=np.float32)[None, :].repeat(h, 0) - k * 0.01, 0, 1)
    u8 = {"reconstruction": rgb, "reconstruction_no_residual": rgb * 0.9, "alpha_0": ramp,
          "alpha_1": 1 - ramp, "residual_0": rgb * 0.5 + 0.25, "residual_1": rgb[..., ::-1] * 0.5}
    u8 = {k2: (np.clip(v, 0, 1) * 255 + 0.5).astype(np.uint8) for k2, v in u8.items()}
    uv = rng.random((2, h, w, 2), dtype=np.float32)
    return {"png": u8, "uv": uv, "alpha": rng.random((2, h, w), dtype=np.float32).astype(np.float16),
            "res": rng.random((2, h, w, 3), dtype=np.float32).astype(np.float16)}


def maps(out: Path, n: int, w: int, h: int):
    mm = np.lib.format.open_memmap
    return ([mm(out / f"uv{i}.npy", "w+", np.float32, (n, h, w, 2)) for i in range(2)],
            [mm(out / f"a{i}.npy", "w+", np.float16, (n, h, w)) for i in range(2)],
            [mm(out / f"r{i}.npy", "w+", np.float16, (n, h, w, 3)) for i in range(2)])


def baseline(out: Path, data: list[dict], w: int, h: int, fps: float) -> None:
    uvm, am, rm = maps(out, len(data), w, h)
    for f, d in enumerate(data):
        for i in range(2):
            uvm[i][f], am[i][f], rm[i][f] = d["uv"][i], d["alpha"][i], d["res"][i]
        for name in STREAMS:
            write_png(out / "frames" / name / f"{f:05d}.png", d["png"][name])
    for name in STREAMS:  # the previous export: each video from its PNGs read back
        files = sorted((out / "frames" / name).glob("*.png"))
        write_video(out / "video" / f"{name}.mp4", (read_image(p)[..., :3] for p in files), fps,
                    encoder="auto" if ENCODE else "png")


def pooled(out: Path, data: list[dict], w: int, h: int, fps: float) -> None:
    uvm, am, rm = maps(out, len(data), w, h)
    sinks = {n: VideoSink(out / "video" / f"{n}.mp4", fps) for n in STREAMS} if ENCODE else {}
    writers = FrameWriters()
    for f, d in enumerate(data):
        jobs = [store_job(m[f], v) for ms, arr in ((uvm, d["uv"]), (am, d["alpha"]), (rm, d["res"]))
                for m, v in zip(ms, arr)]
        for name in STREAMS:
            img = d["png"][name]
            jobs.append(png_job(out / "frames" / name / f"{f:05d}.png", img))
            if name in sinks:
                sinks[name].put(img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2))
        writers.submit(jobs)
    writers.close()
    for s in sinks.values():
        s.close()


def part1(args, w: int, h: int) -> None:
    data = [frame_data(w, h, k) for k in range(args.frames)]
    print(f"part 1: {args.frames} frames at {w}x{h}, encoder {writer_library() if ENCODE else 'none (PNG frames)'}, "
          f"{default_workers()} writer threads", flush=True)
    times = {}
    for name, fn in (("baseline", baseline), ("pooled", pooled)):
        out = Path(tempfile.mkdtemp(prefix="export-bench-"))
        try:
            t0 = time.perf_counter()
            fn(out, data, w, h, 24.0)
            times[name] = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(f"  {name:9} {times[name]:7.2f} s  {times[name] / args.frames * 1000:6.0f} ms/frame  "
              f"{size / 2 ** 20:7.0f} MB written", flush=True)
    print(f"  pooled vs baseline: {times['baseline'] / times['pooled']:.2f}x")


def part2(args, w: int, h: int) -> dict:
    import torch

    from backend.config import preset
    from backend.export import export_all
    from backend.synthetic import make_synthetic_clip
    from backend.train import Trainer
    dev = torch.device(args.device)
    clip = make_synthetic_clip(width=w, height=h, n_frames=args.frames, seed=0).clip
    cfg = preset(args.preset).replace(clip={"long_edge": max(w, h)}, train={"device": str(dev)})
    tr = Trainer(clip, None, cfg, dev)
    tr.pretrain()  # the mapping at its pretraining target: atlas sizes as a trained shot's
    counts = [int(v) for v in args.workers.split(",")] if args.workers else [0]
    times: dict[int, list[float]] = {n: [] for n in counts}
    phases: dict[int, dict] = {}
    print(f"part 2: export_all, preset {args.preset}, {device_name(dev)}, {args.frames} frames at {w}x{h}, "
          f"writer threads {counts} (0: the default, {default_workers()})", flush=True)
    for r in range(args.rounds):
        for n in counts:
            c = cfg.replace(export={"workers": n})
            out = Path(tempfile.mkdtemp(prefix="export-bench-"))
            try:
                t0 = time.perf_counter()
                rep = export_all(tr, clip, out, c)
                times[n].append(time.perf_counter() - t0)
                phases[n] = rep["export_phases"]
            finally:
                shutil.rmtree(out, ignore_errors=True)
            print(f"  round {r + 1}, {phases[n]['workers']:2d} threads: {times[n][-1]:6.1f} s "
                  f"({times[n][-1] / args.frames * 1000:.0f} ms/frame)  phases {phases[n]}", flush=True)
    base = min(times[counts[0]])
    for n in counts:
        print(f"  {phases[n]['workers']:2d} threads: best {min(times[n]):.1f} s, "
              f"{base / min(times[n]):.2f}x against {phases[counts[0]]['workers']} threads")
    return {"device": device_name(dev), "frames": args.frames, "size": [w, h], "preset": args.preset,
            "atlas_sizes": rep["atlas_sizes"],
            "runs": {str(phases[n]["workers"]): {"seconds": times[n], "phases": phases[n]} for n in counts}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--full", action="store_true", help="also time export_all (part 2)")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-encoder", action="store_true", help="part 1 as with no H.264 encoder installed")
    ap.add_argument("--workers", help="part 2 at these writer-thread counts, e.g. 8,16 (the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=1, help="part 2's rounds (alternating the counts)")
    ap.add_argument("--skip-part1", action="store_true")
    ap.add_argument("--json", type=Path, help="part 2's results")
    args = ap.parse_args()
    global ENCODE
    ENCODE = ENCODE and not args.no_encoder
    w, h = (int(v) for v in args.size.split("x"))
    import os
    import platform
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores", flush=True)
    if not args.skip_part1:
        part1(args, w, h)
    if args.full:
        res = part2(args, w, h)
        if args.json:
            import json
            args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
