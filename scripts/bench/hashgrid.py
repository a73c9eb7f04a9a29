"""Hash-grid encoding benchmark: Triton kernels vs the PyTorch reference (and tinycudann).

    python scripts/bench/hashgrid.py                 # 2D and 3D, 2^14 .. 2^22 points
    python scripts/bench/hashgrid.py --sweep         # also time kernel variants at 2^20
    python scripts/bench/hashgrid.py --json out.json --log2 16 20

Three operations per size: ``fwd`` (no grad), ``fwd+bwd`` (table gradient only) and
``fwd+bwd+dx`` (table and input gradients). Timing: CUDA events around each call, median
of repeated calls after warm-up, three input sets in rotation (the 3.6 MB table stays in
L2 as it would in training; the inputs do not at large sizes). The reference is timed up
to ``--ref-max-log2`` points (it is slow and memory-hungry); the speed-up is against it,
measured in the same run. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backend.config import GridConfig  # noqa: E402
from backend.encodings import TorchHashGrid  # noqa: E402

OPS = ("fwd", "fwd+bwd", "fwd+bwd+dx")
DEVICE = "cuda"  # --device cpu (with TRITON_INTERPRET=1) only smoke-tests this script


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, n_inputs: int, budget_ms: float = 400.0, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median milliseconds of fn(i) over calls, rotating i over the input sets."""
    fn(0)
    fn(1 % n_inputs)
    _sync()
    if DEVICE != "cuda":
        times = []
        for i in range(min_reps):
            t0 = time.perf_counter()
            fn(i % n_inputs)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    start = [torch.cuda.Event(enable_timing=True) for _ in range(max_reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(max_reps)]
    t0 = time.perf_counter()
    start[0].record()
    fn(2 % n_inputs)
    end[0].record()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    reps = int(min(max_reps, max(min_reps, budget_ms / max(first, 1e-3))))
    for i in range(1, reps):
        start[i].record()
        fn(i % n_inputs)
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start[:reps], end[:reps]))


