"""The live preview's arithmetic in numpy (bpy-free): the backend's delta formula for one frame,
updated incrementally after a stroke.

    out = plate + sum_i o_i(f) * alpha_i * R_i * D_i(uv_i),   D_i = a (rgb - T_i)   (E over T)

Conventions (those of Blender's pixel buffers, which the add-on hands in): images are
``(rows, cols, C)`` float32 with row 0 at the BOTTOM; an atlas texel (col, row) of an S-texel
atlas has its centre at STMap coordinates ``((col + 0.5) / S, (row + 0.5) / S)`` (s = u,
t = v with the origin at the bottom left: the STMap convention of docs/atlas.md). D is sampled
bilinearly at ``(s S - 0.5, t S - 0.5)`` with the coordinates clamped to the border texels, which
is the backend's ``grid_sample(align_corners=False, padding_mode="border")``.

Incremental updates: the edit image is compared band by band (``BAND`` rows) by checksum, only
changed bands are turned into D, and the texel tiles (``tile_size``) whose D changed are
reported; a frame recomputes only the pixels whose bilinear footprint touches such a tile.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

BAND = 16  # rows of an edit image per checksum


def tile_size(size: int) -> int:
    """Texels per side of a change tile of an S-texel atlas: 16 (4 on atlases under 1,024)."""
    return max(4, min(16, int(size) // 64))


# ------------------------------------------------------------------ deltas
def srgb_encode(linear: np.ndarray) -> np.ndarray:
    x = np.maximum(linear, 0.0)
    return np.where(x < 0.0031308, x * 12.92, 1.055 * np.power(x, 1 / 2.4) - 0.055).astype(np.float32)


def delta(edit: np.ndarray, atlas: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``D = a (rgb - T)`` (rows, S, 3) of edit rows (rows, S, 4) (encoded, straight alpha) over
    the atlas's rows (rows, S, 3): the backend's ``E - T`` for ``E = T (1 - a) + rgb a``."""
    if out is None:
        out = np.empty(edit.shape[:2] + (3,), np.float32)
    np.subtract(edit[..., :3], atlas, out=out)
    out *= edit[..., 3:4]
    return out


