#!/usr/bin/env python3
"""Shots per hour on one GPU: the same small shots one after another, then 2 and 4 at a time.

    python3 scripts/bench/shot_throughput.py --clip data/tennis --shots 4 --rounds 1,2,4 \
        --preset fast --iterations 300 --json "$OUT/shot_throughput.json"
    python3 scripts/bench/shot_throughput.py --clip synthetic --size 96x64 --frames 8 \
        --preset demo --iterations 30 --device cpu          # a smoke run on a CPU machine

Each round runs ``--shots`` shots (the same clip, each its own output folder) through
``python -m backend batch``'s code path (``backend.batch.run_batch``: the service's job
lifecycle and local executor, one worker process per job) with ``--concurrency`` = the
round's number: 1 is the baseline (one shot after another), 2 and 4 share the one GPU.
It prints a table of shots per hour with the ratio against the baseline measured in the
same run, and per shot the PSNR (unchanged across rounds: the same settings), the engine's
time and peak GPU memory; it writes everything as JSON (``--json``, after every round).
``tennis`` frames and masks are the shared clip (``--clip`` its folder); ``synthetic``
makes a clip of ``--size`` and ``--frames``.
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


def _neural_atlas_importable(scratch: Path) -> None:
    """The service's code imports ``neural_atlas.core`` (the add-on's bpy-free core, installed as
    a package by ``pip install -e .``). From a plain export of the repository, alias it."""
    try:
        import neural_atlas.core.protocol  # noqa: F401
        return
    except ImportError:
        pass
    alias = scratch / "pkgs"
    alias.mkdir(parents=True, exist_ok=True)
    (alias / "neural_atlas").symlink_to(ROOT / "addon")
    sys.path.insert(0, str(alias))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(alias), str(ROOT), os.environ.get("PYTHONPATH"))
                                               if p)


class GpuMemorySampler:
    """Peak memory the GPU's processes use (nvidia-smi, every 0.5 s), when nvidia-smi exists."""

    def __init__(self) -> None:
        self.peak_mb = 0
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuMemorySampler":
        if self.available:
            self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak_mb = max(self.peak_mb, sum(int(v) for v in out.split() if v.strip().isdigit()))
            except (OSError, subprocess.SubprocessError, ValueError):
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._t.join(5)


def make_clip(args, scratch: Path) -> tuple[Path, list[Path]]:
    if args.clip != "synthetic":
        clip = Path(args.clip).resolve()
        masks = sorted(d for d in (clip / "masks").iterdir() if d.is_dir()) if (clip / "masks").is_dir() else []
        return clip, masks
    from backend.synthetic import make_synthetic_clip
    w, h = (int(v) for v in args.size.split("x"))
    d = scratch / "synthetic"
    make_synthetic_clip(w, h, args.frames, seed=0).write(d)
    return d, sorted(p for p in (d / "masks").iterdir() if p.is_dir())


