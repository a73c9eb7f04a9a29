"""The built-in demo: a synthetic shot with ground truth, decomposed, edited and measured.

1. ``make_synthetic_clip`` writes a deterministic shot (panning/zooming camera over a textured
   background, a textured object that translates, rotates and scales) with its true masks and
   true texture coordinates.
2. ``decompose`` runs the method on it (best available device).
3. A scripted edit paints a disc on each layer's atlas at the point a reference pixel maps to.
4. The edit is rendered; in every frame the mark is located and compared with where the
   ground truth puts that texture point (``edit_drift_px``), and the foreground alpha is
   compared with the true masks (``alpha_iou``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .config import Config, preset
from .edit import EditRenderer, render_edit
from .pipeline import decompose, prepare_output
from .progress import CancelToken, ProgressFn
from .clip import write_png16_rgba
from .synthetic import alpha_iou, make_synthetic_clip, mark_drift, paint_disc

MARK_COLOURS = [(1.0, 0.1, 0.9), (0.1, 1.0, 0.2), (0.1, 0.4, 1.0)]


#: Largest radius of a yardstick's mark on screen. The mark is a brush dab: 3 % of the long side at
#: the demo's 128 px (3.8 px), at most 8 px at any size. A mark of 3 % at 1080p (58 px) measures the
#: mapping's curvature across the mark, not drift: its centroid moved 1 px off the painted point in
#: the painted frame itself (docs/benchmarks.md, "Demo at 1080p").
MAX_MARK_RADIUS_PX = 8.0


def mark_radius_px(width: int, height: int) -> float:
    """On-screen radius of the yardsticks' marks for a clip of this size."""
    return min(MAX_MARK_RADIUS_PX, max(2.0, 0.03 * max(width, height)))


class NoReferencePixel(ValueError):
    """A layer has no pixel in view in the frame asked for."""


