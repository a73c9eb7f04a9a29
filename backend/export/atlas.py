"""The atlas texel convention, atlas rendering and atlas sampling (see docs/atlas.md).

An atlas image of size S x S covers u, v in [-1, 1]. Texel (row r, col c) has its centre at
    u = -1 + (2c + 1) / S,   v = -1 + (2r + 1) / S
so u runs along columns (image x) and v along rows (image y, row 0 at the top of the PNG).
Bilinear sampling at uv is ``grid_sample(..., align_corners=False)``, which uses exactly this
convention; export, bake, edit and the Blender add-on all go through these functions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.nn import functional as F


def texel_centres(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(S*S, 2) uv of every texel centre, row-major (row = v, column = u)."""
    c = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1
    v, u = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1)


#: Bounds of an automatic atlas size (texels a side) and its rounding. Never below the seed's
#: 1000: small shots keep their oversampled atlas (finer strokes than the plate's pixels).
AUTO_ATLAS_MIN, AUTO_ATLAS_MAX, AUTO_ATLAS_MULTIPLE = 1000, 4096, 16


def pixel_footprints(uv: torch.Tensor, alpha: torch.Tensor, max_samples: int = 1 << 16) -> torch.Tensor:
    """Atlas area (in uv units^2) one frame pixel covers where a layer is visible.

    ``uv`` (H, W, 2) and ``alpha`` (H, W) of one layer in one frame; the Jacobian of the mapping
    by forward differences over one pixel, kept where this pixel and its two neighbours have
    alpha > 0.5 (inside the layer, away from its edges and folds). Returns at most
    ``max_samples`` values (an even stride through them), empty where the layer is not seen."""
    d_x = uv[:-1, 1:] - uv[:-1, :-1]
    d_y = uv[1:, :-1] - uv[:-1, :-1]
    det = (d_x[..., 0] * d_y[..., 1] - d_x[..., 1] * d_y[..., 0]).abs()
    inside = (alpha[:-1, :-1] > 0.5) & (alpha[:-1, 1:] > 0.5) & (alpha[1:, :-1] > 0.5)
    vals = det[inside & torch.isfinite(det) & (det > 0)]
    if vals.numel() > max_samples:
        vals = vals[:: -(-vals.numel() // max_samples)]
    return vals


def size_for_footprints(per_layer: list[torch.Tensor]) -> tuple[int, list[Optional[float]]]:
    """The square atlas size at which a layer's median visible pixel covers one texel.

    A texel is 2/S wide in uv, a pixel covering area A is sqrt(A) wide, so a layer needs
    S = 2 / sqrt(median A). The result is the largest over the layers, rounded up to a
    multiple of :data:`AUTO_ATLAS_MULTIPLE` and clamped to [:data:`AUTO_ATLAS_MIN`,
    :data:`AUTO_ATLAS_MAX`]; the least size when no layer is seen. Also returns each layer's
    unrounded size (None where unseen)."""
    sizes: list[Optional[float]] = []
    for vals in per_layer:
        sizes.append(None if vals.numel() == 0 else 2.0 / math.sqrt(float(vals.median())))
    seen = [v for v in sizes if v is not None and math.isfinite(v)]
    if not seen:
        return AUTO_ATLAS_MIN, sizes
    m = AUTO_ATLAS_MULTIPLE
    size = int(math.ceil(max(seen) / m) * m)
    return max(AUTO_ATLAS_MIN, min(AUTO_ATLAS_MAX, size)), sizes


def layer_size(raw: Optional[float]) -> int:
    """One layer's automatic atlas size from its unrounded size (None: unseen -> the least size),
    rounded up to a multiple of :data:`AUTO_ATLAS_MULTIPLE` within the bounds."""
    if raw is None or not math.isfinite(raw):
        return AUTO_ATLAS_MIN
    m = AUTO_ATLAS_MULTIPLE
    return max(AUTO_ATLAS_MIN, min(AUTO_ATLAS_MAX, int(math.ceil(raw / m) * m)))


def coverage(seen: torch.Tensor, threshold: float = 0.5, tail: float = 0.01) -> dict:
    """How much of an atlas a layer uses, from its seen-alpha map (S, S): ``width`` / ``height``
    the fraction of the atlas's columns / rows spanned by the texels seen above ``threshold``
    (between the ``tail`` and 1 - ``tail`` quantiles of their positions, so a stray fold does not
    count), ``area`` the fraction of texels seen."""
    S = seen.shape[0]
    on = seen > threshold
    n = int(on.sum())
    if n == 0:
        return {"width": 0.0, "height": 0.0, "area": 0.0}

    def span(counts: torch.Tensor) -> float:
        c = torch.cumsum(counts.double(), 0) / n
        lo = int(torch.searchsorted(c, torch.tensor(tail, dtype=torch.float64, device=c.device)))
        hi = int(torch.searchsorted(c, torch.tensor(1.0 - tail, dtype=torch.float64, device=c.device)))
        return (min(hi, S - 1) - lo + 1) / S

    return {"width": round(span(on.sum(0)), 4), "height": round(span(on.sum(1)), 4),
            "area": round(n / (S * S), 4)}


@torch.no_grad()
def render_atlas(texture_fn, size: int, device: torch.device, chunk: int = 1 << 18) -> torch.Tensor:
    """Evaluate a texture network on every texel centre -> (S, S, 3) float32."""
    uv = texel_centres(size, device)
    out = torch.cat([texture_fn(uv[i:i + chunk]) for i in range(0, uv.shape[0], chunk)])
    return out.view(size, size, 3)


def sample_atlas(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample an (S, S, C) atlas at uv (..., 2) in [-1, 1] -> (..., C).

    Points outside the atlas take the border texel (``padding_mode='border'``).
    """
    lead = uv.shape[:-1]
    img = image.permute(2, 0, 1)[None].to(torch.float32)  # (1, C, S, S)
    grid = uv.reshape(1, 1, -1, 2).to(torch.float32)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].transpose(0, 1).reshape(*lead, image.shape[-1])


def texel_index(uv: torch.Tensor, size: int) -> torch.Tensor:
    """Continuous texel coordinates (col, row) of uv: texel k's centre is at k."""
    return (uv + 1.0) * (size / 2.0) - 0.5


def splat_max(acc: torch.Tensor, uv: torch.Tensor, value: torch.Tensor) -> None:
    """acc (S, S) = max(acc, value) over the 2x2 texels around each uv (its bilinear footprint)."""
    size = acc.shape[0]
    p = texel_index(uv, size)
    base = torch.floor(p).long()
    flat = acc.view(-1)
    for dc in (0, 1):
        for dr in (0, 1):
            c = (base[:, 0] + dc).clamp(0, size - 1)
            r = (base[:, 1] + dr).clamp(0, size - 1)
            flat.scatter_reduce_(0, r * size + c, value, reduce="amax")
