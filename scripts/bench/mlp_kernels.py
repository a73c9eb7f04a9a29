#!/usr/bin/env python3
"""Forward + backward of each network's MLP, per ``model.mlp_backend``, in one run on one device.

    python scripts/bench/mlp_kernels.py [--batch 40000] [--fp32] [--json OUT.json]

The four MLPs of the ``fast`` preset at the sizes a training step evaluates them (tennis, 2
layers, 40k batch): the mapping (3 -> 4 x 256 -> 2, tanh) at 9 query groups, texture and
residual (32 -> 4 x 64 -> 3) at 3 groups, alpha (32 -> 4 x 64 -> 1) at 5 groups. Each case is
captured in a CUDA graph (as the trainer replays its step): forward, then the gradients of the
weights and, where a hash grid sits in front, of the input. Time: median over replays (CUDA
events). Printed against ``torch`` (the baseline of the ratio), with the achieved TFLOP/s
(2 flops per multiply-add, forward + 2x backward) and the relative difference of the outputs
and gradients from the torch run. TF32 products unless ``--fp32`` (the preset uses TF32).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from backend.export.outputs import device_name  # noqa: E402
from backend.model.mlp_backend import MLP  # noqa: E402

# name, in, out, width, layers, activation, query groups, input gradient
NETS = (("mapping", 3, 2, 256, 4, "tanh", 9, False),
        ("texture", 32, 3, 64, 4, "tanh01", 3, True),
        ("residual", 32, 3, 64, 4, "softplus", 3, True),
        ("alpha", 32, 1, 64, 4, "tanh01", 5, True))


def flops(n: int, i: int, o: int, w: int, layers: int) -> float:
    macs = i * w + (layers - 2) * w * w + w * o
    return 2.0 * macs * n * 3.0  # forward + backward (input and weight gradients)


def graph_time(fn, reps: int = 30, inner: int = 5) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / inner)
    ts.sort()
    return ts[len(ts) // 2], out


# backward launch shapes; each fits sm_90's 227 KB of shared memory with Triton 3.6
# (scripts/bench/kernel_facts.py; the 3-stage block-64 shape that needed 320 KB is not here).
# Block 64 with 8 warps and one stage fits (64 KB) but hit an illegal memory access on the H200
# (fused-2, 2026-12-02; unexplained), which poisons the process's CUDA context: left out.
SWEEP = (dict(),  # the defaults: block 16, 4 warps, one stage
         dict(bwd_block=32, bwd_stages=0),  # 204 KB, fused-1's working shape
         dict(bwd_block=32, bwd_stages=1),
         dict(bwd_block=32, bwd_warps=8, bwd_stages=1),
         dict(bwd_hoist=True),
         dict(bwd_programs_per_sm=2), dict(bwd_programs_per_sm=8))


def run_sweep(args, dev) -> list[dict]:
    """The texture network through the fused kernels at other launch shapes (forward + backward)."""
    from backend.model import fused_mlp as fm
    n = args.batch * 3
    torch.manual_seed(0)
    net = MLP(32, 3, 64, 4, "tanh01").to(dev)
    net.backend = "triton"
    x = (torch.rand(n, 32, device=dev) * 2 - 1).requires_grad_(True)
    gy = torch.randn(n, 3, device=dev)
    targets = [x] + list(net.parameters())
    def torch_fwd():
        with torch.no_grad():
            return net(x)
    out = [{"options": "torch forward (reference)", "fwd_ms": round(graph_time(torch_fwd)[0], 4)}]
    print("sweep", json.dumps(out[-1]), flush=True)
    for kw in SWEEP:
        old = fm.set_options(**kw)
        try:
            def step():
                y = net(x)
                return (y, *torch.autograd.grad(y, targets, gy))
            ms, _ = graph_time(step)

            def fwd():
                with torch.no_grad():
                    return fm.fused_mlp(x, [m.weight for m in net.linears], [m.bias for m in net.linears])
            fwd_ms, _ = graph_time(fwd)
            fell = dict(fm.FALLBACK)
            fm.reset_fallback()
            if fell:
                raise RuntimeError(f"fell back: {fell}")
            out.append({"options": kw, "ms": round(ms, 4), "fwd_ms": round(fwd_ms, 4),
                        "kernels": dict(fm.LAST_LAUNCH)})
        except Exception as exc:
            out.append({"options": kw, "error": f"{type(exc).__name__}: {exc}"[:200]})
        finally:
            fm.set_options(**old.__dict__)
        print("sweep", json.dumps(out[-1]), flush=True)
    return out


def best_options(sweep: list[dict]) -> dict:
    """The fastest launch shape of the sweep (forward + backward), as set_options keywords."""
    from backend.model import fused_mlp as fm
    ok = [r for r in sweep if "ms" in r and isinstance(r["options"], dict)]
    if not ok:
        return {}
    best = min(ok, key=lambda r: r["ms"])["options"]
    return {**{k: v for k, v in fm.OPTIONS.__dict__.items()}, **best}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=40_000)
    ap.add_argument("--backends", nargs="+", default=["torch", "compile", "triton"])
    ap.add_argument("--fp32", action="store_true", help="IEEE fp32 products instead of TF32")
    ap.add_argument("--sweep", action="store_true",
                    help="also time alternative launch shapes of the fused kernels (texture network)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = not args.fp32
    print(f"device: {device_name(dev)}; torch {torch.__version__}; "
          f"{'fp32' if args.fp32 else 'TF32'} products; batch {args.batch}", flush=True)
    rows = []
    for name, i, o, w, layers, act, groups, need_dx in NETS:
        n = args.batch * groups
        torch.manual_seed(0)
        net = MLP(i, o, w, layers, act).to(dev)
        x = (torch.rand(n, i, device=dev) * 2 - 1).requires_grad_(need_dx)
        gy = torch.randn(n, o, device=dev)
        params = list(net.parameters())
        targets = ([x] if need_dx else []) + params
        ref = None
        base = None
        for backend in args.backends:
            net.backend = backend
            path = net.path(x)
            row = {"net": name, "points": n, "backend": backend, "path": path}
            try:
                def step():
                    y = net(x)
                    return (y, *torch.autograd.grad(y, targets, gy))
                ms, out = graph_time(step)
                if path in ("triton", "chain"):
                    from backend.model import fused_mlp as fm
                    if fm.FALLBACK:
                        row["fallback"] = dict(fm.FALLBACK)
                        fm.reset_fallback()
                out = [t.detach().clone() for t in out]
                if ref is None:
                    ref = out
                diff = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(out, ref))
                base = base or ms
                row.update(ms=round(ms, 4), tflops=round(flops(n, i, o, w, layers) / ms / 1e9, 1),
                           vs_torch=round(base / ms, 2), max_rel_diff_vs_torch=float(f"{diff:.2e}"))
            except Exception as exc:  # report and go on with the other backends
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del net, x, gy
        torch.cuda.empty_cache()
    sweep = run_sweep(args, dev) if args.sweep else []
    print(f"\n{'net':9} {'points':>8} {'backend':8} {'path':8} {'ms':>8} {'TFLOP/s':>8} {'vs torch':>8} {'rel diff':>9}")
    for r in rows:
        if "ms" in r:
            print(f"{r['net']:9} {r['points']:8d} {r['backend']:8} {r['path']:8} {r['ms']:8.3f} {r['tflops']:8.1f} "
                  f"{r['vs_torch']:7.2f}x {r['max_rel_diff_vs_torch']:9.1e}")
        else:
            print(f"{r['net']:9} {r['points']:8d} {r['backend']:8} {r['path']:8} failed: {r['error'][:60]}")
    for r in sweep:
        print("sweep", json.dumps(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name(dev), "torch": torch.__version__,
                                         "tf32": not args.fp32, "batch": args.batch, "rows": rows,
                                         "sweep": sweep, "best_options": best_options(sweep)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
