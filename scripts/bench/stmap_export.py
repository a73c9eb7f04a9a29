#!/usr/bin/env python3
"""The STMap/residual EXR maps' cost: the export with them against today's export, same run.

    python scripts/bench/stmap_export.py --size 1920x1080 --frames 6                 # CPU
    python scripts/bench/stmap_export.py --size 1920x1080 --frames 24 --device cuda --json OUT.json

Part 1, writers: one frame of a 2-layer decomposition's maps (smooth uv, an alpha edge, a
residual with noise) written serially by each EXR library found here (the OpenEXR package,
OpenCV's codec where the build has one) with each compression: milliseconds and megabytes.

Part 2, export: ``export_all`` of an untrained model of ``--preset`` (its cost does not depend
on the weights) on the synthetic clip at ``--size``, once with ``export.maps = "none"`` (the
export before the maps existed: atlases, videos/PNG streams, bake, report) and once with
``"working"`` (the same plus the EXR sequences on the same writer pool); the ratio is the
price of the maps. Both runs evaluate the networks on ``--device`` the same way. The atlas
size is fixed (``--atlas-size``, default 512) so that rendering the atlases, which the maps do
not change, does not drown the per-frame costs (an untrained model's automatic size is 4096).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from backend.export.stmap import library_version, stmap_from_uv, write_exr  # noqa: E402


def one_frame(w: int, h: int):
    import cv2
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    u = np.tanh((xs / w * 2 - 1) * 0.6 + 0.01 * np.sin(ys / 37))
    v = np.tanh((ys / h * 2 - 1) * 0.34)
    d = np.hypot(xs - 0.45 * w, ys - 0.45 * h) - 0.25 * h
    alpha = np.clip(0.5 - d / 2.0, 0, 1).astype(np.float16).astype(np.float32)
    rng = np.random.default_rng(0)
    res = cv2.GaussianBlur((1 + 0.05 * rng.standard_normal((h, w, 3))).astype(np.float32), (0, 0), 3)
    return stmap_from_uv(np.stack([u, v], -1), alpha), res.astype(np.float16)


def libraries() -> list[str]:
    found = []
    try:
        import OpenEXR  # noqa: F401
        found.append("openexr")
    except ImportError:
        pass
    os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
    import cv2
    try:
        if cv2.haveImageWriter("x.exr"):
            found.append("opencv")
    except cv2.error:
        pass
    return found


def part1(w: int, h: int, repeat: int) -> dict:
    st, res = one_frame(w, h)
    out = Path(tempfile.mkdtemp(prefix="stmap-bench-"))
    rows = {}
    try:
        for lib in libraries():
            for comp in ("none", "zip", "piz"):
                t_st = t_res = 0.0
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    write_exr(out / "s.exr", st, False, lib, comp)
                    t1 = time.perf_counter()
                    write_exr(out / "r.exr", res, True, lib, comp)
                    t_st, t_res = t_st + t1 - t0, t_res + time.perf_counter() - t1
                rows[f"{lib} {comp}"] = {"library": library_version(lib), "stmap_ms": 1000 * t_st / repeat,
                                         "stmap_mb": (out / "s.exr").stat().st_size / 2 ** 20,
                                         "residual_ms": 1000 * t_res / repeat,
                                         "residual_mb": (out / "r.exr").stat().st_size / 2 ** 20}
                r = rows[f"{lib} {comp}"]
                print(f"  {lib:8} {comp:5} stmap {r['stmap_ms']:7.1f} ms {r['stmap_mb']:6.2f} MB   "
                      f"residual {r['residual_ms']:7.1f} ms {r['residual_mb']:6.2f} MB", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # the export's pair: ZIP for the float STMap, PIZ for the half residual
    pair = {lib: rows[f"{lib} zip"]["stmap_ms"] + rows[f"{lib} piz"]["residual_ms"] for lib in libraries()}
    for lib, ms in pair.items():
        mb = rows[f"{lib} zip"]["stmap_mb"] + rows[f"{lib} piz"]["residual_mb"]
        raw = rows[f"{lib} none"]["stmap_mb"] + rows[f"{lib} none"]["residual_mb"]
        print(f"  {lib}: stmap zip + residual piz = {ms:.0f} ms, {mb:.1f} MB per layer and frame "
              f"({raw / mb:.1f}x smaller than uncompressed)")
    if len(pair) == 2:
        print(f"  openexr vs opencv (same pair): {pair['opencv'] / pair['openexr']:.2f}x faster")
    rows["pair_ms"] = pair
    return rows


def part2(args, w: int, h: int) -> dict:
    import torch

    from backend.config import preset
    from backend.export import export_all
    from backend.export.outputs import device_name
    from backend.synthetic import make_synthetic_clip
    from backend.train import Trainer
    dev = torch.device(args.device)
    clip = make_synthetic_clip(width=w, height=h, n_frames=args.frames, seed=0).clip
    results = {"device": device_name(dev), "frames": args.frames, "size": [w, h], "preset": args.preset,
               "atlas_size": args.atlas_size}
    for maps in ["none", "working"] * args.repeat:
        cfg = preset(args.preset).replace(clip={"long_edge": max(w, h)}, train={"device": str(dev)},
                                          export={"maps": maps, "atlas_size": args.atlas_size})
        tr = Trainer(clip, None, cfg, dev)
        out = Path(tempfile.mkdtemp(prefix="stmap-export-"))
        try:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            export_all(tr, clip, out, cfg)
            sec = time.perf_counter() - t0
            mb = sum(p.stat().st_size for p in (out / "maps").rglob("*.exr")) / 2 ** 20 if maps != "none" else 0.0
        finally:
            shutil.rmtree(out, ignore_errors=True)
        results.setdefault(maps, []).append(sec)
        print(f"  export.maps = {maps:8} {sec:7.1f} s  {1000 * sec / args.frames:7.0f} ms/frame"
              + (f"  maps {mb / args.frames:.1f} MB/frame" if maps != "none" else ""), flush=True)
        if maps != "none":
            results["maps_mb_per_frame"] = mb / args.frames
    base, with_maps = min(results["none"]), min(results["working"])
    results["ms_per_frame"] = {"none": 1000 * base / args.frames, "working": 1000 * with_maps / args.frames}
    results["maps_ms_per_frame"] = 1000 * (with_maps - base) / args.frames
    results["ratio"] = with_maps / base
    print(f"  with maps vs without: {results['ratio']:.2f}x "
          f"(+{results['maps_ms_per_frame']:.0f} ms/frame, best of {args.repeat})")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1, help="export runs per setting (best counts)")
    ap.add_argument("--atlas-size", type=int, default=512)
    ap.add_argument("--writer-repeat", type=int, default=3)
    ap.add_argument("--skip-export", action="store_true", help="part 1 only")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"host: {host}; EXR writers here: {', '.join(libraries()) or 'none'}", flush=True)
    if not libraries():
        print("no EXR writer installed (pip install OpenEXR): nothing to measure", file=sys.stderr)
        return 2
    print(f"part 1: one frame's maps of one layer at {w}x{h}, serial", flush=True)
    results = {"host": host, "writers": part1(w, h, args.writer_repeat)}
    if not args.skip_export:
        print(f"part 2: export_all, {args.frames} frames at {w}x{h}, preset {args.preset}", flush=True)
        results["export"] = part2(args, w, h)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