class EditTracker:
    """Which rows of an edit image changed since the last look, by a checksum per band."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.crcs: list[int] = [-1] * ((rows + BAND - 1) // BAND)

    def changed_bands(self, pixels: np.ndarray) -> list[tuple[int, int]]:
        """(row0, row1) of every band of ``pixels`` (rows, cols, C) that differs from last time
        (all of them the first time); remembers the new checksums."""
        out = []
        for b in range(len(self.crcs)):
            r0, r1 = b * BAND, min((b + 1) * BAND, self.rows)
            crc = zlib.crc32(memoryview(np.ascontiguousarray(pixels[r0:r1])).cast("B"))
            if crc != self.crcs[b]:
                self.crcs[b] = crc
                out.append((r0, r1))
        return out


def update_delta(D: np.ndarray, edit: np.ndarray, atlas: np.ndarray,
                 bands: Sequence[tuple[int, int]]) -> np.ndarray:
    """Re-form D on ``bands`` of rows from ``edit``; returns the (ty, tx) bool mask of texel tiles
    whose D changed (empty when nothing did)."""
    S_r, S_c = D.shape[:2]
    TILE = tile_size(S_c)
    tiles = np.zeros(((S_r + TILE - 1) // TILE, (S_c + TILE - 1) // TILE), bool)
    for r0, r1 in bands:
        new = delta(edit[r0:r1], atlas[r0:r1])
        diff = (new != D[r0:r1]).any(-1)  # (rows, cols)
        if not diff.any():
            continue
        rows = np.nonzero(diff.any(1))[0] + r0
        cols = np.nonzero(diff.any(0))[0]
        for ty in np.unique(rows // TILE):
            tiles[ty, np.unique(cols // TILE)] = True
        D[r0:r1] = new
    return tiles


def dilate(tiles: np.ndarray) -> np.ndarray:
    """Tiles plus their 8 neighbours: a pixel whose lower-left texel is in one of these may
    read a changed texel (its bilinear footprint reaches one texel up and right)."""
    out = tiles.copy()
    out[1:] |= tiles[:-1]
    out[:-1] |= tiles[1:]
    o2 = out.copy()
    out[:, 1:] |= o2[:, :-1]
    out[:, :-1] |= o2[:, 1:]
    return out


# ------------------------------------------------------------------ frames
@dataclass
class LayerLookup:
    """One layer at one frame, for the pixels where it contributes (gain != 0)."""

    pix: np.ndarray  # (P,) flat pixel indices
    idx: np.ndarray  # (P,) flat index of the lower-left texel of the bilinear footprint
    wx: np.ndarray  # (P, 1) weights
    wy: np.ndarray
    gr: np.ndarray  # (P, 3) o * alpha * R
    tile: np.ndarray  # (P,) flat tile index of the lower-left texel
    size: int  # S
    tiles_x: int


def lookup(st: np.ndarray, gain: np.ndarray, residual: np.ndarray, size: int) -> LayerLookup:
    """``st`` (H, W, 2) STMap (s, t); ``gain`` (H, W) = opacity * alpha; ``residual`` (H, W, 3)."""
    g = gain.reshape(-1)
    pix = np.flatnonzero(g != 0.0)
    S = int(size)
    s = st.reshape(-1, 2)[pix]
    x = np.clip(s[:, 0] * S - 0.5, 0.0, S - 1.0)
    y = np.clip(s[:, 1] * S - 0.5, 0.0, S - 1.0)
    x0 = np.minimum(np.floor(x), max(S - 2, 0)).astype(np.int32)
    y0 = np.minimum(np.floor(y), max(S - 2, 0)).astype(np.int32)
    wx = (x - x0).astype(np.float32)[:, None]
    wy = (y - y0).astype(np.float32)[:, None]
    gr = residual.reshape(-1, 3)[pix] * g[pix, None]
    TILE = tile_size(S)
    tiles_x = (S + TILE - 1) // TILE
    return LayerLookup(pix, y0 * S + x0, wx, wy, gr.astype(np.float32), (y0 // TILE) * tiles_x + x0 // TILE,
                       S, tiles_x)


def contribution(D: np.ndarray, lk: LayerLookup, sub: Optional[np.ndarray] = None) -> np.ndarray:
    """``o alpha R D(uv)`` (P, 3) at the lookup's pixels (or the subset ``sub`` of them)."""
    flat = D.reshape(-1, 3)
    idx, wx, wy, gr = (lk.idx, lk.wx, lk.wy, lk.gr) if sub is None else \
        (lk.idx[sub], lk.wx[sub], lk.wy[sub], lk.gr[sub])
    step = 1 if lk.size > 1 else 0
    row = lk.size if lk.size > 1 else 0
    lo = flat[idx] * (1.0 - wx) + flat[idx + step] * wx
    hi = flat[idx + row] * (1.0 - wx) + flat[idx + row + step] * wx
    return (lo * (1.0 - wy) + hi * wy) * gr


class Frame:
    """One frame of the preview: the plate, each layer's lookup and contribution, the sum."""

    def __init__(self, plate: np.ndarray, lookups: dict[int, LayerLookup], deltas: dict[int, np.ndarray]) -> None:
        self.shape = plate.shape[:2]
        self.plate = np.ascontiguousarray(plate[..., :3], np.float32).reshape(-1, 3)
        self.lookups = lookups
        self.contrib: dict[int, np.ndarray] = {}  # layer -> (H W, 3), zero where it adds nothing
        out = self.plate.copy()
        for i, lk in lookups.items():
            c = np.zeros_like(self.plate)
            c[lk.pix] = contribution(deltas[i], lk)
            self.contrib[i] = c
            out += c
        self.u8 = to_uint8(out).reshape(self.shape + (3,))

    def update(self, layer: int, D: np.ndarray, tiles: np.ndarray) -> int:
        """Recompute the pixels of ``layer`` whose footprint touches ``tiles`` (the mask of
        changed tiles); returns how many pixels were recomputed."""
        lk = self.lookups.get(layer)
        if lk is None or not tiles.any():
            return 0
        sub = np.flatnonzero(dilate(tiles).reshape(-1)[lk.tile])
        if not len(sub):
            return 0
        pix = lk.pix[sub]
        self.contrib[layer][pix] = contribution(D, lk, sub)
        s = self.plate[pix].copy()  # the sum at these pixels from its parts, in the same order
        for c in self.contrib.values():
            s += c[pix]
        self.u8.reshape(-1, 3)[pix] = to_uint8(s)
        return len(sub)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """The backend's 8-bit encoding (backend.clip.writers): clip to [0, 1], x 255, + 0.5, floor."""
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def resample(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """(rows, cols, C) to (height, width, C): a shrink by whole factors is the box average (what
    the backend's ``INTER_AREA`` gives there), anything else bilinear at pixel centres
    (texel-centre convention, border clamped)."""
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    if w % width == 0 and h % height == 0:
        fy, fx = h // height, w // width
        return img.reshape(height, fy, width, fx, -1).mean((1, 3), dtype=np.float64).astype(np.float32)
    x = np.clip((np.arange(width) + 0.5) * (w / width) - 0.5, 0, w - 1)
    y = np.clip((np.arange(height) + 0.5) * (h / height) - 0.5, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 2, 0))
    y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 2, 0))
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    wx = (x - x0).astype(np.float32)[None, :, None]
    wy = (y - y0).astype(np.float32)[:, None, None]
    top, bot = img[y0], img[y1]
    a = top[:, x0] * (1 - wx) + top[:, x1] * wx
    b = bot[:, x0] * (1 - wx) + bot[:, x1] * wx
    return (a * (1 - wy) + b * wy).astype(np.float32)


