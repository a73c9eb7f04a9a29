"""Atlases fitted to their layer: ``model.uv_init = "fit"`` against the seed's initialisation.

Decomposes one clip once per variant with the same preset (``python -m backend decompose
--config``, one TOML file per variant: the preset plus ``[model] uv_init``), in one run, and
prints per variant and layer:

* the atlas coverage: the fraction of the atlas's width and height spanned by the texels the
  layer is seen in (report.json ``layers[i].coverage``, from the seen-alpha map) and its area;
* each layer's atlas size S_i and scale s_i;
* PSNR with and without the residual, training and total seconds;
* edit stickiness: dots at the atlas points seen on a pixel grid of frame f are found again in
  frame f + 1 (Newton steps on the baked uv map of f + 1 from the same pixel); the distance to
  where the clip's reference RAFT flow (``reference_flow_forward_raft.npz``, when present)
  moves that pixel, mean px per frame pair, over pixels where the layer is seen (alpha > 0.9)
  in both frames.

The ratios are against the first variant, measured in the same run on the same device.

    python3 scripts/bench/atlas_fit.py --clip data/tennis --preset fast --json $OUT/atlas_fit.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def sample(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear sample of an (H, W, C) float32 image at pixel points (n, 2) (x, y)."""
    m = xy.astype(np.float32).reshape(-1, 1, 2)
    out = cv2.remap(img, m[..., 0], m[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(xy.shape[0], -1)


def find_uv(uv_map: np.ndarray, target: np.ndarray, start: np.ndarray, steps: int = 6) -> tuple:
    """Pixel points where ``uv_map`` (H, W, 2) takes the values ``target`` (n, 2), by Newton steps
    from ``start`` (n, 2); returns (points, converged mask)."""
    p = start.astype(np.float64).copy()
    H, W = uv_map.shape[:2]
    for _ in range(steps):
        u = sample(uv_map, p)
        ux = (sample(uv_map, p + [0.5, 0]) - sample(uv_map, p - [0.5, 0]))
        uy = (sample(uv_map, p + [0, 0.5]) - sample(uv_map, p - [0, 0.5]))
        det = ux[:, 0] * uy[:, 1] - ux[:, 1] * uy[:, 0]
        r = target - u
        ok = np.abs(det) > 1e-12
        safe = np.where(ok, det, 1.0)
        dx = (uy[:, 1] * r[:, 0] - uy[:, 0] * r[:, 1]) / safe
        dy = (-ux[:, 1] * r[:, 0] + ux[:, 0] * r[:, 1]) / safe
        step = np.stack([dx, dy], -1).clip(-8, 8)
        p = p + np.where(ok[:, None], step, 0.0)
        p[:, 0] = p[:, 0].clip(0, W - 1)
        p[:, 1] = p[:, 1].clip(0, H - 1)
    u = sample(uv_map, p)
    texel = np.abs(ux).sum(-1).clip(1e-9, None)  # uv per pixel, about
    conv = np.linalg.norm(target - u, axis=-1) < 0.05 * texel
    return p, conv


def stickiness(dec: Path, layer: int, ref_flow: np.ndarray | None, stride: int = 8) -> dict | None:
    if ref_flow is None:
        return None
    uv = np.load(dec / "bake" / f"layer_{layer}_uv.npy", mmap_mode="r")
    alpha = np.load(dec / "bake" / f"layer_{layer}_alpha.npy", mmap_mode="r")
    F_, H, W = alpha.shape
    ref_flow = ref_flow[:F_ - 1]  # the decomposition's frames are the clip's first F_ (no --frames here)
    if ref_flow.shape[:3] != (F_ - 1, H, W):
        return {"note": f"reference flow {ref_flow.shape} does not match the bake {(F_, H, W)}"}
    ys, xs = np.mgrid[stride // 2:H:stride, stride // 2:W:stride]
    pts = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)
    per_frame, n_used = [], 0
    for f in range(F_ - 1):
        a0 = np.asarray(alpha[f], np.float32)
        a1 = np.asarray(alpha[f + 1], np.float32)
        vis = a0[pts[:, 1].astype(int), pts[:, 0].astype(int)] > 0.9
        fl = ref_flow[f][pts[:, 1].astype(int), pts[:, 0].astype(int)].astype(np.float64)
        dest = pts + fl
        inside = (dest[:, 0] >= 0) & (dest[:, 0] <= W - 1) & (dest[:, 1] >= 0) & (dest[:, 1] <= H - 1)
        sel = vis & inside
        if sel.sum() == 0:
            continue
        d = dest[sel]
        sel_idx = np.nonzero(sel)[0]
        keep = sample(a1[..., None], d)[:, 0] > 0.9
        if keep.sum() == 0:
            continue
        p0 = pts[sel_idx[keep]]
        target = np.asarray(uv[f], np.float32)[p0[:, 1].astype(int), p0[:, 0].astype(int)].astype(np.float64)
        found, conv = find_uv(np.ascontiguousarray(uv[f + 1], np.float32), target, p0)
        if conv.sum() == 0:
            continue
        err = np.linalg.norm(found[conv] - d[keep][conv], axis=-1)
        per_frame.append(float(err.mean()))
        n_used += int(conv.sum())
    if not per_frame:
        return {"note": "no visible points"}
    return {"mean_px": round(float(np.mean(per_frame)), 4), "median_frame_px": round(float(np.median(per_frame)), 4),
            "points": n_used, "pairs": len(per_frame)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=Path, default=ROOT / "../shared/data/tennis")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--variants", default="seed,fit", help="comma-separated model.uv_init values")
    ap.add_argument("--iterations", type=int, help="override the preset's iterations")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--extra", default="", help="more TOML lines for every variant's config")
    ap.add_argument("--work", type=Path, default=Path("/tmp/atlas_fit_bench"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    ref_path = args.clip / "reference_flow_forward_raft.npz"
    ref_flow = None
    if ref_path.is_file():
        with np.load(ref_path) as d:
            ref_flow = d["flow"].astype(np.float32)
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants.split(","):
        toml = (f'preset = "{args.preset}"\n{args.extra}\n[model]\nuv_init = "{variant}"\n'
                '[export]\nwrite_videos = false\nmaps = "none"\n')
        if args.iterations:
            toml += f"[train]\niterations = {args.iterations}\n"
        cfg_path = args.work / f"{variant}.toml"
        cfg_path.write_text(toml, encoding="utf-8")
        out = args.work / variant
        cmd = [sys.executable, "-m", "backend", "decompose", str(args.clip), "--out", str(out),
               "--config", str(cfg_path), "--device", args.device, "--no-resume", "--quiet"]
        subprocess.run(["rm", "-rf", str(out)], check=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            sys.exit(f"{variant}: decompose failed ({proc.returncode})")
        rep = json.loads((out / "report.json").read_text())
        layers = []
        for l in rep["layers"]:
            layers.append({"index": l["index"], "name": l["name"], "kind": l["kind"], "atlas_size": l["atlas_size"],
                           "uv_scale": round(float(l["uv_scale"]), 4), "coverage": l["coverage"],
                           "stickiness": stickiness(out, l["index"], ref_flow)})
        results.append({"variant": variant, "psnr": round(rep["psnr"], 3),
                        "psnr_no_residual": round(rep["psnr_no_residual"], 3),
                        "train_seconds": rep["seconds"], "pretrain_seconds": rep["pretrain_seconds"],
                        "total_seconds": rep.get("total_seconds"), "wall_seconds": round(wall, 1),
                        "atlas_sizes": rep["atlas_sizes"], "device": rep["device"], "layers": layers})
        print(json.dumps(results[-1]), flush=True)

    base = results[0]
    print(f"\ndevice: {base['device']}; clip {args.clip}; preset {args.preset}; ratios against '{base['variant']}'")
    print(f"{'variant':8s} {'layer':12s} {'S_i':>5s} {'s_i':>6s} {'width':>6s} {'height':>6s} {'area':>6s} "
          f"{'x width':>7s} {'stick px':>8s}")
    for r in results:
        for l, b in zip(r["layers"], base["layers"]):
            st = (l["stickiness"] or {}).get("mean_px")
            ratio = l["coverage"]["width"] / b["coverage"]["width"] if b["coverage"]["width"] else float("nan")
            print(f"{r['variant']:8s} {l['name']:12s} {l['atlas_size']:5d} {l['uv_scale']:6.3f} "
                  f"{l['coverage']['width']:6.3f} {l['coverage']['height']:6.3f} {l['coverage']['area']:6.3f} "
                  f"{ratio:7.2f} {st if st is not None else float('nan'):8.3f}")
    print(f"\n{'variant':8s} {'PSNR':>7s} {'no res':>7s} {'train s':>8s} {'total s':>8s} {'time x':>7s}")
    for r in results:
        print(f"{r['variant']:8s} {r['psnr']:7.2f} {r['psnr_no_residual']:7.2f} {r['train_seconds']:8.1f} "
              f"{r['total_seconds'] or float('nan'):8.1f} {r['wall_seconds'] / base['wall_seconds']:7.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"clip": str(args.clip), "preset": args.preset, "results": results},
                                        indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
