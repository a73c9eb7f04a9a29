#!/usr/bin/env python3
"""The mapping pretraining: the previous loop (one layer after the other, one Adam step per
layer and frame) against ``Trainer.pretrain`` (backend/train/pretrain.py: one joint step per
frame over every layer, captured as a CUDA graph on CUDA), in the same run.

    python scripts/bench/pretrain_speed.py --device cuda --size 1920x1080 --frames 100 --preset fast
    python scripts/bench/pretrain_speed.py --device cpu --clip-dir ../shared/data/tennis --long-edge 256 --preset cpu

Each variant pretrains a fresh trainer of the same configuration and seed (same initial
weights, same targets), timed to the device's completion; the rounds alternate the variants
so a change of the machine's load falls on all of them. After each run the mean distance of
the mappings to their targets is measured on the same fixed samples (a second generator), so
the faster path is also shown to reach the same place. Prints the median times, the ratio
against the previous loop and the device; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from backend.config import preset  # noqa: E402
from backend.hostinfo import cpu_model  # noqa: E402
from backend.train import Trainer  # noqa: E402
from backend.train.pretrain import MappingPretraining  # noqa: E402


def previous(tr: Trainer) -> None:
    """The previous ``Trainer.pretrain`` loop (before backend/train/pretrain.py), without its
    budget and progress bookkeeping: per layer its own Adam, one step per pass and frame."""
    t, g = tr.cfg.train, tr.geom
    init = tr.uv_init()
    tr.model.uv_scales = [float(s) for s in init.scales]
    for i in range(tr.n_layers):
        opt = torch.optim.Adam([{"params": list(tr.model.mappings[i].parameters()), "lr": t.mapping_lr}])
        fitted = init.mode == "fit"
        windowed = fitted and i < tr.n_layers - 1
        for _ in range(t.pretrain_iterations):
            for f in range(g.n_frames):
                x = tr._randint(0, g.width, (t.pretrain_batch_size,))
                y = tr._randint(0, g.height, (t.pretrain_batch_size,))
                xyt = g.xyt(x.float(), y.float(), torch.full_like(x, f, dtype=torch.float32))
                if windowed:
                    n = t.pretrain_batch_size // 2
                    lo, hi = init.window(i, f)
                    r = torch.rand(n, 2, device=tr.device, generator=tr.gen)
                    xy = g.px(lo + r * (hi - lo))
                    xy = torch.stack([xy[:, 0].clamp(0, g.width - 1), xy[:, 1].clamp(0, g.height - 1)], -1)
                    xyt[:n] = g.xyt(xy[:, 0], xy[:, 1], torch.full((n,), float(f), device=tr.device))
                target = init.target(i, xyt[:, :2], f)
                if fitted:
                    target = target.clamp(-0.98, 0.98)
                loss = (target - tr.model.mapping(i, xyt)).norm(dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


def make_clip(args):
    if args.clip_dir:
        from backend.clip import load_clip
        return load_clip(args.clip_dir, long_edge=args.long_edge or 768, max_frames=args.frames)
    from backend.synthetic import make_synthetic_clip
    w, h = (int(v) for v in args.size.split("x"))
    return make_synthetic_clip(w, h, args.frames, seed=0).clip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--clip-dir", type=Path, help="a clip folder (default: the synthetic clip)")
    ap.add_argument("--long-edge", type=int, help="the clip folder's working long edge (default: its own size)")
    ap.add_argument("--size", default="1920x1080", help="the synthetic clip's size")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--passes", type=int, default=0, help="pretraining passes (default: the preset's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clip = make_clip(args)
    cfg = preset(args.preset).replace(train={"device": args.device})
    if args.passes:
        cfg = cfg.replace(train={"pretrain_iterations": args.passes})
    flow = None
    if cfg.model.uv_init == "fit":  # the background's fit reads the flow
        from backend.preprocess.flow import compute_flow
        flow = compute_flow(clip)
    variants = {"previous": previous, "joint": Trainer.pretrain}
    if device.type == "cuda":
        variants["joint, no graph"] = "nograph"
    times: dict[str, list[float]] = {k: [] for k in variants}
    dist: dict[str, list[float]] = {k: [] for k in variants}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for r in range(args.rounds):
        for name, fn in variants.items():
            c = cfg.replace(train={"cuda_graphs": False}) if fn == "nograph" else cfg
            tr = Trainer(clip, flow, c, device)
            sync()
            t0 = time.perf_counter()
            (Trainer.pretrain if fn == "nograph" else fn)(tr)
            sync()
            times[name].append(time.perf_counter() - t0)
            probe = MappingPretraining(tr.model, tr.geom, tr.uv_init(), 4096, 0.0, tr.gen, device, False)
            dist[name].append(probe.distance(frames=8))
            print(f"round {r + 1} {name:>16}: {times[name][-1]:.3f} s, distance to target {dist[name][-1]:.5f}",
                  flush=True)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()} ({torch.get_num_threads()} threads)"
    g = tr.geom
    steps = cfg.train.pretrain_iterations * g.n_frames
    base = statistics.median(times["previous"])
    print(f"\ndevice: {dev}; clip {g.width}x{g.height} x {g.n_frames} frames, {tr.n_layers} layers, preset "
          f"{args.preset}: {cfg.train.pretrain_iterations} passes, batch {cfg.train.pretrain_batch_size}")
    print("| variant | median | per frame step | vs previous | distance to target |")
    print("|---|---|---|---|---|")
    rows = {}
    for name in variants:
        med = statistics.median(times[name])
        rows[name] = {"seconds": times[name], "median_s": med, "ratio": base / med, "distance": dist[name]}
        print(f"| {name} | {med:.3f} s | {1e3 * med / steps:.2f} ms | {base / med:.2f}x | "
              f"{statistics.median(dist[name]):.5f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": dev, "torch": torch.__version__, "preset": args.preset,
                                         "clip": [g.width, g.height, g.n_frames], "layers": tr.n_layers,
                                         "passes": cfg.train.pretrain_iterations,
                                         "batch": cfg.train.pretrain_batch_size, "variants": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
