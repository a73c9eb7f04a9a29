#!/usr/bin/env python3
"""The PyTorch hash grid (the CPU path) of a baseline revision against the working tree's, in
the same run on this machine's CPU: the grids alone and the `cpu` preset's training step.

    python scripts/bench/cpu_grid.py --baseline-rev 670b791 [--tennis DIR] [--json OUT]

The baseline's ``backend/encodings/hashgrid.py`` is read from git and imported beside the current
one; the two are swapped in place (``_HashGridFunction``, ``_Layout``) between timed rounds, which
alternate so that a change of the machine's load falls on both. Checked first: both give the same
forward values (bit for bit) and the same gradients (to float32 rounding).

* grids: forward and backward (table and input gradients) of the `cpu` preset's 2D texture grid
  and 3D space-time grid at 16,384 points each;
* step: `cpu` preset training steps on tennis at long edge 256 (past pretraining).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import backend.encodings.hashgrid as HG  # noqa: E402
from backend.config import preset  # noqa: E402
from backend.hostinfo import cpu_model  # noqa: E402


def load_baseline(rev: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:backend/encodings/hashgrid.py"],
                         check=True, capture_output=True, text=True).stdout
    src = src.replace("from ..config import GridConfig", "from backend.config import GridConfig")
    path = Path(tempfile.mkdtemp()) / "hashgrid_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("hashgrid_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hashgrid_baseline"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


CURRENT = {"_HashGridFunction": HG._HashGridFunction, "_Layout": HG._Layout}


def use(impl: dict, grids) -> None:
    for k, v in impl.items():
        setattr(HG, k, v)
    for g in grids:
        g._lay = None  # rebuilt from the module's _Layout


def grid_round(grids, xs) -> None:
    for g, x in zip(grids, xs):
        y = g(x)
        torch.autograd.grad(y.square().sum(), [x, g.params])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-rev", default="670b791")
    ap.add_argument("--tennis", type=Path, default=ROOT.parent / "shared" / "data" / "tennis")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_baseline(args.baseline_rev)
    BASE = {"_HashGridFunction": base._HashGridFunction, "_Layout": base._Layout}
    cfg = preset("cpu")
    grids = [HG.TorchHashGrid(2, cfg.model.texture_grid), HG.TorchHashGrid(3, cfg.model.xyt_grid)]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(16384, d, generator=gen).requires_grad_() for d in (2, 3)]

    # the same values and gradients
    outs = {}
    for name, impl in (("baseline", BASE), ("current", CURRENT)):
        use(impl, grids)
        outs[name] = []
        for g, x in zip(grids, xs):
            y = g(x)
            outs[name].append((y.detach(), *torch.autograd.grad(y.square().sum(), [x, g.params])))
    for a, b in zip(outs["baseline"], outs["current"]):
        assert torch.equal(a[0], b[0]), "forward values differ"
        for ga, gb in zip(a[1:], b[1:]):
            err = float((ga - gb).norm() / gb.norm().clamp_min(1e-30))
            assert err < 1e-5, f"gradients differ: {err:.2e}"

    times = {"grids": {"baseline": [], "current": []}, "step": {"baseline": [], "current": []}}
    for r in range(args.rounds + 1):
        for name, impl in (("baseline", BASE), ("current", CURRENT)):
            use(impl, grids)
            t0 = time.perf_counter()
            for _ in range(5):
                grid_round(grids, xs)
            if r:  # the first round warms up
                times["grids"][name].append((time.perf_counter() - t0) / 5 * 1000)

    step_note = "skipped (no tennis clip)"
    if (args.tennis / "video_frames").is_dir():
        from backend.clip import load_clip
        from backend.preprocess.flow import compute_flow
        from backend.train import Trainer
        clip = load_clip(args.tennis, long_edge=256)
        tr = Trainer(clip, compute_flow(clip), cfg.replace(train={"iterations": 10 ** 6, "device": "cpu"}),
                     torch.device("cpu"))
        tr.pretrain()
        tr.train(iterations=5)
        model_grids = [m for m in tr.model.modules() if isinstance(m, HG.TorchHashGrid)]
        for r in range(args.rounds + 1):
            for name, impl in (("baseline", BASE), ("current", CURRENT)):
                use(impl, model_grids)
                it = tr.state.iteration
                t0 = time.perf_counter()
                tr.train(iterations=it + args.steps)
                if r:
                    times["step"][name].append((time.perf_counter() - t0) / args.steps * 1000)
        step_note = f"tennis at {clip.width}x{clip.height}, iterations 5-{tr.state.iteration}"
    use(CURRENT, grids)
    device = f"{cpu_model()} ({os.cpu_count()} logical cores), torch {torch.__version__}, {args.threads} threads"
    print(f"device: {device}; baseline {args.baseline_rev}; medians of {args.rounds} alternating rounds; "
          "forward equal, gradients within 1e-5")
    result = {"bench": "cpu_grid", "device": device, "baseline_rev": args.baseline_rev, "times_ms": times,
              "step": step_note}
    for part, label in (("grids", "grids fwd+bwd (2D + 3D, 16k points each)"), ("step", "cpu preset step")):
        if times[part]["current"]:
            b, c = (statistics.median(times[part][k]) for k in ("baseline", "current"))
            print(f"  {label:42} baseline {b:7.1f} ms  current {c:7.1f} ms  ratio {b / c:.2f}x")
            result[f"{part}_ratio"] = b / c
    if not times["step"]["current"]:
        print(f"  cpu preset step: {step_note}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