def shot_list(path: Path, clip: Path, masks: list[Path], n: int, out: Path, args, **train) -> Path:
    overrides = {"train": {"iterations": args.iterations, "device": args.device, **train}}
    if args.checkpoint_every:
        overrides["train"]["checkpoint_every"] = args.checkpoint_every
    lines = ["[defaults]", f'preset = "{args.preset}"', f'output_root = "{out}"',
             "overrides = " + _inline(overrides), ""]
    for i in range(n):
        lines += ["[[shot]]", f'name = "shot{i + 1}"', f'clip = "{clip}"',
                  "masks = [" + ", ".join(f'"{m}"' for m in masks) + "]", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _inline(d) -> str:
    if isinstance(d, dict):
        return "{ " + ", ".join(f"{k} = {_inline(v)}" for k, v in d.items()) + " }"
    return json.dumps(d)


def device_label() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    except Exception:  # noqa: BLE001
        pass
    import platform
    return f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", default=str(ROOT / "data" / "tennis"),
                    help="a clip folder (frames + masks/<object>/), or 'synthetic'")
    ap.add_argument("--size", default="448x256", help="synthetic clip size")
    ap.add_argument("--frames", type=int, default=70, help="synthetic clip frames")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--rounds", default="1,2,4", help="jobs at once per round; the first is the baseline")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--iterations", type=int, default=300,
                    help="per shot (fast on the H200: ~5 s of training after 8.6 s of pretraining; ~20 s a job "
                         "with loading, flow and export)")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="0: the preset's")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=5,
                    help="iterations of one shot (at most 2 of pretraining) run first and not counted: it fills "
                         "the Triton kernel cache that every later worker process reuses; 0: none")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (after every round)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (default: removed)")
    args = ap.parse_args(argv)
    rounds = [int(r) for r in args.rounds.split(",")]

    scratch = Path(tempfile.mkdtemp(prefix="shot-throughput-"))
    _neural_atlas_importable(scratch)
    from backend.batch import run_batch
    from backend.service.executors import ExecutorOptions

    clip, masks = make_clip(args, scratch)
    result = {"bench": "shot_throughput", "device": device_label(), "clip": clip.name if args.clip != "synthetic"
              else f"synthetic {args.size}x{args.frames}", "shots": args.shots, "preset": args.preset,
              "iterations": args.iterations, "rounds": []}
    print(f"device: {result['device']}; {args.shots} shots of {result['clip']}, preset {args.preset}, "
          f"{args.iterations} iterations each", flush=True)
    try:
        if args.warmup:
            w = scratch / "warmup"
            w.mkdir()
            t0 = time.perf_counter()
            warm = argparse.Namespace(**{**vars(args), "iterations": args.warmup})
            with open(w / "batch.log", "w", encoding="utf-8") as logf:
                code = run_batch(shot_list(w / "shots.toml", clip, masks, 1, w / "atlases", warm,
                                           pretrain_iterations=min(2, args.warmup)),
                                 ExecutorOptions(kind="local", concurrency=1), w / "work", stream=logf, tty=False)
            result["warmup_seconds"] = time.perf_counter() - t0
            print(f"warm-up shot ({args.warmup} iterations, not counted): {result['warmup_seconds']:.1f} s, "
                  f"exit {code}", flush=True)
            if code != 0:
                print((w / "batch.log").read_text(encoding="utf-8")[-3000:], flush=True)
        for k in rounds:
            out = scratch / f"round-{k}"
            out.mkdir()
            shots = shot_list(out / "shots.toml", clip, masks, args.shots, out / "atlases", args)
            log = out / "batch.log"
            t0 = time.perf_counter()
            with GpuMemorySampler() as mem, open(log, "w", encoding="utf-8") as logf:
                code = run_batch(shots, ExecutorOptions(kind="local", concurrency=k), out / "work",
                                 stream=logf, tty=False)
            wall = time.perf_counter() - t0
            summary = json.loads((out / "work" / "summary.json").read_text(encoding="utf-8"))
            per_shot = []
            for r in summary["shots"]:
                rep = {}
                if r.get("output"):
                    try:
                        rep = json.loads((Path(r["output"]) / "report.json").read_text(encoding="utf-8"))
                    except (OSError, ValueError):
                        pass
                per_shot.append({"name": r["name"], "state": r["state"], "psnr": r.get("psnr"),
                                 "psnr_no_residual": r.get("psnr_no_residual"), "seconds": r.get("seconds"),
                                 "train_seconds": r.get("train_seconds"), "wall_seconds": r.get("wall_seconds"),
                                 "peak_gpu_memory_gb": rep.get("peak_gpu_memory_gb"),
                                 "gpu": (r.get("placement") or {}).get("gpu"), "device": r.get("device"),
                                 "error": r.get("error")})
            done = sum(1 for s in per_shot if s["state"] == "done")
            rnd = {"at_once": k, "exit_code": code, "wall_seconds": wall, "done": done,
                   "shots_per_hour": done / wall * 3600.0, "gpu_memory_peak_mb": mem.peak_mb or None,
                   "per_shot": per_shot}
            result["rounds"].append(rnd)
            base = result["rounds"][0]["shots_per_hour"]
            rnd["ratio"] = rnd["shots_per_hour"] / base if base else None
            if code != 0:
                print(log.read_text(encoding="utf-8")[-3000:], flush=True)
            ratio = f"{rnd['ratio']:.2f}x" if rnd["ratio"] is not None else "no baseline"
            print(f"round {k} at once: {wall:.1f} s for {done}/{args.shots} shots, "
                  f"{rnd['shots_per_hour']:.1f} shots/h ({ratio})", flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    _print_table(result)
    return 0 if all(r["done"] == args.shots for r in result["rounds"]) else 1


def _print_table(result) -> None:
    print(f"\n{result['device']}: {result['shots']} x {result['clip']}, {result['preset']} "
          f"{result['iterations']} iterations")
    print("| at once | wall | shots/hour | ratio | GPU memory (peak, all jobs) | PSNR per shot (dB) | "
          "engine s per shot | peak GPU memory per job |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rounds"]:
        psnr = ", ".join(f"{s['psnr']:.2f}" if isinstance(s["psnr"], (int, float)) else s["state"]
                         for s in r["per_shot"])
        secs = ", ".join(f"{s['seconds']:.0f}" if isinstance(s["seconds"], (int, float)) else "-"
                         for s in r["per_shot"])
        mem = ", ".join(f"{s['peak_gpu_memory_gb']:.1f}" if isinstance(s["peak_gpu_memory_gb"], (int, float))
                        else "-" for s in r["per_shot"])
        total = f"{r['gpu_memory_peak_mb'] / 1024:.1f} GB" if r.get("gpu_memory_peak_mb") else "-"
        label = f"{r['at_once']}" + (" (baseline)" if r is result["rounds"][0] else "")
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        print(f"| {label} | {r['wall_seconds']:.1f} s | {r['shots_per_hour']:.1f} | {ratio} | {total} | "
              f"{psnr} | {secs} | {mem} GB |")


if __name__ == "__main__":
    sys.exit(main())
