"""Edit stickiness against a reference flow: a grid of dots painted on an atlas, found in every
frame of the rendered edit, their motion compared with an optical flow.

Pure numpy except :func:`measure_layer`, which renders through the engine's edit path
(``backend.edit.EditRenderer``). Image points use the engine's pixel convention (pixel
(col j, row i) is centred at x = j, y = i); atlas texels that of ``yardsticks`` (texel (col c,
row r) is centred at c, r; ``uv_to_texel``/``texel_to_uv``).

Method (docs/benchmarks.md, "Edit stickiness against the reference flow"):

1. ``dot_grid``: dot centres on a regular grid of the atlas, kept where the atlas's ``seen``
   (the layer's alpha as baked into the atlas) is high over the whole dot; ``paint_dots`` paints
   them (``yardsticks.paint_disc``) on a transparent edit layer and ``dot_id_atlas`` rasterises
   each dot's id over its footprint (radius + 1 texel).
2. The edit is rendered, and so is the same frame without it. ``dot_weights`` turns the
   difference into each pixel's estimated mark coverage (as ``yardsticks.mark_drift`` does);
   the id of the dot a pixel may show comes from the bake's uv map at that pixel (the id atlas
   sampled there), so every dot is identified without guessing.
3. ``locate_dots``: the centroid of each dot's coverage; a dot counts only where it is whole:
   every pixel of its footprint near the centroid has the layer's alpha >= ``min_alpha`` (not
   occluded, not at the layer's soft edge) and the centroid is clear of the frame's edge.
4. ``flow_errors``: for each dot found in frames t and t+1, its displacement against the
   reference flow sampled (bilinearly) at its position in frame t (end-point error); and over
   ``chain`` frames, the flow integrated from its position in frame t (one bilinear step per
   frame) against its position in frame t + chain, for dots found in every frame between.
   Positions are scaled from the working size to the flow's size first, and errors are in the
   flow's pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .yardsticks import paint_disc, texel_to_uv, uv_to_texel

#: status codes of a dot in a frame (``locate_dots``)
FOUND, NOT_FOUND, OCCLUDED, AT_EDGE = 0, 1, 2, 3
STATUS_NAMES = ("found", "not_found", "occluded", "at_edge")


# ---------------------------------------------------------------------- the dots on the atlas
def dot_grid(seen: np.ndarray, spacing_texels: float, radius_texels: float,
             min_seen: float = 0.9) -> np.ndarray:
    """(N, 2) texel centres (col, row) of a regular grid over an atlas, kept where ``seen``
    (S_v, S_u) is at least ``min_seen`` over every texel within ``radius_texels + 1``."""
    seen = np.asarray(seen, np.float32)
    rows, cols = seen.shape
    reach = int(np.ceil(radius_texels + 1.0))
    step = max(float(spacing_texels), 2.0 * reach + 1.0)
    cs = np.arange(reach + step / 2, cols - reach, step)
    rs = np.arange(reach + step / 2, rows - reach, step)
    centres = np.stack(np.meshgrid(np.round(cs), np.round(rs)), -1).reshape(-1, 2)
    if not len(centres):
        return np.zeros((0, 2))
    ok = np.ones(len(centres), bool)
    for n, (c, r) in enumerate(centres.astype(int)):
        ok[n] = seen[r - reach:r + reach + 1, c - reach:c + reach + 1].min() >= min_seen
    return centres[ok].astype(np.float64)


def paint_dots(size: Sequence[int], centres: np.ndarray, radius_texels: float, colour) -> np.ndarray:
    """An (S_v, S_u, 4) RGBA edit layer: transparent, with a disc of ``colour`` at each texel
    centre (``yardsticks.paint_disc``: anti-aliased edge, coverage in the alpha)."""
    layer = np.zeros((int(size[0]), int(size[1]), 4), np.float32)
    for c in np.asarray(centres, np.float64).reshape(-1, 2):
        layer = paint_disc(layer, texel_to_uv(c, size), radius_texels, colour, copy=False)
    return layer


def dot_id_atlas(size: Sequence[int], centres: np.ndarray, radius_texels: float) -> np.ndarray:
    """(S_v, S_u) int32: the index of the dot whose footprint (within ``radius_texels + 1``
    of its centre: the painted disc and its anti-aliased rim) holds each texel, -1 elsewhere."""
    ids = np.full((int(size[0]), int(size[1])), -1, np.int32)
    reach = radius_texels + 1.0
    for n, (cx, cy) in enumerate(np.asarray(centres, np.float64).reshape(-1, 2)):
        c0, c1 = max(0, int(np.floor(cx - reach))), min(ids.shape[1], int(np.ceil(cx + reach)) + 1)
        r0, r1 = max(0, int(np.floor(cy - reach))), min(ids.shape[0], int(np.ceil(cy + reach)) + 1)
        d = np.hypot(np.arange(c0, c1)[None, :] - cx, np.arange(r0, r1)[:, None] - cy)
        ids[r0:r1, c0:c1][d <= reach] = n
    return ids


def ids_from_uv(id_atlas: np.ndarray, uv_map: np.ndarray) -> np.ndarray:
    """(H, W) int32 dot ids seen at each pixel: the id atlas at the pixel's uv (nearest texel),
    -1 outside the atlas."""
    size = id_atlas.shape
    cr = np.rint(uv_to_texel(np.asarray(uv_map, np.float64), size)).astype(np.int64)
    inside = (cr[..., 0] >= 0) & (cr[..., 0] < size[1]) & (cr[..., 1] >= 0) & (cr[..., 1] < size[0])
    out = np.full(uv_map.shape[:2], -1, np.int32)
    out[inside] = id_atlas[cr[..., 1][inside], cr[..., 0][inside]]
    return out


def texels_per_pixel(uv: np.ndarray, alpha: np.ndarray, size: Sequence[int],
                     min_alpha: float = 0.9) -> float:
    """Median texels per screen pixel of a layer's mapping over frames (F, H, W, 2) uv and
    (F, H, W) alpha (pixels where alpha >= ``min_alpha`` on both sides of a horizontal step);
    NaN where the layer is never seen."""
    uv = np.asarray(uv, np.float64)
    a = np.asarray(alpha, np.float32)
    step = np.hypot((uv[..., 1:, 0] - uv[..., :-1, 0]) * size[1] / 2,
                    (uv[..., 1:, 1] - uv[..., :-1, 1]) * size[0] / 2)
    ok = (a[..., 1:] >= min_alpha) & (a[..., :-1] >= min_alpha)
    return float(np.median(step[ok])) if ok.any() else float("nan")


# ---------------------------------------------------------------------- finding them in a frame
def dot_weights(original: np.ndarray, edited: np.ndarray, colour, threshold: float = 0.1) -> np.ndarray:
    """(H, W) estimated coverage of the mark at each pixel of one frame (H, W, 3): the change
    ``sum |edited - original|`` over the mark's contrast ``sum |colour - original|``, capped at
    1, where the change exceeds ``threshold`` (0 elsewhere): see ``yardsticks.mark_drift``."""
    orig = np.asarray(original, np.float32)
    change = np.abs(np.asarray(edited, np.float32) - orig).sum(-1)
    mark = np.asarray(colour, np.float32).reshape(-1)[:3]
    contrast = np.maximum(np.abs(mark - orig).sum(-1), threshold)
    return np.where(change > threshold, np.minimum(change / contrast, 1.0), 0.0)


def locate_dots(weights: np.ndarray, ids: np.ndarray, n_dots: int, alpha: Optional[np.ndarray] = None,
                *, reach_px: float, min_alpha: float = 0.9, min_weight: float = 1.0,
                edge_px: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Where each dot is in one frame.

    weights: (H, W) mark coverage (``dot_weights``); ids: (H, W) the dot each pixel may show
    (-1: none); alpha: (H, W) the painted layer's alpha (None: 1 everywhere).
    reach_px: how far from a dot's centroid its footprint reaches on screen (its radius in
        pixels plus the rim): the footprint is the pixels of that id within it.
    A dot is FOUND when its footprint's coverage sums to at least ``min_weight``, every pixel of
    it has alpha >= ``min_alpha`` (else OCCLUDED) and its centroid is at least ``edge_px``
    (default ``reach_px``) from the frame's edge (else AT_EDGE).

    Returns ``(xy (N, 2) float64, NaN where not found, status (N,) int8)``.
    """
    w = np.asarray(weights, np.float64)
    h, wd = w.shape
    ids = np.asarray(ids)
    edge = reach_px if edge_px is None else edge_px
    ys, xs = np.mgrid[0:h, 0:wd]
    pix = ids >= 0
    k, x, y, wk = ids[pix], xs[pix].astype(np.float64), ys[pix].astype(np.float64), w[pix]
    a = np.ones_like(wk) if alpha is None else np.asarray(alpha, np.float64)[pix]
    xy = np.full((n_dots, 2), np.nan)
    status = np.full(n_dots, NOT_FOUND, np.int8)
    total = np.bincount(k, wk, n_dots)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(k, wk * x, n_dots) / total
        cy = np.bincount(k, wk * y, n_dots) / total
        # pass 2: only the pixels near the first centroid (a mapping defined everywhere can
        # show a dot's id far from where it is drawn, e.g. an object's uv outside the object)
        near = (x - cx[k]) ** 2 + (y - cy[k]) ** 2 <= reach_px ** 2
        total = np.bincount(k[near], wk[near], n_dots)
        cx = np.bincount(k[near], (wk * x)[near], n_dots) / total
        cy = np.bincount(k[near], (wk * y)[near], n_dots) / total
    low = np.bincount(k[near], (a < min_alpha)[near].astype(np.float64), n_dots) > 0
    found = total >= min_weight
    at_edge = (cx < edge) | (cx > wd - 1 - edge) | (cy < edge) | (cy > h - 1 - edge)
    status[found & low] = OCCLUDED
    status[found & ~low & at_edge] = AT_EDGE
    ok = found & ~low & ~at_edge
    status[ok] = FOUND
    xy[ok, 0], xy[ok, 1] = cx[ok], cy[ok]
    return xy, status


