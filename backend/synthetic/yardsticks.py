"""Model-independent yardsticks: edit drift, alpha IoU, PSNR, and painting a test mark.

Pure numpy. Frames are (F, H, W, C) float arrays; image points use the engine's
pixel convention (pixel (col j, row i) is centred at x = j, y = i).

Atlas texel convention (used by ``paint_disc``, ``uv_to_texel``, ``texel_to_uv``):
an atlas image of S_v rows by S_u columns covers u, v in [-1, 1]; u runs along
columns (x), v along rows (y, downwards). Texel (row r, column c) has its
centre at u = -1 + (2c + 1) / S_u, v = -1 + (2r + 1) / S_v, so the texels tile
the square exactly and the square's edges are texel edges.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def mark_drift(original_frames: np.ndarray, edited_frames: np.ndarray, expected_xy: np.ndarray,
               visible: Optional[np.ndarray] = None, *, min_weight: float = 1.0,
               threshold: float = 0.05, relative_threshold: float = 0.25,
               mark_color: Optional[Sequence[float]] = None) -> dict:
    """How far a painted mark lands from where the ground truth says it belongs.

    In each frame the mark is found as the weighted centroid of the pixels whose change
    ``c = sum over channels |edited - original|`` exceeds
    ``cut = max(threshold, relative_threshold * max(c))``: the absolute part ignores noise
    and quantisation, the relative part keeps faint changes elsewhere (ghosts on another
    layer, reconstruction noise) from pulling the centroid. The weight is ``c - cut``, or,
    when ``mark_color`` (RGB) is given, the mark's estimated coverage of the pixel
    ``min(1, c / sum |mark_color - original|)``. Prefer giving it: the plain change weighs
    pixels by how much the underlying picture differs from the mark, which biases the
    centroid by up to a pixel even for a perfect edit (the bias moves with the texture, so
    it looks like a constant drift); the coverage does not depend on the picture.

    expected_xy: (F, 2) image points (x, y) where the painted point should be.
    visible: (F,) bool, frames where the ground truth sees the mark (None: all frames).
    min_weight: a frame whose total weight is below this counts as "not found" (about
        the mark's area in pixels with ``mark_color``).

    Returns ``dict(mean_px, max_px, per_frame_px, frames_measured, frames_not_visible,
    frames_not_found)``: ``per_frame_px`` is a list with NaN where not measured; mean and
    max are NaN when no frame was measured.
    """
    original = np.asarray(original_frames, np.float32)
    edited = np.asarray(edited_frames, np.float32)
    if original.shape != edited.shape or original.ndim != 4:
        raise ValueError(f"frames must both be (F, H, W, C), got {original.shape} and "
                         f"{edited.shape}")
    n, h, w = original.shape[:3]
    expected = np.asarray(expected_xy, np.float64).reshape(n, 2)
    seen = np.ones(n, bool) if visible is None else np.asarray(visible, bool).reshape(n)
    mark = None if mark_color is None else np.asarray(mark_color, np.float32).reshape(-1)[:3]
    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    drift = np.full(n, np.nan)
    not_found = 0
    for t in range(n):
        if not seen[t]:
            continue
        change = np.abs(edited[t] - original[t]).sum(-1)
        cut = max(threshold, relative_threshold * float(change.max()))
        if mark is None:
            weight = np.maximum(change - cut, 0.0).astype(np.float64)
        else:
            contrast = np.maximum(np.abs(mark - original[t]).sum(-1), threshold)
            weight = np.where(change > cut, np.minimum(change / contrast, 1.0), 0.0)
        total = weight.sum()
        if total < min_weight:
            not_found += 1
            continue
        centroid = np.array([weight.sum(0) @ xs, weight.sum(1) @ ys]) / total
        drift[t] = float(np.hypot(*(centroid - expected[t])))
    measured = ~np.isnan(drift)
    return dict(mean_px=float(drift[measured].mean()) if measured.any() else float("nan"),
                max_px=float(drift[measured].max()) if measured.any() else float("nan"),
                per_frame_px=[float(d) for d in drift],
                frames_measured=int(measured.sum()),
                frames_not_visible=int((~seen).sum()),
                frames_not_found=not_found)


def alpha_iou(pred_alpha: np.ndarray, true_mask: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union of ``pred_alpha >= threshold`` and ``true_mask >= 0.5`` over all
    frames (arrays (F, H, W)). Both empty gives 1.0."""
    pred = np.asarray(pred_alpha) >= threshold
    true = np.asarray(true_mask) >= 0.5
    if pred.shape != true.shape:
        raise ValueError(f"alpha {pred.shape} and mask {true.shape} differ in shape")
    union = np.count_nonzero(pred | true)
    return 1.0 if union == 0 else np.count_nonzero(pred & true) / union


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio (dB) over the whole arrays; inf when identical."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def psnr_per_frame(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """(F,) PSNR (dB) of each frame of (F, ...) arrays; inf where a frame is identical."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = np.mean(diff.reshape(diff.shape[0], -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range ** 2 / mse)


def uv_to_texel(uv: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Atlas coordinates (..., 2) (u, v) -> continuous texel coordinates (..., 2) (col, row)
    for an atlas of ``size = (rows, cols)``; integer values are texel centres."""
    uv = np.asarray(uv, np.float64)
    rows, cols = size
    return np.stack([(uv[..., 0] + 1) * cols / 2 - 0.5, (uv[..., 1] + 1) * rows / 2 - 0.5], -1)


def texel_to_uv(col_row: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Inverse of ``uv_to_texel``: texel coordinates (..., 2) (col, row) -> (u, v)."""
    cr = np.asarray(col_row, np.float64)
    rows, cols = size
    return np.stack([-1 + (2 * cr[..., 0] + 1) / cols, -1 + (2 * cr[..., 1] + 1) / rows], -1)


def paint_disc(atlas_rgba: np.ndarray, center_uv, radius_texels: float, color, *,
               copy: bool = True) -> np.ndarray:
    """A copy of ``atlas_rgba`` (S_v, S_u, 4) float with a filled disc painted over it.

    center_uv: (u, v) in the atlas's [-1, 1] coordinates (see the module docstring).
    radius_texels: the disc's radius in texels (columns).
    color: RGB or RGBA in [0, 1] (A defaults to 1), composited "over" the atlas with an
        anti-aliased edge (coverage ramps over one texel at the radius).
    copy: False paints into ``atlas_rgba`` itself when it is a float32 array (many discs on
        one large atlas), and returns it.
    """
    atlas = np.array(atlas_rgba, dtype=np.float32, copy=copy or None)
    if atlas.ndim != 3 or atlas.shape[2] != 4:
        raise ValueError(f"atlas must be (S, S, 4) RGBA, got {atlas.shape}")
    rgba = np.ones(4, np.float32)
    rgba[:len(color)] = color
    cx, cy = uv_to_texel(np.asarray(center_uv, np.float64), atlas.shape[:2])
    reach = radius_texels + 1.0
    c0, c1 = max(0, int(np.floor(cx - reach))), min(atlas.shape[1], int(np.ceil(cx + reach)) + 1)
    r0, r1 = max(0, int(np.floor(cy - reach))), min(atlas.shape[0], int(np.ceil(cy + reach)) + 1)
    if c0 >= c1 or r0 >= r1:
        return atlas
    d = np.hypot(np.arange(c0, c1)[None, :] - cx, np.arange(r0, r1)[:, None] - cy)
    cover = (np.clip(radius_texels - d + 0.5, 0.0, 1.0) * rgba[3]).astype(np.float32)[..., None]
    patch = atlas[r0:r1, c0:c1]
    patch[..., :3] += cover * (rgba[:3] - patch[..., :3])
    patch[..., 3:] += cover * (1.0 - patch[..., 3:])
    return atlas
