"""A long shot end to end: 300 frames at 1080p decomposed on one GPU within a time budget, against a
100-frame cut of the same clip at the same budget per frame (the baseline, same run, same card).

Usage (GPU machine):
  python3 scripts/bench/long_shot.py --frames 300 --cut 100 --budget 330 --json OUT/long_shot.json
  CPU check of the plumbing: --frames 8 --cut 4 --size 96x54 --budget 120 --device cpu --preset demo

1. A child process writes a synthetic clip in the seed layout: JPEG frames (a smooth random
   background panning under the camera and a moving disc, scripts/bench/large_clip_memory.py's
   generator) and the disc's masks (``masks/disc/``), so the shot has two layers.
2. ``python -m backend decompose`` runs on all frames (``--max-frames 0``) with ``--budget`` seconds,
   then on the first ``--cut`` frames with ``budget * cut / frames`` seconds (same budget per frame).
   Both use the same settings (default: ``--preset quality``, working resolution 1920, DIS flow at
   960, no EXR maps); each output folder is removed after its report is read (disk).
3. Per run: PSNR with and without the residual, the phases' seconds, the schedule chosen, peak host
   memory sampled in the decomposing process during training (RssAnon: anonymous memory, what has
   to fit in RAM; VmRSS: also the resident pages of the memory-mapped frames and flows) and over the
   whole process (ru_maxrss), and peak GPU memory (``torch.cuda.max_memory_allocated``) in training
   and overall. The summary prints the long run's PSNR minus the cut's, and the memory against 8 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))


def write_clip(folder: Path, n: int, width: int, height: int) -> None:
    """Frames from large_clip_memory.generate plus masks of its disc (same path formula)."""
    import cv2
    import numpy as np
    from large_clip_memory import generate

    generate(folder / "video_frames", n, width, height)
    (folder / "masks" / "disc").mkdir(parents=True, exist_ok=True)
    r = height // 8
    for t in range(n):
        m = np.zeros((height, width), np.uint8)
        cx = int(width * (0.2 + 0.6 * t / max(1, n - 1)))
        cy = int(height * 0.5 + 0.2 * height * np.sin(t / 15))
        cv2.circle(m, (cx, cy), r, 255, -1, lineType=cv2.LINE_8)
        cv2.imwrite(str(folder / "masks" / "disc" / f"{t:05d}.png"), m)


def decompose(clip: Path, out: Path, frames: int, budget_s: float, extra: list[str], log: Path) -> dict:
    cmd = [sys.executable, "-m", "backend", "decompose", str(clip), "--out", str(out), "--frames", f"0:{frames}",
           "--max-frames", "0", "--budget", f"{budget_s:g}", *extra]
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    row = {"frames": frames, "budget_s": budget_s, "rc": rc, "wall_s": round(time.perf_counter() - t0, 2),
           "command": " ".join(cmd[1:])}
    rep = out / "report.json"
    if rc == 0 and rep.exists():
        r = json.loads(rep.read_text(encoding="utf-8"))
        for k in ("psnr", "psnr_no_residual", "iterations", "seconds", "pretrain_seconds", "flow_seconds",
                  "export_seconds", "total_seconds", "iterations_per_second", "device", "atlas_size",
                  "peak_gpu_memory_gb", "training_memory", "schedule"):
            row[k] = r.get(k)
        row["clip"] = {k: r["clip"][k] for k in ("width", "height", "frames")}
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--cut", type=int, default=100, help="frames of the baseline cut (0: no baseline)")
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the long run")
    ap.add_argument("--preset", default="quality")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--flow-long-edge", type=int, default=960)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = args.work or Path(tempfile.mkdtemp(prefix="long_shot_"))
    logs = args.json.parent if args.json else work
    logs.mkdir(parents=True, exist_ok=True)
    clip = work / "clip"
    t0 = time.perf_counter()
    write_clip(clip, args.frames, width, height)
    gen_s = time.perf_counter() - t0
    print(f"clip: {args.frames} frames {width}x{height} written in {gen_s:.1f} s", flush=True)
    cfg = work / "long_shot.toml"  # the same settings for both runs; EXR maps off (disk and time)
    cfg.write_text(f'preset = "{args.preset}"\n[export]\nmaps = "none"\n', encoding="utf-8")
    extra = ["--config", str(cfg), "--long-edge", str(max(width, height)), "--device", args.device,
             "--flow-long-edge", str(args.flow_long_edge)]
    result = {"frames": args.frames, "size": [width, height], "generate_seconds": round(gen_s, 2), "runs": []}
    plan = [(args.frames, args.budget)]
    if args.cut:
        plan.append((args.cut, args.budget * args.cut / args.frames))
    for frames, budget in plan:
        row = decompose(clip, work / f"out_{frames}", frames, budget, extra, logs / f"long_shot_{frames}.log")
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    long = result["runs"][0]
    print(f"\n{'frames':>6} {'budget':>7} {'wall':>7} {'PSNR':>7} {'atlas':>7} {'iters':>7} {'spp':>6} "
          f"{'host anon':>9} {'host rss':>8} {'proc rss':>8} {'gpu train':>9} {'gpu all':>7}")
    for r in result["runs"]:
        if "psnr" not in r or r["psnr"] is None:
            print(f"{r['frames']:>6} failed rc={r['rc']}")
            continue
        m = r.get("training_memory") or {}
        h = m.get("host", {})
        print(f"{r['frames']:>6} {r['budget_s']:7.0f} {r['wall_s']:7.1f} {r['psnr']:7.2f} {r['psnr_no_residual']:7.2f} "
              f"{r['iterations']:7d} {r['schedule']['samples_per_pixel']:6.2f} {h.get('peak_rssanon_gb', 0):9.2f} "
              f"{h.get('peak_vmrss_gb', 0):8.2f} {h.get('process_peak_rss_gb', 0):8.2f} "
              f"{m.get('gpu_allocated_gb') or 0:9.2f} {r.get('peak_gpu_memory_gb') or 0:7.2f}")
    if len(result["runs"]) == 2 and all(r.get("psnr") is not None for r in result["runs"]):
        d = long["psnr"] - result["runs"][1]["psnr"]
        result["psnr_long_minus_cut"] = round(d, 3)
        print(f"PSNR {args.frames} frames minus the {args.cut}-frame cut at the same budget per frame: {d:+.2f} dB")
    if long.get("training_memory"):
        anon = long["training_memory"]["host"].get("peak_rssanon_gb")
        print(f"host memory in training (anonymous): {anon} GB (limit 8 GB); device {long.get('device')}; "
              f"load average {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