# ---------------------------------------------------------------------- against a flow
def sample_bilinear(field: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N, C) bilinear samples of an (H, W, C) field at points (N, 2) (x, y) in its pixels;
    NaN for points outside the span of pixel centres (or NaN points)."""
    f = np.asarray(field)
    h, w = f.shape[:2]
    p = np.asarray(xy, np.float64).reshape(-1, 2)
    out = np.full((len(p), f.shape[2]), np.nan)
    ok = (p[:, 0] >= 0) & (p[:, 0] <= w - 1) & (p[:, 1] >= 0) & (p[:, 1] <= h - 1)
    if not ok.any():
        return out
    q = p[ok]
    x0 = np.minimum(np.floor(q[:, 0]).astype(np.int64), w - 2 if w > 1 else 0)
    y0 = np.minimum(np.floor(q[:, 1]).astype(np.int64), h - 2 if h > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (q[:, 0] - x0)[:, None], (q[:, 1] - y0)[:, None]
    v = lambda yy, xx: f[yy, xx].astype(np.float64)  # noqa: E731
    out[ok] = ((1 - fy) * ((1 - fx) * v(y0, x0) + fx * v(y0, x1))
               + fy * ((1 - fx) * v(y1, x0) + fx * v(y1, x1)))
    return out


def to_flow_pixels(xy: np.ndarray, work_size: Sequence[int], flow_size: Sequence[int]) -> np.ndarray:
    """Image points at the working size (H, W) -> the same points in an image of ``flow_size``
    (H_f, W_f): pixel edges (not centres) of the two images coincide."""
    sy, sx = flow_size[0] / work_size[0], flow_size[1] / work_size[1]
    p = np.asarray(xy, np.float64)
    return np.stack([(p[..., 0] + 0.5) * sx - 0.5, (p[..., 1] + 0.5) * sy - 0.5], -1)


def flow_errors(tracks: np.ndarray, flow: np.ndarray, work_size: Sequence[int], chain: int = 10,
                flow_offset: int = 0) -> dict:
    """End-point errors of tracked dots against a forward flow.

    tracks: (F, N, 2) each dot's position per frame at the working size (H, W) = ``work_size``,
        NaN where it was not found.
    flow: (F_f, H_f, W_f, 2) forward flow (dx, dy) in its own pixels: ``flow[flow_offset + t]``
        maps frame t of the tracks to frame t + 1.
    chain: the number of frames over which the flow is integrated for the chained error.

    Returns ``dict(epe_mean_px, epe_median_px, pairs, per_frame_mean_px (F-1, NaN where no
    pair), chain, chain_epe_mean_px, chain_epe_median_px, chains)``; errors in flow pixels.
    """
    tr = to_flow_pixels(np.asarray(tracks, np.float64), work_size, flow.shape[1:3])
    n_frames = tr.shape[0]
    errs, per_frame = [], np.full(max(n_frames - 1, 0), np.nan)
    for t in range(n_frames - 1):
        ok = ~np.isnan(tr[t, :, 0]) & ~np.isnan(tr[t + 1, :, 0])
        if not ok.any():
            continue
        f = sample_bilinear(flow[flow_offset + t], tr[t, ok])
        e = np.hypot(*(tr[t + 1, ok] - tr[t, ok] - f).T)
        e = e[~np.isnan(e)]
        if len(e):
            errs.append(e)
            per_frame[t] = float(e.mean())
    chained = []
    for t in range(n_frames - chain):
        ok = np.all(~np.isnan(tr[t:t + chain + 1, :, 0]), axis=0)
        if not ok.any():
            continue
        p = tr[t, ok].copy()
        for s in range(chain):
            p = p + sample_bilinear(flow[flow_offset + t + s], p)
        e = np.hypot(*(tr[t + chain, ok] - p).T)
        chained.append(e[~np.isnan(e)])
    e1 = np.concatenate(errs) if errs else np.zeros(0)
    ec = np.concatenate(chained) if chained else np.zeros(0)
    stat = lambda e, fn: float(fn(e)) if len(e) else float("nan")  # noqa: E731
    return {"epe_mean_px": stat(e1, np.mean), "epe_median_px": stat(e1, np.median), "pairs": int(len(e1)),
            "per_frame_mean_px": [float(v) for v in per_frame],
            "chain": chain, "chain_epe_mean_px": stat(ec, np.mean), "chain_epe_median_px": stat(ec, np.median),
            "chains": int(len(ec))}


def synthetic_flow(scene) -> np.ndarray:
    """(F-1, H, W, 2) float32 true forward flow of a ``SyntheticScene``: at each pixel the motion
    of the layer seen there (the front-most object whose visible mask holds it, else the
    background), from frame t to t + 1."""
    h, w, n = scene.clip.height, scene.clip.width, scene.clip.n_frames
    ys, xs = np.mgrid[0:h, 0:w]
    xy = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)
    out = np.empty((n - 1, h, w, 2), np.float32)
    for t in range(n - 1):
        flow = np.empty_like(xy)
        owner = np.full(len(xy), scene.background)
        for k in range(scene.n_objects - 1, -1, -1):
            owner[scene.clip.masks[t, ..., k].ravel() >= 0.5] = k
        for k in range(scene.n_layers):
            sel = owner == k
            if sel.any():
                flow[sel] = scene.project(k, scene.unproject(k, xy[sel], t), t + 1) - xy[sel]
        out[t] = flow.reshape(h, w, 2)
    return out


# ---------------------------------------------------------------------- through the engine
def measure_layer(result_dir: str | Path, layer: int, flow: np.ndarray, *, flow_offset: Optional[int] = None,
                  spacing_px: float = 16.0, radius_px: float = 1.5, colour=(1.0, 0.0, 1.0),
                  min_alpha: float = 0.9, chain: int = 10, device: str = "cpu") -> dict:
    """Paint a grid of dots on ``layer``'s atlas of a decomposition, render the edit through
    ``EditRenderer`` (and the frames without it), find the dots and compare their motion with
    ``flow`` (see the module docstring).

    flow: (F_f, H_f, W_f, 2) forward flow of the source clip, in its own pixels; frame f of the
        decomposition is source frame ``flow_offset + f`` (default: the decomposition's frame
        range start).
    spacing_px, radius_px: the grid's spacing and each dot's radius, in screen pixels of the
        working size (converted to texels with the layer's median texels per pixel; a dot is at
        least 1 texel in radius).
    """
    from ..edit import EditRenderer, load_bake
    bake = load_bake(result_dir)
    size = bake.atlases[layer].shape[:2]
    n_frames, h, w = int(bake.meta["frames"]), int(bake.meta["height"]), int(bake.meta["width"])
    if flow_offset is None:
        flow_offset = int(bake.report["clip"]["frame_range"][0])
    if flow.shape[0] < flow_offset + n_frames - 1:
        raise ValueError(f"the flow has {flow.shape[0]} frame pairs; the decomposition needs "
                         f"{flow_offset + n_frames - 1} (frames {flow_offset}..{flow_offset + n_frames - 1})")
    uv, alpha = bake.uv(layer), bake.alpha(layer)
    sub = slice(None, None, max(1, n_frames // 8))
    tpp = texels_per_pixel(uv[sub], alpha[sub], size, min_alpha)
    info = {"layer": layer, "name": bake.report["layers"][layer]["name"], "frames": n_frames,
            "working_size": [w, h], "flow_size": [int(flow.shape[2]), int(flow.shape[1])],
            "atlas_size": [int(size[1]), int(size[0])], "texels_per_px": tpp, "radius_px": radius_px,
            "spacing_px": spacing_px}
    if not np.isfinite(tpp):  # e.g. a barely trained decomposition: nothing to measure
        out = flow_errors(np.full((n_frames, 0, 2), np.nan), flow, (h, w), chain=chain, flow_offset=flow_offset)
        return {**out, **info, "dots": 0, "dots_tracked": 0, "note": f"never seen with alpha >= {min_alpha}"}
    radius_texels = max(1.0, radius_px * tpp)
    centres = dot_grid(bake.seen[layer], spacing_px * tpp, radius_texels, min_seen=min_alpha)
    edit = paint_dots(size, centres, radius_texels, colour)
    ids_atlas = dot_id_atlas(size, centres, radius_texels)
    r = EditRenderer(result_dir, {layer: edit}, device=device)
    reach_px = (radius_texels + 1.0) / tpp + 0.5
    n = len(centres)
    tracks = np.full((n_frames, n, 2), np.nan)
    counts = np.zeros(len(STATUS_NAMES), np.int64)
    for f in range(n_frames):
        original, edited = r.frame(f, edited=False), r.frame(f)
        ids = ids_from_uv(ids_atlas, np.asarray(uv[f]))
        a = np.asarray(alpha[f], np.float32)
        xy, status = locate_dots(dot_weights(original, edited, colour), ids, n, a, reach_px=reach_px,
                                 min_alpha=min_alpha, min_weight=0.3 * np.pi * radius_px ** 2)
        # a dot that no pixel of the layer (alpha > 0.05) maps to is out of view: not counted
        in_view = np.bincount(ids[(ids >= 0) & (a > 0.05)], minlength=n) > 0
        counts += np.bincount(status[in_view], minlength=len(STATUS_NAMES))
        tracks[f] = xy
    out = flow_errors(tracks, flow, (h, w), chain=chain, flow_offset=flow_offset)
    found_any = ~np.all(np.isnan(tracks[..., 0]), axis=0)
    out.update({**info, "radius_texels": radius_texels, "dots": n, "dots_tracked": int(found_any.sum()),
                "dot_frames": {name: int(c) for name, c in zip(STATUS_NAMES, counts)}})
    return out