def make_op(enc, op: str, xs, gs):
    params = enc.params

    if op == "fwd":
        def run(i):
            with torch.no_grad():
                enc(xs[i])
    elif op == "fwd+bwd":
        def run(i):
            params.grad = None
            enc(xs[i]).backward(gs[i])
    else:
        xg = [x.clone().requires_grad_(True) for x in xs]

        def run(i):
            params.grad = None
            xg[i].grad = None
            enc(xg[i]).backward(gs[i])
    return run


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus written."""
    if DEVICE != "cuda":
        return float("nan")
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = time_ms(lambda i: b.copy_(a), 1, budget_ms=200)
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def encoders(D: int, cfg: GridConfig, options=None):
    from backend.encodings.triton_hashgrid import TritonHashGrid

    ref = TorchHashGrid(D, cfg).to(DEVICE)
    with torch.no_grad():
        ref.params.normal_(0, 0.1)
    out = {"torch": ref, "triton": TritonHashGrid(D, cfg, options=options).to(DEVICE)}
    try:
        from backend.encodings.tcnn_grid import TcnnHashGrid
        out["tcnn"] = TcnnHashGrid(D, cfg).to(DEVICE)
    except Exception:  # tinycudann absent (the usual case)
        pass
    for name, enc in out.items():
        if name != "torch":
            with torch.no_grad():
                enc.params.copy_(ref.params)
    return out


def inputs(B: int, D: int, L: int, n: int = 3):
    xs = [torch.rand(B, D, device=DEVICE) for _ in range(n)]
    gs = [torch.randn(B, L, device=DEVICE) for _ in range(n)]
    return xs, gs


def sweep(dims, log2: int, log) -> dict:
    """Forward variants (timed on fwd) and backward variants (timed on fwd+bwd+dx)."""
    from backend.encodings.triton_hashgrid import TritonHashGrid, with_options

    fwd_variants = {
        "points b256 w4": dict(fwd_mode="points"),
        "level-slow b256 w4": dict(fwd_mode="level-slow"),
        "level-slow b128 w4": dict(fwd_mode="level-slow", fwd_block=128),
        "level-slow b512 w4": dict(fwd_mode="level-slow", fwd_block=512),
        "level-slow b256 w8": dict(fwd_mode="level-slow", fwd_warps=8),
        "level-slow-direct b256 w4": dict(fwd_mode="level-slow-direct"),
    }
    bwd_variants = {  # forward: the default (level-slow at this size)
        "points b256 w4": dict(bwd_replicas=0),
        "points b256 w4 rep32": dict(bwd_replicas=32),
        "points b256 w4 pair": dict(bwd_replicas=0, bwd_pair=True),
        "points b256 w4 pair rep32": dict(bwd_replicas=32, bwd_pair=True),
        "points b256 w4 pair rep64": dict(bwd_replicas=64, bwd_pair=True),
        "points b256 w4 pair rep32 priv32k": dict(bwd_replicas=32, bwd_pair=True, bwd_priv_max=32768),
        "points b128 w4 pair rep32": dict(bwd_block=128, bwd_replicas=32, bwd_pair=True),
    }
    cfg = GridConfig()
    B = 1 << log2
    res = {}
    for D in dims:
        xs, gs = inputs(B, D, cfg.n_levels * cfg.n_features_per_level)
        for kind, variants, op in (("fwd", fwd_variants, "fwd"), ("bwd", bwd_variants, "fwd+bwd+dx")):
            for name, kw in variants.items():
                opts = with_options(**kw)
                try:
                    enc = TritonHashGrid(D, cfg, options=opts).to(DEVICE)
                    t0 = time.perf_counter()
                    make_op(enc, op, xs, gs)(0)
                    _sync()
                    compile_s = time.perf_counter() - t0
                    ms = time_ms(make_op(enc, op, xs, gs), len(xs))
                except Exception as exc:  # a variant that fails to compile is reported, not fatal
                    log(f"sweep D={D} {kind} {name}: FAILED {type(exc).__name__}: {exc}")
                    continue
                res[f"{D}D {kind} {name}"] = dict(D=D, kind=kind, variant=name, options=asdict(opts),
                                                  ms=ms, mpts=B / ms / 1e3, compile_s=compile_s)
                log(f"sweep D={D} {kind:3s} {name:24s} {op:11s} {ms:8.3f} ms  {B / ms / 1e3:8.1f} Mpt/s"
                    f"  (first call {compile_s:.1f} s)")
    return res


def kernel_report(D: int, out_dir: Path | None, log) -> None:
    """Registers, spills and the memory instructions of the default kernels (PTX)."""
    import re

    from backend.encodings import triton_hashgrid as th

    cfg = GridConfig()
    enc = th.TritonHashGrid(D, cfg).to(DEVICE)
    x = torch.rand(4096, D, device=DEVICE, requires_grad=True)
    enc(x).sum().backward()
    _sync()
    for name, k in th._LAST_KERNELS.items():
        if k is None:
            continue
        ptx = k.asm.get("ptx", "")
        counts = {pat: len(re.findall(pat, ptx)) for pat in
                  (r"ld\.global[^;]*\.v2\.", r"ld\.global(?![^;]*\.v\d)",
                   r"(?:atom|red)\.[^;]*\.v2\.f32", r"(?:atom|red)\.[^;]*add[^;]*f32", r"st\.global[^;]*\.v2\.",
                   r"rem\.u32", r"cvt\.rzi\.s64\.f32|cvt\.rmi", r"fma\.rn\.f32", r"bar\.sync")}
        log(f"{D}D {name}: {k.n_regs} registers, {k.n_spills} spills, "
            f"shared {k.metadata.shared} B; PTX " + ", ".join(f"{p}: {c}" for p, c in counts.items()))
        if out_dir is not None:
            (out_dir / f"{name}{D}d.ptx").write_text(ptx)


def overhead_report(D: int, log2: int, log) -> dict:
    """Where the time goes at a small batch: autograd, direct calls, host submission."""
    from backend.encodings import triton_hashgrid as th

    cfg = GridConfig()
    B = 1 << log2
    enc = th.TritonHashGrid(D, cfg).to(DEVICE)
    xs, gs = inputs(B, D, cfg.n_levels * cfg.n_features_per_level)
    plan, opts, table = enc.plan(), enc.options, enc.params.detach()
    res = {"autograd fwd+bwd+dx": time_ms(make_op(enc, "fwd+bwd+dx", xs, gs), len(xs))}

    def direct(i):
        th._forward(xs[i], table, plan, opts)
        th._backward(xs[i], table, gs[i], plan, opts, True, True)

    def fwd_only(i):
        th._forward(xs[i], table, plan, opts)

    res["direct fwd+bwd+dx"] = time_ms(direct, len(xs))
    res["direct fwd"] = time_ms(fwd_only, len(xs))
    for name, fn in (("host submit fwd+bwd+dx (autograd)", make_op(enc, "fwd+bwd+dx", xs, gs)),
                     ("host submit direct fwd+bwd+dx", direct)):
        _sync()
        t0 = time.perf_counter()
        for i in range(50):
            fn(i % len(xs))
        res[name] = (time.perf_counter() - t0) * 1e3 / 50
        _sync()
    # GPU time alone: replay a CUDA graph of the direct calls
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            direct(0)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            direct(0)
        res["graph replay fwd+bwd+dx"] = time_ms(lambda i: g.replay(), 1)
    except Exception as exc:
        log(f"graph capture failed: {type(exc).__name__}: {exc}")
    log(f"overhead {D}D 2^{log2}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items()))
    return res


def best_options(sweep_res: dict, D: int):
    from backend.encodings.triton_hashgrid import KernelOptions

    def best(kind):
        rows = [r for r in sweep_res.values() if r["D"] == D and r["kind"] == kind]
        return min(rows, key=lambda r: r["ms"])["options"] if rows else None

    f, b = best("fwd"), best("bwd")
    if f is None or b is None:
        return None
    kw = {k: v for k, v in f.items() if k.startswith("fwd")}
    kw.update({k: v for k, v in b.items() if k.startswith("bwd")})
    return KernelOptions(**kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--log2", type=int, nargs="+", default=[14, 16, 18, 20, 22])
    ap.add_argument("--ref-max-log2", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="time kernel variants at --sweep-log2 first")
    ap.add_argument("--sweep-log2", type=int, default=20)
    ap.add_argument("--use-best", action="store_true", help="run the table with the sweep's fastest variants")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--asm-dir", type=Path, default=None, help="write the default kernels' PTX here")
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("hashgrid bench: CUDA is not available; nothing to time")
        return 0
    import triton

    logf = args.log.open("w") if args.log else None

    def log(msg: str) -> None:
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter smoke test)"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 0
    bw = copy_bandwidth()
    log(f"card: {card}, {sms} SMs; torch {torch.__version__}, triton {triton.__version__}; "
        f"copy {bw:.0f} GB/s (read+write)")
    results = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "copy_GBps": bw,
               "rows": [], "sweep": {}}
    if DEVICE == "cuda":
        for D in args.dims:
            try:
                kernel_report(D, args.asm_dir, log)
            except Exception as exc:
                log(f"kernel report failed: {type(exc).__name__}: {exc}")
    if DEVICE == "cuda":
        results["overhead"] = {}
        for D in args.dims:
            for lg in (14, 20):
                try:
                    results["overhead"][f"{D}D 2^{lg}"] = overhead_report(D, lg, log)
                except Exception as exc:
                    log(f"overhead report failed: {type(exc).__name__}: {exc}")
    if args.sweep:
        results["sweep"] = sweep(args.dims, args.sweep_log2, log)
    cfg = GridConfig()
    L = cfg.n_levels * cfg.n_features_per_level
    for D in args.dims:
        opts = best_options(results["sweep"], D) if args.use_best else None
        if opts is not None:
            log(f"{D}D table uses the sweep's fastest variants: {opts}")
        encs = encoders(D, cfg, opts)
        for lg in args.log2:
            B = 1 << lg
            xs, gs = inputs(B, D, L)
            # sanity: same function as the reference
            if lg <= args.ref_max_log2:
                with torch.no_grad():
                    a, b = encs["triton"](xs[0]), encs["torch"](xs[0])
                    err = ((a - b).norm() / b.norm()).item()
                if not err < 1e-5:
                    log(f"MISMATCH D={D} B={B}: rel err {err:.2e}")
            for op in OPS:
                row = dict(D=D, log2=lg, points=B, op=op)
                for name, enc in encs.items():
                    if name == "torch" and lg > args.ref_max_log2:
                        continue
                    row[name] = time_ms(make_op(enc, op, xs, gs), len(xs),
                                        budget_ms=300 if name != "torch" else 100,
                                        min_reps=3 if name != "torch" else 2)
                if "torch" in row:
                    row["speedup"] = row["torch"] / row["triton"]
                row["triton_Mpts"] = B / row["triton"] / 1e3
                results["rows"].append(row)
                log(f"{D}D 2^{lg:<2d} {op:11s} torch {row.get('torch', float('nan')):9.3f} ms  "
                    f"triton {row['triton']:8.3f} ms  {row['triton_Mpts']:8.1f} Mpt/s  "
                    f"x{row.get('speedup', float('nan')):7.1f}"
                    + (f"  tcnn {row['tcnn']:8.3f} ms" if "tcnn" in row else ""))
            del xs, gs
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    # short table last
    has_tcnn = any("tcnn" in r for r in results["rows"])
    print(f"\n## Hash-grid encoding, {card} (16 levels, F=2, 2^15 entries, scale 1.25)\n")
    print("| grid | points | op | torch ms | triton ms | triton Mpt/s | speed-up |" + (" tcnn ms |" if has_tcnn else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if has_tcnn else ""))
    for r in results["rows"]:
        t = f"{r['torch']:.3f}" if "torch" in r else "-"
        s = f"{r['speedup']:.0f}x" if "speedup" in r else "-"
        print(f"| {r['D']}D | 2^{r['log2']} | {r['op']} | {t} | {r['triton']:.3f} | {r['triton_Mpts']:.0f} | {s} |"
              + (f" {r['tcnn']:.3f} |" if has_tcnn else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
