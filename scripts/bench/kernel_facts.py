#!/usr/bin/env python3
"""Shared memory, registers and spills of the fused MLP kernels, compiled ahead of time for a GPU
architecture on a machine without one (Triton's compiler and the ptxas/cuobjdump it ships).

    python scripts/bench/kernel_facts.py [--arch 90] [--check] [--sweep]

Prints one JSON line per (kernel, network, launch shape): ``shared`` (bytes of shared memory a
block needs; Hopper allows 232,448 = 227 KB), ``regs`` and ``stack`` (bytes of spill stack per
thread). ``--check``: exit 1 when the default launch shapes (``KernelOptions()``) need more
shared memory than the architecture has, so a GPU run cannot hit OutOfResources with them.
``--sweep``: also the backward shapes of ``scripts/bench/mlp_kernels.py --sweep``.
Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

SHARED_LIMIT = {90: 232_448, 100: 232_448, 80: 166_912, 89: 101_376, 86: 101_376}
# in, width, out, n_mid: texture/residual, alpha (the fast preset's 64-wide networks)
NETWORKS = {"texture": (32, 64, 3, 2), "alpha": (32, 64, 1, 2)}


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.cubin"
        p.write_bytes(cubin)
        try:
            r = subprocess.run([str(tool), "--dump-resource-usage", str(p)], capture_output=True, text=True)
        except OSError:
            return None, None
    m = re.search(r"REG:(\d+) STACK:(\d+)", r.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def facts(direction: str, net: tuple, opts, arch: int = 90, prec: str | None = None) -> dict:
    """Compiled facts of one kernel; ``prec``: a tf32_mode (default: the options'), or "ieee"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from backend.model import fused_mlp as fm
    k0, wid, no, nmid = net
    consts = dict(K0=k0, K0P=fm._p2(k0), WID=wid, NO=no, NOP=fm._p2(no), NMID=nmid,
                  **fm.launch_precision(prec or opts.tf32_mode))
    ptrs = "X W0 B0 WM BMID WO BO".split()
    if direction == "bwd":
        kernel, block, warps, stages = fm._mlp_bwd_kernel, opts.bwd_block, opts.bwd_warps, opts.bwd_stages
        ptrs += "GY GX".split()
        sig = {n: "*fp32" for n in ptrs}
        sig.update(n="i32", sx="i32", n_blocks="i32")
        sig.update({n: "*fp32" for n in "PW0 PB0 PWM PBM PWO PBO".split()})
        consts.update(NEED_DX=True, HOIST=bool(opts.bwd_hoist))
    else:
        kernel, block, warps, stages = fm._mlp_fwd_kernel, opts.fwd_block, opts.fwd_warps, opts.fwd_stages
        sig = {n: "*fp32" for n in ptrs + ["Y"]}
        sig.update(n="i32", sx="i32")
    consts["BLOCK"] = block
    sig.update({c: "constexpr" for c in consts})
    options = {"num_warps": warps, **({"num_stages": stages} if stages else {})}
    c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", arch, 32), options=options)
    regs, stack = _resources(c.asm["cubin"])
    return {"kernel": direction, "block": block, "warps": warps, "stages": stages or "default",
            "hoist": bool(opts.bwd_hoist) if direction == "bwd" else None,
            "shared": int(c.metadata.shared), "regs": regs, "stack": stack,
            "fits": int(c.metadata.shared) <= SHARED_LIMIT.get(arch, 232_448)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--check", action="store_true", help="exit 1 if a default shape does not fit")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this compiles the kernels", file=sys.stderr)
        return 2
    import triton

    from backend.model import fused_mlp as fm
    shapes = [("default", fm.KernelOptions())]
    if args.sweep:
        from mlp_kernels import SWEEP
        shapes += [(json.dumps(kw), replace(fm.KernelOptions(), **kw)) for kw in SWEEP[1:]]
    rows, bad = [], []
    for label, opts in shapes:
        for name, net in ((k, NETWORKS[k]) for k in args.networks):
            for direction in (("fwd", "bwd") if label == "default" else ("bwd",)):
                r = {"options": label, "network": name, "triton": triton.__version__, "arch": args.arch,
                     **facts(direction, net, opts, args.arch)}
                rows.append(r)
                print(json.dumps(r), flush=True)
                if label == "default" and not r["fits"]:
                    bad.append(r)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.check and bad:
        print(f"default launch shapes exceed sm_{args.arch}'s shared memory: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
