#!/usr/bin/env python3
"""Time-to-PSNR of training variants on one clip, measured in one run on one device.

    python scripts/bench/time_to_psnr.py --clip tennis --variants seed-eager:60 seed:240 fast:240
    python scripts/bench/time_to_psnr.py --clip synthetic --size 1920x1080 --frames 100 --variants fast:240

Each variant is ``NAME[+section.field=value...][:SECONDS]`` (training-time budget, pretraining
included). Names:

* ``seed-eager``: the seed's configuration, PyTorch hash grids, no CUDA graphs: a faithful
  re-implementation without GPU engineering (the baseline).
* ``seed``: the same model, losses, batch and learning rates, with the Triton grids and the
  CUDA-graph step (identical per-iteration behaviour, faster).
* any preset name (``fast``, ``quality``, ...): that preset.

Full-frame reconstruction PSNR (with and without the residual) is evaluated every
``--eval-every`` iterations (not counted as training time). Prints a table with iterations
per second, the time each variant needed to reach the target PSNRs, and the ratio against the
first variant; writes everything as JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backend.clip import Clip, load_clip  # noqa: E402
from backend.config import preset  # noqa: E402
from backend.export.outputs import device_name  # noqa: E402
from backend.preprocess.flow import FlowSet, compute_flow, consistency_mask, rescale_flow  # noqa: E402
from backend.train import Trainer  # noqa: E402


def variant_config(spec: str, eval_every: int):
    """``NAME[+section.field=value...]``: a variant with overrides, e.g. ``fast+train.mlp_lr=3e-4``
    or ``fast+model.texture_grid={"log2_hashmap_size":19}``. A constant-rate variant runs until its
    time budget; a scheduled one (``train.lr_schedule``) keeps its iteration count, the horizon of
    its schedule (or has it fitted to the budget with ``--fit-iterations``)."""
    name, *overrides = spec.split("+")
    cfg = _base_config(name).replace(train={"eval_every": eval_every, "device": "cuda"})
    for ov in overrides:
        key, _, value = ov.partition("=")
        section, field = key.split(".")
        cfg = cfg.replace(**{section: {field: json.loads(value)}})
    if cfg.train.lr_schedule == "constant":
        cfg = cfg.replace(train={"iterations": 10 ** 7})
    return cfg


def _base_config(name: str):
    if name == "seed-eager":
        cfg = preset("seed").replace(model={"encoding_backend": "torch"}, train={"cuda_graphs": False})
    elif name == "seed":
        cfg = preset("seed")
    else:
        cfg = preset(name)
    return cfg


def load(args) -> Clip:
    if args.clip in ("tennis", "folder"):  # folder: any clip folder (video_frames/, masks/), e.g. car-turn
        if args.clip == "folder" and args.clip_dir is None:
            raise SystemExit("--clip folder needs --clip-dir DIR")
        return load_clip(args.tennis if args.clip == "tennis" else args.clip_dir, long_edge=args.long_edge or 768)
    from backend.synthetic import make_synthetic_clip
    w, h = (int(v) for v in args.size.split("x"))
    return make_synthetic_clip(width=w, height=h, n_frames=args.frames, seed=0).clip


def flow_for(clip: Clip, max_edge: int) -> tuple[FlowSet, float]:
    """DIS flow, computed at most at ``max_edge`` long edge and rescaled per axis."""
    t0 = time.perf_counter()
    scale = max_edge / max(clip.width, clip.height)
    if scale >= 1:
        return compute_flow(clip), time.perf_counter() - t0
    import cv2
    w, h = round(clip.width * scale), round(clip.height * scale)
    small = Clip(np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in clip.frames]),
                 source=clip.source + f"@{w}x{h}")
    fs = compute_flow(small)
    fw = np.stack([rescale_flow(f, clip.width, clip.height) for f in fs.forward])
    bw = np.stack([rescale_flow(f, clip.width, clip.height) for f in fs.backward])
    flow = FlowSet(forward=fw, backward=bw, forward_ok=consistency_mask(fw, bw, 1.0),
                   backward_ok=consistency_mask(bw, fw, 1.0), method="dis@%d" % max_edge, consistency_px=1.0)
    return flow, time.perf_counter() - t0


def split_budget(spec: str) -> tuple[str, float]:
    """``VARIANT[:SECONDS]`` -> (variant, seconds); a JSON override may hold colons too."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.replace(".", "", 1).isdigit():
        return head, float(tail)
    return spec, 120.0


def fit_schedule(tr: Trainer, budget_s: float) -> None:
    """Set a scheduled variant's iteration count so that its schedule ends with its time budget:
    the rate is measured over iterations 100-400 (after the CUDA graph is captured)."""
    tr.train(iterations=100, stop_after_s=budget_s)
    it1, s1 = tr.state.iteration, tr.state.seconds
    tr.train(iterations=400, stop_after_s=budget_s)
    rate = (tr.state.iteration - it1) / max(tr.state.seconds - s1, 1e-6)
    left = max(budget_s - tr.state.seconds, 0.0)
    tr.cfg.train.iterations = int(tr.state.iteration + rate * left * 0.98)
    print(f"  schedule fitted to the budget: {rate:.1f} it/s -> {tr.cfg.train.iterations} iterations",
          flush=True)


