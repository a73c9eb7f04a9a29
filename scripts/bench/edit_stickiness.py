#!/usr/bin/env python3
"""Edit stickiness against a reference flow: painted dots, tracked through the rendered edit.

    # decompose the clip with each preset here (NAME:N overrides the iterations), then measure
    python scripts/bench/edit_stickiness.py --clip ../shared/data/tennis \\
        --presets seed:20000,fast --device cuda --out /tmp/stick --json stick.json
    # or measure finished decompositions (LABEL=DIR, or DIR labelled by its folder name)
    python scripts/bench/edit_stickiness.py seed=/tmp/a fast=/tmp/b --flow ../shared/data/tennis/reference_flow_forward_raft.npz

For every decomposition and layer, a grid of small dots (radius ``--radius-px`` screen pixels,
``--spacing-px`` apart, a saturated magenta) is painted on the layer's atlas where the atlas
says the layer is seen, the edit is rendered through the engine's edit path
(``backend.edit.EditRenderer``, delta mode) beside the same frames without it, and each dot is
found in every frame from the difference (identified through the bake's uv maps). For each dot
whole in frames t and t+1 its displacement is compared with the reference flow at its position
in frame t (end-point error), and over ``--chain`` frames the reference flow integrated from
its position in frame t with its position in frame t + chain. Errors are in the reference
flow's pixels (positions are scaled from the working size). Method: backend/synthetic/stickiness.py;
docs/benchmarks.md, "Edit stickiness against the reference flow".

Prints a table with ratios against the baseline row (``--baseline``, default the first
decomposition of preset ``seed``) measured in the same run, names the device, and writes
everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from backend.synthetic.stickiness import measure_layer  # noqa: E402
from backend.hostinfo import cpu_model as cpu_name  # noqa: E402


def parse_presets(text: str) -> list[tuple[str, str, int | None]]:
    """``seed:20000,fast`` -> [(label, preset, iterations or None)]; labels are unique."""
    out, seen = [], set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, n = item.partition(":")
        label = f"{name}:{n}" if n else name
        label = label if label not in seen else f"{label}-{len(out)}"
        seen.add(label)
        out.append((label, name, int(n) if n else None))
    return out


def decompose(clip: Path, out: Path, preset: str, iterations: int | None, args) -> tuple[Path, float]:
    """Run ``python -m backend decompose`` (the product's CLI) for one preset; its wall time."""
    cmd = [sys.executable, "-m", "backend", "decompose", str(clip), "--preset", preset, "--out", str(out),
           "--quiet", "--no-resume"]
    if iterations is not None:
        cmd += ["--iterations", str(iterations)]
    if args.device:
        cmd += ["--device", args.device]
    if args.long_edge:
        cmd += ["--long-edge", str(args.long_edge)]
    if args.frames:
        cmd += ["--frames", args.frames]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out, time.perf_counter() - t0


def load_flow(path: Path) -> np.ndarray:
    with np.load(path) as data:
        flow = data["flow"]
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise SystemExit(f"{path}: expected an array 'flow' (pairs, H, W, 2), got {flow.shape}")
    return flow.astype(np.float32)


def fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def ratio(a, b):
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or b == 0:
        return None
    return a / b


def no_nan(v):
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: no_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [no_nan(x) for x in v]
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", help="finished decompositions, LABEL=DIR or DIR")
    ap.add_argument("--clip", type=Path, help="decompose this clip with --presets first (seed layout folder)")
    ap.add_argument("--presets", default="seed:20000,fast", help="NAME[:ITERATIONS],... (with --clip)")
    ap.add_argument("--device", help="decompose on this device (auto | cpu | cuda)")
    ap.add_argument("--long-edge", type=int, help="working size override for every decomposition")
    ap.add_argument("--iterations", type=int, help="iterations of every preset given without :N")
    ap.add_argument("--frames", metavar="A:B", help="decompose only this frame range of the clip (quick checks)")
    ap.add_argument("--out", type=Path, help="folder for the decompositions (with --clip)")
    ap.add_argument("--flow", type=Path, help="reference flow npz (default CLIP/reference_flow_forward_raft.npz)")
    ap.add_argument("--layers", help="comma-separated layer indices (default: all)")
    ap.add_argument("--spacing-px", type=float, default=16.0, help="dot grid spacing, screen pixels")
    ap.add_argument("--radius-px", type=float, default=1.5, help="dot radius, screen pixels")
    ap.add_argument("--min-alpha", type=float, default=0.9, help="a dot counts where its layer's alpha is >= this")
    ap.add_argument("--chain", type=int, default=10, help="frames of the chained error")
    ap.add_argument("--render-device", default="cpu",
                    help="device of the edit renders (cpu: float frames; cuda uses the fused 8-bit path)")
    ap.add_argument("--baseline", help="label of the baseline row (default: the first seed decomposition)")
    ap.add_argument("--json", type=Path, help="write the results here (default OUT/edit_stickiness.json)")
    args = ap.parse_args()

    runs: list[dict] = []
    for spec in args.dirs:
        label, _, d = spec.rpartition("=")
        runs.append({"label": label or Path(d).name, "dir": Path(d)})
    if args.clip is not None:
        if args.out is None:
            ap.error("--clip needs --out (where the decompositions go)")
        for label, name, n in parse_presets(args.presets):
            n = n if n is not None else args.iterations
            d, wall = decompose(args.clip, args.out / label.replace(":", "_"), name, n, args)
            runs.append({"label": label, "dir": d, "decompose_wall_s": round(wall, 1)})
    if not runs:
        ap.error("give decomposition folders or --clip with --presets")
    flow_path = args.flow or (args.clip / "reference_flow_forward_raft.npz" if args.clip else None)
    if flow_path is None or not flow_path.is_file():
        sys.exit(f"reference flow not found: {flow_path} (give --flow)")
    flow = load_flow(flow_path)

    rows = []
    for run in runs:
        rep = json.loads((run["dir"] / "report.json").read_text(encoding="utf-8"))
        run.update({"preset": rep.get("config", {}).get("preset"), "iterations": rep.get("iterations"),
                    "device": rep.get("device"), "psnr": rep.get("psnr"), "train_seconds": rep.get("seconds"),
                    "working_size": [rep["clip"]["width"], rep["clip"]["height"]]})
        layers = ([int(v) for v in args.layers.split(",")] if args.layers
                  else [l["index"] for l in rep["layers"]])
        run["layers"] = []
        for i in layers:
            t0 = time.perf_counter()
            m = measure_layer(run["dir"], i, flow, spacing_px=args.spacing_px, radius_px=args.radius_px,
                              min_alpha=args.min_alpha, chain=args.chain, device=args.render_device)
            m["measure_seconds"] = round(time.perf_counter() - t0, 1)
            run["layers"].append(m)
            rows.append((run, m))
            print(f"[{run['label']}] layer {i} ({m['name']}): {m['dots']} dots, {m['pairs']} pairs, "
                  f"EPE {fmt(m['epe_mean_px'])} px, {args.chain}-chain {fmt(m['chain_epe_mean_px'])} px "
                  f"({m['measure_seconds']} s)", flush=True)

    base_label = args.baseline or next((r["label"] for r in runs if r["preset"] == "seed"), runs[0]["label"])
    base = {m["name"]: m for r, m in rows if r["label"] == base_label}
    devices = sorted({str(r["device"]) for r in runs})
    print(f"\ndecomposed on: {', '.join(devices)}; edits rendered on {args.render_device} ({cpu_name()})")
    print(f"reference flow: {flow_path} {flow.shape[2]}x{flow.shape[1]}; errors in its pixels; "
          f"baseline: {base_label}")
    head = (f"{'run':14s} {'layer':11s} {'iters':>6s} {'size':>8s} {'dots':>5s} {'pairs':>6s} {'EPE mean':>8s} "
            f"{'median':>7s} {'x base':>7s} {f'{args.chain}-chain':>9s} {'median':>7s} {'x base':>7s} {'chains':>6s}")
    print(head)
    for run, m in rows:
        b = base.get(m["name"])
        r1 = ratio(m["epe_mean_px"], b["epe_mean_px"]) if b else None
        rc = ratio(m["chain_epe_mean_px"], b["chain_epe_mean_px"]) if b else None
        m["ratio_epe_vs_baseline"], m["ratio_chain_vs_baseline"] = r1, rc
        size = "x".join(str(v) for v in run["working_size"])
        print(f"{run['label']:14s} {m['name']:11s} {fmt(run['iterations'], 'd'):>6s} {size:>8s} "
              f"{m['dots_tracked']:5d} {m['pairs']:6d} {fmt(m['epe_mean_px']):>8s} {fmt(m['epe_median_px']):>7s} "
              f"{fmt(r1, '.2f'):>7s} {fmt(m['chain_epe_mean_px']):>9s} {fmt(m['chain_epe_median_px']):>7s} "
              f"{fmt(rc, '.2f'):>7s} {m['chains']:6d}")
    print("EPE: per-frame end-point error of the dots' motion against the reference flow (mean, median);")
    print(f"{args.chain}-chain: the reference flow integrated over {args.chain} frames against the dot's position;")
    print("x base: ratio of the mean to the baseline's (lower is better); dots: dots found in >= 1 frame.")

    out_json = args.json or (args.out / "edit_stickiness.json" if args.out else None)
    if out_json is not None:
        result = {"devices": devices, "render_device": args.render_device, "cpu": cpu_name(),
                  "flow": str(flow_path), "flow_size": [int(flow.shape[2]), int(flow.shape[1])],
                  "baseline": base_label,
                  "settings": {"spacing_px": args.spacing_px, "radius_px": args.radius_px,
                               "min_alpha": args.min_alpha, "chain": args.chain},
                  "runs": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in runs]}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(no_nan(result), indent=1), encoding="utf-8")
        print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
