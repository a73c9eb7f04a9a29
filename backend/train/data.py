"""Training data resident on the training device, and uniform pixel sampling there.

Frames, alpha targets, flows and their consistency masks are moved to the device once;
every batch is drawn with a device generator and gathered there (the seed gathers on the
host and copies each batch, method.md 2.1). Forward flow of the last frame and backward
flow of the first frame do not exist; their masks are False.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..clip import Clip
from ..model import Geometry


@dataclass
class Batch:
    x: torch.Tensor  # (B,) int64 column
    y: torch.Tensor  # (B,) int64 row
    f: torch.Tensor  # (B,) int64 frame


def _to_device(array, device: torch.device, dtype: torch.dtype, chunk: int = 8) -> torch.Tensor:
    """Copy a (maybe memory-mapped) (F, ...) array to ``device`` a few frames at a time, so the
    host never holds a converted copy of the whole clip."""
    out = torch.empty(tuple(array.shape), dtype=dtype, device=device)
    for a in range(0, array.shape[0], chunk):
        part = np.array(array[a:a + chunk], copy=True)  # a writable copy of a few frames
        out[a:a + chunk] = torch.from_numpy(part).to(device, dtype)
    return out


class TrainingData:
    """Frames stay in their compact type on the device (uint8 for 8-bit sources, 1 byte a
    channel instead of 4) and are converted per batch; flows are float16, masks bool."""

    def __init__(self, clip: Clip, flow, device: torch.device) -> None:
        F_, H, W = clip.n_frames, clip.height, clip.width
        self.geometry = Geometry(W, H, F_)
        self.device = device
        raw = clip.frame_data
        self.frame_dtype = torch.uint8 if raw.dtype == np.uint8 else torch.float32
        self.frame_scale = float(clip.frame_scale)
        self.frames_raw = _to_device(raw, device, self.frame_dtype)
        # alpha targets: one channel per object, then background = 1 - max(objects)
        masks = clip.mask_data
        if masks is not None and masks.shape[-1] > 0:
            obj = _to_device(masks if masks.dtype == bool else np.asarray(masks) > 0.5, device, torch.bool)
            bg = ~obj.any(dim=-1, keepdim=True)
            self.targets = torch.cat([obj, bg], dim=-1)  # bool (F, H, W, N)
        else:
            self.targets = torch.ones(F_, H, W, 1, dtype=torch.bool, device=device)
        self.n_layers = int(self.targets.shape[-1])
        # flows padded to F entries: fw[f] maps f -> f+1, bw[f] maps f -> f-1 (float16, pixels)
        self.flow_fw = torch.zeros(F_, H, W, 2, dtype=torch.float16, device=device)
        self.flow_bw = torch.zeros(F_, H, W, 2, dtype=torch.float16, device=device)
        self.ok_fw = torch.zeros(F_, H, W, dtype=torch.bool, device=device)
        self.ok_bw = torch.zeros(F_, H, W, dtype=torch.bool, device=device)
        if flow is not None and F_ > 1:
            self.flow_fw[:-1] = _to_device(flow.forward, device, torch.float16)
            self.flow_bw[1:] = _to_device(flow.backward, device, torch.float16)
            self.ok_fw[:-1] = _to_device(flow.forward_ok, device, torch.bool)
            self.ok_bw[1:] = _to_device(flow.backward_ok, device, torch.bool)

    def frame(self, f: int) -> torch.Tensor:
        """Frame ``f`` as float32 (H, W, 3) in [0, 1] on the device."""
        return self.frames_raw[f].float() / self.frame_scale

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        g = self.geometry
        idx = torch.randint(g.n_pixels, (n,), device=self.device, generator=gen)
        f = idx // (g.width * g.height)
        rem = idx - f * (g.width * g.height)
        y = rem // g.width
        x = rem - y * g.width
        return Batch(x, y, f)

    def _pixels(self, f: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.frames_raw[f, y, x].float() / self.frame_scale

    def color(self, b: Batch) -> torch.Tensor:
        return self._pixels(b.f, b.y, b.x)

    def color_gradients(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward differences I(x+1) - I(x), I(y+1) - I(y); zero on the last column/row."""
        g = self.geometry
        c = self._pixels(b.f, b.y, b.x)
        x1 = (b.x + 1).clamp_max(g.width - 1)
        y1 = (b.y + 1).clamp_max(g.height - 1)
        dx = self._pixels(b.f, b.y, x1) - c  # zero where x1 == x
        dy = self._pixels(b.f, y1, b.x) - c
        return dx, dy

    def flow_at(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward flow (float32) and their consistency at the batch's pixels."""
        return (self.flow_fw[b.f, b.y, b.x].float(), self.flow_bw[b.f, b.y, b.x].float(),
                self.ok_fw[b.f, b.y, b.x], self.ok_bw[b.f, b.y, b.x])
