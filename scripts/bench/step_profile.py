#!/usr/bin/env python3
"""Where one training step's GPU time goes, by kernel family, for a few configurations.

    python scripts/bench/step_profile.py --clip tennis --variants seed fast fast+train.tf32=false

For each variant: the CUDA-graph step time (median over replays, CUDA events) and, from
``torch.profiler`` over a few eager steps, the GPU time per kernel family (matrix products,
hash-grid kernels, Adam, element-wise, reductions, other) and the top kernels. The first
variant is the baseline of the printed ratio. Variant syntax as in ``time_to_psnr.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import torch  # noqa: E402

from backend.export.outputs import device_name  # noqa: E402
from backend.train import Trainer  # noqa: E402
from time_to_psnr import add_clip_arguments, flow_for, load, variant_config  # noqa: E402

FAMILIES = (("fused_mlp", ("_mlp_fwd_kernel", "_mlp_bwd_kernel", "_relu_bwd_kernel")),
            ("inductor", ("triton_poi", "triton_red", "triton_per")),
            ("gemm", ("gemm", "sm90_", "cutlass", "cublas", "ampere_", "sgemm", "xmma")),
            ("hashgrid", ("_hash", "_fwd", "_bwd", "grid")),
            ("adam", ("adam",)),
            ("reduce", ("reduce", "sum", "mean", "norm")),
            ("elementwise", ("elementwise", "vectorized", "unrolled", "index", "scatter", "gather",
                             "copy", "fill")))


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def graph_step_ms(tr: Trainer, first_it: int, n: int = 60) -> float:
    for it in range(first_it, first_it + 4):  # two eager warm-ups, the capture, one replay
        tr.step(it)
    torch.cuda.synchronize()
    times = []
    for it in range(first_it + 4, first_it + 4 + n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        tr.step(it)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def profile_eager(tr: Trainer, first_it: int, steps: int = 4) -> tuple[dict, list, float]:
    """GPU time per kernel family over ``steps`` eager steps, after two warm-up steps (whose wall
    time, torch.compile's compilation included, is returned)."""
    import time

    from torch.profiler import ProfilerActivity, profile
    t0 = time.perf_counter()
    for it in range(first_it, first_it + 2):
        tr._eager_step(it)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for it in range(first_it + 2, first_it + 2 + steps):
            tr._eager_step(it)
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.name] += ev.device_time / 1000.0 / steps  # ms per step
    fams: dict[str, float] = defaultdict(float)
    for k, v in per_kernel.items():
        fams[family(k)] += v
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return dict(fams), top, warm_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_clip_arguments(ap)
    ap.add_argument("--variants", nargs="+", default=["seed", "fast"])
    ap.add_argument("--at-iteration", type=int, default=20_000,
                    help="profile the step of this phase (past the bootstrapping/global-rigidity stops)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    clip = load(args)
    flow, _ = flow_for(clip, args.flow_max_edge)
    print(f"device: {device_name(dev)}; clip {clip.width}x{clip.height}x{clip.n_frames}", flush=True)
    rows = []
    for spec in args.variants:
        cfg = variant_config(spec, 0)
        try:
            tr = Trainer(clip, flow, cfg, dev)
            fams, top, warm_s = profile_eager(tr, args.at_iteration)
            ms = graph_step_ms(tr, args.at_iteration + 10)
        except Exception as exc:  # one failing variant does not cost the others
            import traceback
            traceback.print_exc()
            print(json.dumps({"variant": spec, "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
            tr = None
            torch.cuda.empty_cache()
            continue
        try:
            from backend.model import fused_mlp as fm
            fell, opts = dict(fm.FALLBACK), dict(fm.OPTIONS.__dict__)
            fm.reset_fallback()
        except ImportError:
            fell, opts = {}, {}
        rows.append({"variant": spec, "graph_step_ms": round(ms, 3), "batch": cfg.train.batch_size,
                     "fallback": fell, "fused_options": opts,
                     "mlp_backend": tr.model.mlp_backend, "warmup_2_steps_s": round(warm_s, 2),
                     "eager_gpu_ms": {k: round(v, 3) for k, v in sorted(fams.items())},
                     "eager_gpu_total_ms": round(sum(fams.values()), 3),
                     "top": [[k[:90], round(v, 3)] for k, v in top]})
        print(json.dumps(rows[-1]), flush=True)
        del tr
        torch.cuda.empty_cache()
    if not rows:
        return 1
    base = rows[0]["graph_step_ms"]
    print(f"\n{'variant':40} {'batch':>6} {'step ms':>8} {'Mpx/s':>7} {'vs first':>8}  GPU ms by family (eager)")
    for r in rows:
        fam = " ".join(f"{k}={v:.2f}" for k, v in r["eager_gpu_ms"].items())
        print(f"{r['variant'][:40]:40} {r['batch']:6d} {r['graph_step_ms']:8.2f} "
              f"{r['batch'] / r['graph_step_ms'] / 1e3:7.2f} {base / r['graph_step_ms']:7.2f}x  {fam}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name(dev), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