def reference_frame(scene, layer: int, bake) -> tuple[int, np.ndarray, np.ndarray, tuple[int, int]]:
    """The frame nearest the middle of the shot where ``layer`` is in view, with its baked uv and
    alpha maps and the reference pixel (at any size, layer count and object motion)."""
    F = scene.clip.n_frames
    order = sorted(range(F), key=lambda t: (abs(t - F // 2), t))
    for t in order:
        uv_map = np.asarray(bake.uv(layer)[t])
        a_map = np.asarray(bake.alpha(layer)[t], np.float32)
        try:
            return t, uv_map, a_map, reference_point(scene, layer, t, uv_map, a_map)
        except NoReferencePixel:
            continue
    raise ValueError(f"layer {layer} of the synthetic clip is never in view: nothing to measure")


def reference_point(scene, layer: int, t: int, uv_map: np.ndarray, alpha_map: np.ndarray) -> tuple[int, int]:
    """A pixel of frame t well inside ``layer`` (ground-truth visible with a margin, alpha high),
    nearest the layer's visible centroid."""
    H, W = uv_map.shape[:2]
    ys, xs = np.mgrid[0:H, 0:W]
    xy = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)
    margin = max(3.0, 0.06 * max(H, W))
    if (H, W) != (scene.clip.height, scene.clip.width):
        raise ValueError(f"the decomposition's frames are {W}x{H}, the ground truth's "
                         f"{scene.clip.width}x{scene.clip.height}: measure at the clip's own size")
    ok = scene.visible(layer, xy, t, margin=margin) & (alpha_map.ravel() > 0.9)
    if not ok.any():
        ok = scene.visible(layer, xy, t, margin=1.0)
    if not ok.any():
        ok = scene.visible(layer, xy, t, margin=0.0)
    if not ok.any():
        raise NoReferencePixel(f"layer {layer} is not visible in frame {t}")
    pts = xy[ok]
    c = pts.mean(0)
    p = pts[np.argmin(((pts - c) ** 2).sum(-1))]
    return int(p[0]), int(p[1])


def texels_per_pixel(uv_map: np.ndarray, x: int, y: int, size: int) -> float:
    """How many atlas texels one pixel step covers at (x, y): the mapping's local scale."""
    H, W = uv_map.shape[:2]
    x1, y1 = min(x + 1, W - 1), min(y + 1, H - 1)
    steps = [np.linalg.norm(uv_map[y, x1] - uv_map[y, x]) / max(x1 - x, 1),
             np.linalg.norm(uv_map[y1, x] - uv_map[y, x]) / max(y1 - y, 1)]
    return float(np.mean(steps)) * size / 2.0


def measure_layer(result_dir: Path, scene, layer: int, t_ref: int, radius_px: float,
                  colour, device: str) -> dict:
    """Paint one mark (about ``radius_px`` pixels on screen) on ``layer`` at the atlas point
    seen at a reference pixel, render, and measure where it lands in every frame."""
    from .edit import load_bake
    bake = load_bake(result_dir)
    S = int(bake.atlases[layer].shape[0])  # this layer's own atlas size S_i
    t_ref, uv_map, a_map, (x, y) = reference_frame(scene, layer, bake)
    uv0 = uv_map[y, x].astype(np.float64)
    tex0 = scene.tex_coords_at(layer, t_ref)[y, x]
    radius_texels = max(1.5, radius_px * texels_per_pixel(uv_map, x, y, S))
    # frames count where the whole mark is in view, one pixel clear of edges and occluders
    expected, visible = scene.track(layer, tex0, margin=radius_px + 1.0)
    edit = paint_disc(np.zeros((S, S, 4), np.float32), uv0, radius_texels, colour)
    r = EditRenderer(result_dir, {layer: edit}, device=device)
    original = np.stack([r.frame(f, edited=False) for f in range(r.n_frames)])
    edited = np.stack([r.frame(f) for f in range(r.n_frames)])
    d = mark_drift(original, edited, expected, visible, mark_color=colour)
    d.update({"layer": layer, "reference_frame": t_ref, "reference_pixel": [x, y],
              "reference_frame_px": d["per_frame_px"][t_ref],  # off the painted point where it was painted
              "atlas_uv": uv0.tolist(), "radius_texels": radius_texels, "radius_px": radius_px})
    return d


def measure(result_dir: str | Path, clip_dir: str | Path, device: str = "cpu") -> dict:
    """Edit drift and alpha IoU of a decomposition of a synthetic clip written by the demo."""
    from .edit import load_bake
    from .synthetic import load as load_scene
    scene = load_scene(clip_dir)
    bake = load_bake(result_dir)
    if bake.n_layers != scene.n_layers:
        raise ValueError(f"{result_dir} has {bake.n_layers} layers, the ground truth {scene.n_layers}")
    t_ref = scene.clip.n_frames // 2  # preferred; a layer out of view there uses the nearest frame
    radius_px = mark_radius_px(scene.clip.width, scene.clip.height)
    marks = [measure_layer(Path(result_dir), scene, k, t_ref, radius_px, MARK_COLOURS[k % len(MARK_COLOURS)],
                           device) for k in range(scene.n_layers)]
    fg = [np.asarray(bake.alpha(k), np.float32) for k in range(scene.n_objects)]
    iou = alpha_iou(np.max(fg, axis=0), scene.clip.masks.max(-1)) if fg else None
    return {"edit_drift_px": {**_drift_summary(marks), "per_layer": marks}, "alpha_iou": iou}


def _drift_summary(marks: list[dict]) -> dict:
    """Mean and max over the layers whose mark was measured in at least one frame (a layer seen
    too briefly or too small for its mark at this size has none); None when no layer was."""
    got = [m for m in marks if m["frames_measured"] > 0]
    return {"mean": float(np.mean([m["mean_px"] for m in got])) if got else None,
            "max": float(np.max([m["max_px"] for m in got])) if got else None,
            "layers_measured": len(got)}


# ------------------------------------------------------ painting on a frame
def paint_mark(height: int, width: int, centre_xy, radius_px: float, colour) -> np.ndarray:
    """An (H, W, 4) RGBA paint image: a disc of ``colour`` at ``centre_xy`` on a transparent frame,
    its edge anti-aliased over one pixel (coverage in the alpha)."""
    ys, xs = np.mgrid[0:height, 0:width]
    d = np.hypot(xs - centre_xy[0], ys - centre_xy[1])
    img = np.zeros((height, width, 4), np.float32)
    img[..., :3] = np.asarray(colour, np.float32)[:3]
    img[..., 3] = np.clip(radius_px - d + 0.5, 0.0, 1.0)
    return img


def measure_frame_paint(result_dir: str | Path, clip_dir: str | Path, work_dir: str | Path,
                        device: str = "cpu") -> dict:
    """Ground truth for painting on a frame: per layer, a mark painted on frame t at a pixel well
    inside the layer goes through ``paint_frame`` (layer chosen by ownership, not given), is
    rendered, and measured in every frame where the true texture coordinates put that surface
    point (``frame_paint_drift_px``); ``owner_ok``: each mark landed in its own layer only."""
    from .edit import EditRenderer, load_bake
    from .edit.paint import paint_frame
    from .synthetic import load as load_scene
    scene = load_scene(clip_dir)
    bake = load_bake(result_dir)
    t_ref = scene.clip.n_frames // 2
    H, W = scene.clip.height, scene.clip.width
    radius_px = mark_radius_px(W, H)
    marks = []
    for k in range(scene.n_layers):
        colour = MARK_COLOURS[k % len(MARK_COLOURS)]
        t_ref, uv_map, a_map, (x, y) = reference_frame(scene, k, bake)
        tex0 = scene.tex_coords_at(k, t_ref)[y, x]
        expected, visible = scene.track(k, tex0, margin=radius_px + 1.0)
        painted = paint_frame(result_dir, t_ref, paint_mark(H, W, (x, y), radius_px, colour),
                              out_edits=Path(work_dir) / f"mark_{k}")
        layers = sorted(int(i) for i in painted["layers"])
        r = EditRenderer(result_dir, {k: Path(painted["edits"][str(k)])} if str(k) in painted["edits"] else {},
                         device=device)
        original = np.stack([r.frame(f, edited=False) for f in range(r.n_frames)])
        edited = np.stack([r.frame(f) for f in range(r.n_frames)])
        d = mark_drift(original, edited, expected, visible, mark_color=colour)
        d.update({"layer": k, "painted_frame": t_ref, "painted_pixel": [x, y], "radius_px": radius_px,
                  "layers_painted": layers, "owner_ok": layers == [k]})
        marks.append(d)
    return {**_drift_summary(marks), "owner_ok": all(m["owner_ok"] for m in marks), "per_layer": marks}


def _no_nan(v):
    """NaN (a frame not measured) as null: report.json stays strict JSON."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_no_nan(x) for x in v]
    return v


def check_demo_args(width: int, height: int, n_frames: int, n_objects: int) -> None:
    """Refuse, before anything is trained, what the synthetic clip or its yardsticks cannot do."""
    from .errors import ConfigError
    if min(width, height) < 16:
        raise ConfigError(f"the demo clip must be at least 16x16 pixels, got {width}x{height}")
    if n_frames < 2:
        raise ConfigError(f"the demo clip needs at least 2 frames, got {n_frames}")
    if not 0 <= n_objects <= len(MARK_COLOURS) - 1:
        raise ConfigError(f"--objects must be 0..{len(MARK_COLOURS) - 1} (one mark colour per layer), got {n_objects}")


def run_demo(out_dir: str | Path, config: Optional[Config] = None, width: int = 128, height: int = 72,
             n_frames: int = 24, seed: int = 0, progress: Optional[ProgressFn] = None,
             cancel: Optional[CancelToken] = None, device: str = "auto", n_objects: int = 1) -> dict:
    t0 = time.perf_counter()
    check_demo_args(width, height, n_frames, n_objects)
    cfg = config or preset("demo")
    if device != "auto":
        cfg = cfg.replace(train={"device": device})
    if cfg.clip.long_edge < max(width, height) or 0 < cfg.clip.max_frames < n_frames:
        # the yardsticks compare with the ground truth pixel for pixel, frame for frame: train
        # on the whole clip at its own size (a preset's working size would shrink it)
        cfg = cfg.replace(clip={"long_edge": max(width, height, cfg.clip.long_edge),
                                "max_frames": max(n_frames, cfg.clip.max_frames)})
    out = prepare_output(out_dir)
    scene = make_synthetic_clip(width=width, height=height, n_frames=n_frames, seed=seed, n_objects=n_objects)
    clip_dir = scene.write(out / "clip")
    cancel = cancel or CancelToken()
    result = decompose(clip_dir, out / "decomposition", cfg, progress=progress, cancel=cancel)
    # from here a Ctrl-C stops the yardsticks; the decomposition is whole
    cancel.note = f"stopping the demo's measurements ({result} is complete)"
    cancel.raise_if_cancelled()
    dec = json.loads((result / "report.json").read_text())
    from .edit import load_bake
    bake = load_bake(result)
    sizes = [int(a.shape[0]) for a in bake.atlases]  # S_i per layer
    render_device = "cuda" if dec["device"].startswith(("NVIDIA", "cuda")) else "cpu"
    measured = measure(result, clip_dir, render_device)
    cancel.raise_if_cancelled()
    frame_paint = measure_frame_paint(result, clip_dir, out / "frame_paint", render_device)
    cancel.raise_if_cancelled()
    marks = measured["edit_drift_px"]["per_layer"]
    # the demo's edited shot: every mark at once, written as PNG frames and mp4
    edits = {}
    for m in marks:
        S = sizes[m["layer"]]
        img = paint_disc(np.zeros((S, S, 4), np.float32), m["atlas_uv"], m["radius_texels"],
                         MARK_COLOURS[m["layer"] % len(MARK_COLOURS)])
        edits[m["layer"]] = write_png16_rgba(out / "edits" / f"layer_{m['layer']}.png", img)
    edited = render_edit(result, edits, out=out / "edited", device=render_device, cancel=cancel)
    report = {
        "psnr": dec["psnr"],
        "psnr_no_residual": dec["psnr_no_residual"],
        "edit_drift_px": measured["edit_drift_px"],
        "alpha_iou": measured["alpha_iou"],
        "frame_paint_drift_px": frame_paint,
        "iterations": dec["iterations"],
        "train_seconds": dec["seconds"],
        "total_seconds": round(time.perf_counter() - t0, 2),
        "device": dec["device"],
        "clip": {"width": width, "height": height, "frames": n_frames, "seed": seed, "objects": n_objects,
                 "folder": str(clip_dir)},
        "decomposition": str(result),
        "edited": edited,
        "edits": {k: str(v) for k, v in edits.items()},
        "config": cfg.to_dict(),
    }
    (out / "report.json").write_text(json.dumps(_no_nan(report), indent=1), encoding="utf-8")
    return report
