"""Paint on a frame of the shot: the strokes land in each layer's edit image (docs/atlas.md,
"Painting on a frame").

``paint_frame(result_dir, frame, image, layer=None, out_edits=DIR)`` takes an RGBA image of the
shot's frame ``frame`` as seen (straight alpha = the paint's coverage) and composites it OVER the
edit layers ``DIR/layer_<i>.png`` (created transparent when absent), so that rendering the edit
shows the paint at that frame and carries it through the shot:

* **Which layer**: each painted pixel goes to the layer that owns it at the frame, the frontmost
  (largest alpha there); where another layer is also clearly seen (alpha >= ``SHARED_ALPHA``, an
  anti-aliased layer edge) that layer gets it too, so a stroke across an object's outline covers
  the edge pixels fully once the layers are composited. ``layer=I`` sends everything to layer I,
  but only where layer I is seen at the frame (alpha >= ``SHARED_ALPHA`` or frontmost): elsewhere
  its mapping describes texels hidden at that frame, which may be wrong or folded over visible
  ones; that paint is left out and counted (``dropped_pixels``).
* **Where in the atlas**: the frame's pixel grid is cut into two triangles per square of four
  pixel centres, each vertex placed at its texel coordinates (the frame's uv map from the bake)
  and the paint interpolated across it (barycentric) at every texel centre it covers, so a
  magnified atlas gets no holes; each pixel also counts once at its nearest texel, which makes
  a minified atlas take the pixels' average (a box filter) rather than one point sample.
  A layer rasterises the triangles that touch pixels it receives (so its edge pixels are
  covered up to their neighbours, at most one pixel beyond); degenerate triangles and ones
  stretched over much more than the layer's typical pixel footprint (a fold or tear of the
  mapping) are skipped.
* **Colour**: the paint is the frame's colour as seen, which includes the plate's lighting; the
  render multiplies edits by the residual R, so the colour is divided by R at that pixel
  (clamped to [0, 1]): at the painted frame the render shows the paint as painted, in other
  frames it follows the plate's lighting changes.
* **Compositing**: new paint OVER existing paint, texels it does not touch keep their stored
  values bit for bit; the file keeps its bit depth (new files are 16-bit RGBA) and is replaced
  atomically.

The paint image is the working resolution (the decomposition's frames) or the source
resolution (the maps are upsampled as a source-resolution render does); any other size is
refused: resampling an image of another shape would put the paint in the wrong places.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from ..clip import read_image
from ..clip.writers import replacing
from ..errors import ClipError, ConfigError, OutputError
from ..progress import Progress, ProgressFn, null_progress
from .apply import load_bake

#: A layer that is not frontmost at a pixel still receives paint there where its alpha is at
#: least this (its anti-aliased edges); below it the pixel shows mostly other layers.
SHARED_ALPHA = 0.25
#: A triangle is skipped when an edge is longer than this many times the layer's median
#: triangle edge (in texels) and longer than ``_MIN_EDGE_CAP`` texels: a fold or tear.
_EDGE_FACTOR, _MIN_EDGE_CAP = 6.0, 4.0
_CHUNK = 1 << 18


# ------------------------------------------------------------------- input
def _read_paint(path: Path) -> np.ndarray:
    img = read_image(path)
    if img.shape[2] != 4:
        raise ClipError(f"the paint image {path} has no alpha channel: paint on a frame is an RGBA image "
                        "whose alpha is the paint's coverage (transparent where nothing was painted)")
    return img


def _read_edit(path: Path, size: int, seen: np.ndarray) -> tuple[np.ndarray, int]:
    """An existing edit layer as its raw (S, S, 4) RGBA integers (uint8/uint16) and the scale."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ClipError(f"cannot read the edit image {path} (damaged or not an image)")
    if raw.ndim != 3 or raw.shape[2] != 4 or raw.dtype not in (np.uint8, np.uint16):
        raise ClipError(f"{path} is not an 8- or 16-bit RGBA edit layer; paint-frame adds paint to edit "
                        "layers (transparent where unpainted), move this file away or pick another --out-edits")
    if raw.shape[:2] != (size, size):
        raise ClipError(f"{path} is {raw.shape[1]}x{raw.shape[0]}, this layer's atlas {size}x{size}; paint-frame "
                        "keeps edit layers at the atlas size (resampling would change the paint already there)")
    top = 65535 if raw.dtype == np.uint16 else 255
    rgba = raw[..., [2, 1, 0, 3]]
    seen_q = np.round(seen * top)
    if np.abs(rgba[..., 3].astype(np.float64) - seen_q).max() <= 1 and seen.max() > 0:
        raise ClipError(f"{path} is a painted copy of the atlas (its alpha is the atlas's), not an edit layer; "
                        "paint-frame adds to edit layers: pick another --out-edits folder")
    return np.ascontiguousarray(rgba), top


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".paint-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"the edit folder {folder} is not writable: {e.strerror or e}") from None