def time_to(evals, target):
    for it, sec, p, _ in evals:
        if p >= target:
            return it, sec
    return None, None


def add_clip_arguments(ap: argparse.ArgumentParser) -> None:
    """The clip options that ``load`` and ``flow_for`` read (shared with step_profile.py)."""
    ap.add_argument("--clip", choices=("tennis", "synthetic", "folder"), default="tennis")
    ap.add_argument("--clip-dir", type=Path, help="--clip folder: the clip's folder (video_frames/, masks/)")
    ap.add_argument("--long-edge", type=int, default=0,
                    help="tennis/folder: load at this long edge (default 768)")
    ap.add_argument("--tennis", type=Path, default=ROOT.parent / "shared" / "data" / "tennis")
    ap.add_argument("--size", default="1920x1080", help="synthetic clip size")
    ap.add_argument("--frames", type=int, default=100, help="synthetic clip frames")
    ap.add_argument("--flow-max-edge", type=int, default=960, help="DIS flow at most at this long edge")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_clip_arguments(ap)
    ap.add_argument("--variants", nargs="+", default=["seed-eager:60", "seed:180", "fast:180"])
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--targets", type=float, nargs="+", default=[24.3, 26.2, 28.0, 30.0])
    ap.add_argument("--fit-iterations", action="store_true",
                    help="scheduled variants: fit the iteration count (and so the decay) to the budget")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cuda", help="cuda (benchmarks) or cpu (a smoke test)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    cuda = dev.type == "cuda"
    clip = load(args)
    flow, flow_s = flow_for(clip, args.flow_max_edge)
    print(f"device: {device_name(dev)}; clip {args.clip} {clip.width}x{clip.height}x{clip.n_frames}, "
          f"{clip.n_objects} object(s); flow {flow.method} {flow_s:.1f} s", flush=True)
    results = []
    for spec in args.variants:
        name, budget_s = split_budget(spec)
        cfg = variant_config(name, args.eval_every).replace(train={"device": str(dev)})
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        tr = Trainer(clip, flow, cfg, dev)
        setup_s = time.perf_counter() - t0
        tr.pretrain()
        if cuda:
            torch.cuda.synchronize()
        pre = tr.state.pretrain_seconds
        try:
            if args.fit_iterations and cfg.train.lr_schedule != "constant":
                fit_schedule(tr, budget_s - pre)
            tr.train(stop_after_s=max(budget_s - pre, 1.0))
        except torch.cuda.OutOfMemoryError as e:  # report and go on with the next variant
            print(f"{name}: out of memory: {e}", flush=True)
            continue
        st = tr.state
        if not st.evals or st.evals[-1][0] != st.iteration:
            p, pn = tr.evaluate()
            st.evals.append([st.iteration, round(st.seconds, 3), round(p, 3), round(pn, 3)])
        evals = [[it, round(sec + pre, 2), p, pn] for it, sec, p, pn in st.evals]  # time incl. pretraining
        rec = {"variant": name, "budget_s": budget_s, "pretrain_s": round(pre, 2), "setup_s": round(setup_s, 2),
               "iterations": st.iteration, "train_s": round(st.seconds, 2),
               "it_per_s": round(st.iteration / max(st.seconds, 1e-9), 2),
               "final_psnr": evals[-1][2], "final_psnr_no_residual": evals[-1][3],
               "peak_gpu_gb": round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2) if cuda else None,
               "batch": cfg.train.batch_size, "schedule_iterations": tr.cfg.train.iterations,
               "grid_backend": tr.model.grid_backend,
               "cuda_graphs": tr.use_graphs, "evals": evals,
               "time_to": {str(t): time_to(evals, t) for t in args.targets}}
        results.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "evals"}), flush=True)
        print("  curve (it, s, psnr, psnr_nores):", evals, flush=True)
        del tr
        if cuda:
            torch.cuda.empty_cache()
    print(f"\n{'variant':12} {'it/s':>7} {'iters':>7} {'final dB':>8} " +
          " ".join(f"{'t(' + str(t) + ')':>10}" for t in args.targets) + "   (seconds incl. pretraining)")
    base = results[0] if results else None
    for r in results:
        cells = []
        for t in args.targets:
            it, sec = r["time_to"][str(t)]
            cells.append(f"{sec:10.1f}" if sec is not None else f"{'-':>10}")
        ratio = ""
        if base is not None and r is not base:
            ratio = f"  it/s x{r['it_per_s'] / max(base['it_per_s'], 1e-9):.1f} vs {base['variant']}"
        print(f"{r['variant']:12} {r['it_per_s']:7.1f} {r['iterations']:7d} {r['final_psnr']:8.2f} " +
              " ".join(cells) + ratio)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name(dev), "clip": args.clip,
                                         "size": [clip.width, clip.height, clip.n_frames],
                                         "flow_s": flow_s, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