# ------------------------------------------------------------------ output
def write_bmp(path: str, rgb: np.ndarray) -> None:
    """An uncompressed 24-bit BMP of (H, W, 3) uint8 with row 0 at the bottom (BMP's own row
    order): a few milliseconds at 1080p, read by Blender's image strips."""
    h, w = rgb.shape[:2]
    pad = (-w * 3) % 4
    body = np.ascontiguousarray(rgb[..., ::-1])
    if pad:
        body = np.concatenate([body.reshape(h, w * 3), np.zeros((h, pad), np.uint8)], 1)
    size = (w * 3 + pad) * h
    header = b"BM" + struct.pack("<IHHI", 54 + size, 0, 0, 54) + \
        struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, size, 2835, 2835, 0, 0)
    with open(path, "wb") as f:
        f.write(header)
        f.write(body.tobytes())


# ------------------------------------------------------------ frame paint
def srgb_decode(encoded: np.ndarray) -> np.ndarray:
    x = np.clip(encoded, 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, np.power((x + 0.055) / 1.055, 2.4)).astype(np.float32)


def residual_atlas(st: np.ndarray, mask: np.ndarray, residual: np.ndarray, size: int,
                   fill: int = 4) -> np.ndarray:
    """One frame's residual carried into atlas space, (S, S, 3) with row 0 at the bottom: each
    texel gets the mean residual of the pixels (``mask``) whose STMap point falls in it; texels
    between them (a magnified atlas) take the mean of known neighbours, ``fill`` rings deep;
    texels the frame does not show get 1 (no lighting)."""
    S = int(size)
    s = st[mask]
    r = residual[mask].astype(np.float64)
    col = np.clip(np.floor(s[:, 0] * S), 0, S - 1).astype(np.int64)
    row = np.clip(np.floor(s[:, 1] * S), 0, S - 1).astype(np.int64)
    idx = row * S + col
    cnt = np.bincount(idx, minlength=S * S).astype(np.float64)
    sums = np.stack([np.bincount(idx, weights=r[:, c], minlength=S * S) for c in range(3)], -1)
    known = cnt > 0
    R = np.ones((S * S, 3), np.float32)
    R[known] = (sums[known] / cnt[known, None]).astype(np.float32)
    R = R.reshape(S, S, 3)
    k = known.reshape(S, S)
    for _ in range(fill):
        if k.all():
            break
        acc = np.zeros((S, S, 3), np.float32)
        n = np.zeros((S, S), np.float32)
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            src = (slice(max(dy, 0), S + min(dy, 0)), slice(max(dx, 0), S + min(dx, 0)))
            dst = (slice(max(-dy, 0), S + min(-dy, 0)), slice(max(-dx, 0), S + min(-dx, 0)))
            w = k[src].astype(np.float32)
            acc[dst] += R[src] * w[..., None]
            n[dst] += w
        new = ~k & (n > 0)
        R[new] = acc[new] / n[new, None]
        k = k | new
    return R


def light(edit: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Edit texels (.., 4) as seen at the frame: rgb x R (clamped), alpha as it is."""
    out = edit.astype(np.float32, copy=True)
    out[..., :3] = np.clip(edit[..., :3] * R, 0.0, 1.0)
    return out


def unlight(seen: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Paint as seen at a frame (.., 4) into what the edit stores: rgb / R where R > 1e-3
    (clamped to [0, 1]), alpha as it is: the backend's paint_frame colour rule."""
    out = seen.astype(np.float32, copy=True)
    out[..., :3] = np.clip(np.where(R > 1e-3, seen[..., :3] / np.maximum(R, 1e-3), seen[..., :3]), 0.0, 1.0)
    return out