# ---------------------------------------------------------------- geometry
def _triangles(H: int, W: int) -> torch.Tensor:
    """(2 (H-1)(W-1), 3) flat pixel indices: two triangles per square of four pixel centres."""
    idx = torch.arange(H * W).view(H, W)
    a, b = idx[:-1, :-1].reshape(-1), idx[:-1, 1:].reshape(-1)
    c, d = idx[1:, :-1].reshape(-1), idx[1:, 1:].reshape(-1)
    return torch.cat([torch.stack([a, b, c], 1), torch.stack([d, c, b], 1)])


def _cross(ax, ay, bx, by):
    return ax * by - ay * bx


def rasterise(q: torch.Tensor, values: torch.Tensor, tris: torch.Tensor, window: tuple[int, int, int, int],
              max_edge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolate per-vertex ``values`` (P, C) over triangles ``tris`` (T, 3) whose vertices sit
    at texel coordinates ``q`` (P, 2) (col, row: texel k's centre at k), at every texel centre they
    cover inside ``window`` (col0, row0, col1, row1; stop exclusive) of the atlas. Returns the
    sums (h * w, C) and sample counts (h * w,) over the window, row-major."""
    C = values.shape[1]
    c0, r0, c1, r1 = window
    acc = torch.zeros((r1 - r0) * (c1 - c0), C, dtype=torch.float32)
    cnt = torch.zeros((r1 - r0) * (c1 - c0), dtype=torch.float32)
    for s in range(0, tris.shape[0], _CHUNK):
        t = tris[s:s + _CHUNK]
        p = q[t]  # (T, 3, 2)
        e = torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 1], p[:, 0] - p[:, 2]], 1).norm(dim=-1)
        area2 = _cross(p[:, 1, 0] - p[:, 0, 0], p[:, 1, 1] - p[:, 0, 1], p[:, 2, 0] - p[:, 0, 0], p[:, 2, 1] - p[:, 0, 1])
        ok = (e.max(1).values <= max_edge) & (area2.abs() > 1e-9) & torch.isfinite(area2)
        t, p, area2 = t[ok], p[ok], area2[ok]
        if t.shape[0] == 0:
            continue
        lo = torch.ceil(p.amin(1)).long()  # first texel centre inside the bounding box
        hi = torch.floor(p.amax(1)).long()
        span = (hi - lo).clamp(min=-1) + 1  # texel centres per axis (0: none)
        keep = (span > 0).all(1)
        t, p, area2, lo, span = t[keep], p[keep], area2[keep], lo[keep], span[keep]
        if t.shape[0] == 0:
            continue
        vals = values[t]  # (T, 3, C)
        # triangles in groups of similar size: each group loops over its own bounding box only
        big = span.max(1).values
        for lo_b, hi_b in ((0, 4), (4, 8), (8, 16), (16, 32), (32, 1 << 30)):
            g = torch.nonzero((big > lo_b) & (big <= hi_b)).squeeze(1)
            if g.numel():
                _rasterise_group(p[g], area2[g], lo[g], span[g], vals[g], window, acc, cnt)
    return acc, cnt


def _rasterise_group(p, area2, lo, span, vals, window, acc, cnt) -> None:
    c0, r0, c1, r1 = window
    for dy in range(int(span[:, 1].max())):
        for dx in range(int(span[:, 0].max())):
            m = (span[:, 0] > dx) & (span[:, 1] > dy)
            cx = (lo[m, 0] + dx).double()
            cy = (lo[m, 1] + dy).double()
            pm = p[m]
            w1 = _cross(cx - pm[:, 0, 0], cy - pm[:, 0, 1], pm[:, 2, 0] - pm[:, 0, 0], pm[:, 2, 1] - pm[:, 0, 1])
            w2 = _cross(pm[:, 1, 0] - pm[:, 0, 0], pm[:, 1, 1] - pm[:, 0, 1], cx - pm[:, 0, 0], cy - pm[:, 0, 1])
            w1, w2 = w1 / area2[m], w2 / area2[m]
            w0 = 1.0 - w1 - w2
            inside = (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9) & (cx >= c0) & (cy >= r0) \
                & (cx < c1) & (cy < r1)
            if not inside.any():
                continue
            w = torch.stack([w0, w1, w2], 1)[inside]
            v = (vals[m][inside] * w[..., None]).sum(1).float()
            flat = ((cy[inside] - r0) * (c1 - c0) + cx[inside] - c0).long()
            acc.index_add_(0, flat, v)
            cnt.index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float32))


def _median_edge(q: torch.Tensor, tris: torch.Tensor) -> float:
    if tris.shape[0] == 0:
        return 1.0
    sample = tris[:: max(1, tris.shape[0] // 65536)]
    p = q[sample]
    e = (p[:, 1] - p[:, 0]).norm(dim=-1)
    e = e[torch.isfinite(e)]
    return float(e.median()) if e.numel() else 1.0


# ------------------------------------------------------------------- paint
def paint_frame(result_dir: str | Path, frame: int, image: str | Path | np.ndarray,
                layer: Optional[int] = None, out_edits: str | Path | None = None,
                base_edits: Optional[dict] = None, progress: Optional[ProgressFn] = None) -> dict:
    """Add the paint of ``image`` (RGBA of frame ``frame`` as seen, straight alpha; a path or an
    (H, W, 4) float array) to the edit layers in ``out_edits`` (default ``result_dir/edits``).

    ``base_edits`` {layer: path}: existing edit layers to paint over instead of
    ``out_edits/layer_<i>.png`` (the service's jobs). Returns what was painted where. Raises a
    :class:`~backend.errors.NeuralAtlasError` with nothing written for bad input."""
    progress = progress or null_progress
    root = Path(result_dir)
    bake = load_bake(root)
    F_, H, W = int(bake.meta["frames"]), int(bake.meta["height"]), int(bake.meta["width"])
    N = bake.n_layers
    names = [l["name"] for l in bake.report["layers"]]
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= int(frame) < F_:
        raise ConfigError(f"frame {frame!r} is outside the shot: it has frames 0..{F_ - 1} (0-based)")
    frame = int(frame)
    if layer is not None and not (isinstance(layer, (int, np.integer)) and 0 <= int(layer) < N):
        raise ConfigError(f"layer {layer!r} does not exist; this decomposition has layers 0..{N - 1} "
                          f"({', '.join(names)})")
    paint = np.asarray(image, np.float32) if isinstance(image, np.ndarray) else _read_paint(Path(image))
    if paint.ndim != 3 or paint.shape[2] != 4:
        raise ClipError(f"the paint must be an RGBA image, got an array of shape {paint.shape}")
    src_w, src_h = (int(v) for v in bake.report["clip"].get("source_size", (W, H)))
    ph, pw = paint.shape[:2]
    if (pw, ph) == (W, H):
        resolution = "working"
    elif (pw, ph) == (src_w, src_h):
        resolution = "source"
    else:
        raise ClipError(f"the paint image is {pw}x{ph}; paint on frame {frame} at the decomposition's working "
                        f"resolution {W}x{H} or the source resolution {src_w}x{src_h} (other sizes are refused, "
                        "not resampled)")
    out = Path(out_edits) if out_edits is not None else root / "edits"
    sizes = [int(a.shape[0]) for a in bake.atlases]
    targets = {i: out / f"layer_{i}.png" for i in range(N)}
    bases = {int(k): Path(v) for k, v in (base_edits or {}).items()}
    for k in bases:
        if not 0 <= k < N:
            raise ConfigError(f"edit for layer {k}: this decomposition has layers 0..{N - 1}")
    existing: dict[int, tuple[np.ndarray, int]] = {}
    for i in range(N):
        src = bases.get(i, targets[i])
        if src.exists():
            existing[i] = _read_edit(src, sizes[i], bake.seen[i])
        elif i in bases:
            raise ClipError(f"edit image {src} for layer {i} does not exist")
    _writable(out)

    progress(Progress("paint", fraction=0.0, message=f"painting frame {frame}"))
    uv = torch.from_numpy(np.stack([np.asarray(bake.uv(i)[frame]) for i in range(N)]))
    alpha = torch.from_numpy(np.stack([np.asarray(bake.alpha(i)[frame], np.float32) for i in range(N)]))
    res = torch.from_numpy(np.stack([np.asarray(bake.residual(i)[frame], np.float32) for i in range(N)]))
    if resolution == "source":
        from .fused import upsample_maps
        uv, alpha, res = upsample_maps(uv, alpha, res, (ph, pw))
    P = ph * pw
    pt = torch.from_numpy(paint).reshape(P, 4).double()
    cover = pt[:, 3].clamp(0, 1)
    painted = cover > 0
    a = alpha.reshape(N, P).double()
    owner = a.argmax(0)
    receive = [(a[i] >= SHARED_ALPHA) | (owner == i) for i in range(N)]
    if layer is not None:
        receive = [r if i == int(layer) else torch.zeros_like(r) for i, r in enumerate(receive)]
    received_any = torch.stack(receive).any(0)
    tris_all = _triangles(ph, pw)
    result_layers: dict[str, dict] = {}
    encoded: dict[int, bytes] = {}
    for i in range(N):
        if not bool((receive[i] & painted).any()):
            continue
        S = sizes[i]
        q = ((uv[i].reshape(P, 2).double() + 1.0) * (S / 2.0) - 0.5)
        r = res[i].reshape(P, 3).double()
        lit = torch.where(r > 1e-3, pt[:, :3] / r.clamp(min=1e-3), pt[:, :3]).clamp(0, 1)
        values = torch.cat([lit * cover[:, None], cover[:, None]], 1)  # premultiplied paint, coverage
        rec = receive[i]
        # triangles touching the received pixels: up to one pixel past them, so the layer's own
        # edge pixels are covered to their neighbours (the mapping is continuous there)
        tris = tris_all[rec[tris_all].any(1)]
        max_edge = max(_MIN_EDGE_CAP, _EDGE_FACTOR * _median_edge(q, tris_all[rec[tris_all].all(1)]))
        tris = tris[painted[tris].any(1)]  # only triangles that carry paint
        if tris.shape[0] == 0 and not bool((rec & painted).any()):
            continue
        # the atlas window the paint can reach: around its triangles and painted pixels
        reach = torch.cat([q[tris.reshape(-1)], q[rec & painted]])
        reach = reach[torch.isfinite(reach).all(1)]
        if reach.shape[0] == 0:
            continue
        c0, r0 = (int(v) for v in torch.floor(reach.amin(0)).clamp(0, S - 1))
        c1, r1 = (int(v) + 2 for v in torch.floor(reach.amax(0)).clamp(0, S - 1))
        c1, r1 = min(c1, S), min(r1, S)
        acc, cnt = rasterise(q, values, tris, (c0, r0, c1, r1), max_edge)
        # each received pixel also at its nearest texel: the box filter of a minified atlas
        pix = torch.nonzero(rec & torch.isfinite(q).all(1)).squeeze(1)
        near = torch.round(q[pix]).long()
        inb = (near[:, 0] >= c0) & (near[:, 0] < c1) & (near[:, 1] >= r0) & (near[:, 1] < r1)
        flat = (near[inb, 1] - r0) * (c1 - c0) + near[inb, 0] - c0
        acc.index_add_(0, flat, values[pix[inb]].float())
        cnt.index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float32))
        new = (acc / cnt.clamp(min=1)[:, None]).view(r1 - r0, c1 - c0, 4).double().numpy()  # premultiplied
        rgba, top = existing.get(i, (np.zeros((S, S, 4), np.uint16), 65535))
        touched = new[..., 3] > 0.5 / top  # within the window
        if not touched.any():
            continue
        merged = rgba.copy()
        region = merged[r0:r1, c0:c1]
        old = region[touched].astype(np.float64) / top
        a_n = new[touched, 3:4]
        a_o = old[:, 3:4]
        a_out = a_n + a_o * (1.0 - a_n)  # new paint OVER the paint already there
        pm_out = new[touched, :3] + old[:, :3] * a_o * (1.0 - a_n)
        rgb_out = np.where(a_out > 0, pm_out / np.maximum(a_out, 1e-12), 0.0)
        region[touched] = np.floor(np.clip(np.concatenate([rgb_out, a_out], 1), 0, 1) * top + 0.5).astype(rgba.dtype)
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(merged[..., [2, 1, 0, 3]]))
        if not ok:
            raise OutputError(f"could not encode the edit layer for layer {i}")
        encoded[i] = buf.tobytes()
        result_layers[str(i)] = {"name": names[i], "path": str(targets[i]), "atlas_size": S,
                                 "painted_pixels": int((rec & painted).sum()), "texels": int(touched.sum()),
                                 "created": i not in existing, "bits": 16 if top == 65535 else 8}
        progress(Progress("paint", fraction=(i + 1) / N, message=f"layer {i} ({names[i]}): {int(touched.sum())} texels"))
    # every file encoded: now replace them (each atomically), and copy given bases through
    for i, data in encoded.items():
        with replacing(targets[i], "edit layer") as tmp:
            tmp.write_bytes(data)
    for i, src in bases.items():
        if i not in encoded and src.resolve() != targets[i].resolve():
            with replacing(targets[i], "edit layer") as tmp:
                tmp.write_bytes(src.read_bytes())
    return {"frame": frame, "resolution": resolution, "image_size": [pw, ph], "out_edits": str(out),
            "layers": result_layers, "painted_pixels": int(painted.sum()),
            "dropped_pixels": int((painted & ~received_any).sum()),
            "edits": {str(i): str(targets[i]) for i in range(N) if i in encoded or i in existing or i in bases}}
