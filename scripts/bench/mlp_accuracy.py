#!/usr/bin/env python3
"""Errors of each MLP path against a float64 evaluation (values, input and parameter gradients).

    python scripts/bench/mlp_accuracy.py [--points 120000] [--json OUT.json]

The texture network (32 -> 4 x 64 -> 3) and the mapping (3 -> 4 x 256 -> 2) at a step's sizes:
torch and triton (fused / chain), each with TF32 and with IEEE fp32 products, and the fused kernels
with 3xTF32 products (``tf32_mode = "tf32x3"``); per tensor the
norm-relative error against the same network evaluated in float64 (the truth for both), so a
difference between two TF32 paths can be told apart from an error of one of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from backend.export.outputs import device_name  # noqa: E402
from backend.model.mlp_backend import MLP, reference_mlp  # noqa: E402


def _grads(net, x, gy, need_dx, backend, tf32):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    net.backend = backend
    xs = x.detach().clone().requires_grad_(need_dx)
    y = net(xs)
    targets = ([xs] if need_dx else []) + list(net.parameters())
    return [y.detach(), *[g.detach() for g in torch.autograd.grad(y, targets, gy)]], net.path(xs)


def _set_tf32_mode(mode: str) -> str:
    """The fused kernels' tf32_mode for the next calls; returns the previous one (no triton: a no-op)."""
    try:
        from backend.model import fused_mlp
    except ImportError:
        return mode
    return fused_mlp.set_options(tf32_mode=mode).tf32_mode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=120_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, i, o, w, layers, act, need_dx in (("texture", 32, 3, 64, 4, "tanh01", True),
                                                 ("mapping", 3, 2, 256, 4, "tanh", False)):
        torch.manual_seed(0)
        net = MLP(i, o, w, layers, act).to(dev)
        x = torch.rand(args.points, i, device=dev) * 2 - 1
        gy = torch.randn(args.points, o, device=dev)
        params = [p.detach().double().requires_grad_() for p in net.parameters()]
        xd = x.double().requires_grad_(need_dx)
        yd = reference_mlp(xd, act, *params)
        truth = [yd.detach(), *torch.autograd.grad(yd, ([xd] if need_dx else []) + params, gy.double())]
        names = ["y"] + (["dx"] if need_dx else []) + [n for n, _ in net.named_parameters()]
        # (backend, TF32 allowed, the fused kernels' tf32_mode): "tf32x3" is three TF32 products a
        # product in the fused 64-wide kernels (the mapping's chain keeps cuBLAS either way)
        for backend, tf32, mode in (("torch", True, "tf32"), ("torch", False, "tf32"), ("triton", True, "tf32"),
                                    ("triton", True, "tf32rn"), ("triton", True, "tf32x3"), ("triton", False, "tf32")):
            old = _set_tf32_mode(mode)
            try:
                got, path = _grads(net, x, gy, need_dx, backend, tf32)
            except Exception as exc:
                rows.append({"net": name, "backend": backend, "tf32": tf32, "tf32_mode": mode,
                             "error": f"{type(exc).__name__}: {exc}"[:200]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            finally:
                _set_tf32_mode(old)
            err = {n: float(f"{float((g.double() - t).norm() / t.norm().clamp_min(1e-300)):.2e}")
                   for n, g, t in zip(names, got, truth)}
            rows.append({"net": name, "points": args.points, "backend": backend, "path": path, "tf32": tf32,
                         "tf32_mode": mode if backend == "triton" and tf32 else None,
                         "max": max(err.values()), "worst": max(err, key=err.get), "rel_err_vs_fp64": err})
            print(json.dumps(rows[-1]), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.json:
        args.json.write_text(json.dumps({"device": device_name(dev), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
