"""The mapping pretraining's target uv per layer and frame (docs/atlas.md, "Where a layer sits").

Every target is one scale and a per-frame offset in the networks' normalised coordinates:

    uv_target(x, y, f) = s_i * ((x, y) + o_i(f))

``model.uv_init = "seed"``: s_i = ``uv_scale_fg`` / ``uv_scale_bg``, o_i = 0 (the seed's
uv = s * xy). ``"fit"``:

* an object layer is centred per frame on its mask's centroid (o_i(f) = -centroid, frames
  without mask pixels interpolated between their neighbours) and scaled so that its track's
  largest robust half-extent around the centroid (1st-99th percentile of the mask pixels, the
  larger of x and y, over all frames) maps to ``OBJECT_FILL``: the object fills its atlas;
* the background follows the camera: the median forward flow of the background pixels (flow
  consistent, background mask) is the camera's per-frame translation, accumulated over the
  shot (o(f+1) = o(f) - median flow), so one scene point keeps its uv; the panorama (the
  union of the frames so placed) is centred and scaled so its larger half-extent maps to
  ``BACKGROUND_FILL``.

The scale is one number per layer (isotropic): the rigidity terms keep the mapping a local
similarity of that scale (they measure the Jacobian in units of s_i, losses.py). Only the
translation of the camera is fitted (a zoom or roll is left to training).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: The fraction of the atlas's half-width a fitted layer's extent maps to.
OBJECT_FILL, BACKGROUND_FILL = 0.85, 0.9
#: Frames with fewer mask pixels than this do not measure an object's extent or centre.
MIN_MASK_PIXELS = 16


@dataclass
class UVInit:
    scales: list[float]  # s_i per layer
    offsets: torch.Tensor  # (N, F, 2) o_i(f), normalised (x, y) units
    mode: str = "seed"

    def target(self, layer: int, xy: torch.Tensor, f) -> torch.Tensor:
        """Target uv (B, 2) of normalised points ``xy`` (B, 2) of frame ``f`` (an int, or a (1,)
        index tensor on the offsets' device: no host sync, as a CUDA graph needs)."""
        return (xy + self.offset(layer, f)) * self.scales[layer]

    def window(self, layer: int, f) -> torch.Tensor:
        """(2, 2) [[x_lo, y_lo], [x_hi, y_hi]] normalised: the points whose target is in [-1, 1]
        (for a (1,) index tensor ``f``: (2, 1, 2), each bound broadcasting as a (2,) one)."""
        o, s = self.offset(layer, f), self.scales[layer]
        return torch.stack([-1.0 / s - o, 1.0 / s - o])

    def offset(self, layer: int, f) -> torch.Tensor:
        """o_i(f): (2,) for an int frame, (1, 2) for a (1,) index tensor (``index_select``: a
        device-side gather, nothing read back to the host)."""
        return self.offsets[layer].index_select(0, f) if torch.is_tensor(f) else self.offsets[layer, f]


def seed_init(n_layers: int, n_frames: int, scale_fg: float, scale_bg: float,
              device: torch.device | str = "cpu") -> UVInit:
    scales = [float(scale_fg)] * (n_layers - 1) + [float(scale_bg)]
    return UVInit(scales, torch.zeros(n_layers, n_frames, 2, device=device), "seed")


def _interpolate(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(F, 2) values, with the rows where ``known`` is False filled linearly from the known ones."""
    f = np.arange(values.shape[0])
    return np.stack([np.interp(f, f[known], values[known, k]) for k in range(values.shape[1])], -1)


@torch.no_grad()
def object_fit(mask: torch.Tensor, half: float, fill: float = OBJECT_FILL):
    """One object's (scale, offsets (F, 2) numpy) from its mask track (F, H, W) bool, or None
    when it has no frame with enough mask pixels. ``half``: rez / 2 (pixels per normalised unit)."""
    F_ = mask.shape[0]
    centres = np.zeros((F_, 2))
    known = np.zeros(F_, bool)
    extent = 0.0
    for f in range(F_):
        ys, xs = torch.nonzero(mask[f], as_tuple=True)
        if ys.numel() < MIN_MASK_PIXELS:
            continue
        pts = torch.stack([xs, ys], -1).float()
        c = pts.mean(0)
        q = torch.quantile(pts, torch.tensor([0.01, 0.99], device=pts.device), dim=0)  # (2, 2)
        e = torch.maximum(c - q[0], q[1] - c).max() + 0.5  # to the pixel's edge
        extent = max(extent, float(e))
        centres[f] = c.double().cpu().numpy() / half - 1.0
        known[f] = True
    if not known.any():
        return None
    scale = fill / (extent / half)
    return scale, -_interpolate(centres, known)


@torch.no_grad()
def camera_offsets(flow_fw: torch.Tensor, ok_fw: torch.Tensor, background: torch.Tensor,
                   half: float) -> np.ndarray:
    """(F, 2) accumulated camera translation, normalised: o(0) = 0, o(f+1) = o(f) - median flow of
    the background's flow-consistent pixels at frame f (all consistent pixels where fewer than
    ``MIN_MASK_PIXELS`` background ones, 0 where none)."""
    F_ = flow_fw.shape[0]
    off = np.zeros((F_, 2))
    for f in range(F_ - 1):
        sel = ok_fw[f] & background[f]
        if int(sel.sum()) < MIN_MASK_PIXELS:
            sel = ok_fw[f]
        med = flow_fw[f][sel].float().median(0).values.double().cpu().numpy() if bool(sel.any()) else np.zeros(2)
        off[f + 1] = off[f] - med / half
    return off


def background_fit(offsets: np.ndarray, width: int, height: int, fill: float = BACKGROUND_FILL):
    """(scale, offsets (F, 2)) placing the union of the frames, moved by the camera ``offsets``,
    centred in the atlas with its larger half-extent at ``fill``."""
    half = max(width, height) / 2.0
    lo_frame = np.array([-1.0, -1.0]) - 0.5 / half  # pixel edges, normalised
    hi_frame = np.array([(width - 1) / half - 1.0, (height - 1) / half - 1.0]) + 0.5 / half
    lo = (lo_frame + offsets).min(0)
    hi = (hi_frame + offsets).max(0)
    centre = (lo + hi) / 2.0
    extent = float(((hi - lo) / 2.0).max())
    return fill / extent, offsets - centre


@torch.no_grad()
def fit_init(targets: torch.Tensor, flow_fw: torch.Tensor, ok_fw: torch.Tensor, width: int, height: int,
             scale_fg: float, scale_bg: float) -> UVInit:
    """``model.uv_init = "fit"`` from the training data: ``targets`` (F, H, W, N) bool (the objects'
    masks, then the background = no object), the forward flow (F, H, W, 2) pixels and its
    consistency (F, H, W) (zeros: a static camera). An object without masks keeps the seed's target."""
    F_, N = targets.shape[0], targets.shape[-1]
    half = max(width, height) / 2.0
    init = seed_init(N, F_, scale_fg, scale_bg, targets.device)
    offsets = init.offsets.cpu().double().numpy()
    for i in range(N - 1):
        fit = object_fit(targets[..., i], half)
        if fit is not None:
            init.scales[i], offsets[i] = fit
    cam = camera_offsets(flow_fw, ok_fw, targets[..., N - 1], half)
    init.scales[N - 1], offsets[N - 1] = background_fit(cam, width, height)
    init.offsets = torch.from_numpy(offsets).float().to(targets.device)
    init.mode = "fit"
    return init
