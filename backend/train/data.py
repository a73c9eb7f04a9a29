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


class TrainingData:
    def __init__(self, clip: Clip, flow, device: torch.device) -> None:
        F_, H, W = clip.n_frames, clip.height, clip.width
        self.geometry = Geometry(W, H, F_)
        self.device = device
        self.frames = torch.from_numpy(np.ascontiguousarray(clip.frames, dtype=np.float32)).to(device)
        # alpha targets: one channel per object, then background = 1 - max(objects)
        if clip.masks is not None and clip.masks.shape[-1] > 0:
            obj = torch.from_numpy(np.ascontiguousarray(clip.masks) > 0.5).to(device)
            bg = ~obj.any(dim=-1, keepdim=True)
            self.targets = torch.cat([obj, bg], dim=-1)  # bool (F, H, W, N)
        else:
            self.targets = torch.ones(F_, H, W, 1, dtype=torch.bool, device=device)
        self.n_layers = int(self.targets.shape[-1])
        # flows padded to F entries: fw[f] maps f -> f+1, bw[f] maps f -> f-1
        fw = np.zeros((F_, H, W, 2), np.float32)
        bw = np.zeros((F_, H, W, 2), np.float32)
        ok_fw = np.zeros((F_, H, W), bool)
        ok_bw = np.zeros((F_, H, W), bool)
        if flow is not None and F_ > 1:
            fw[:-1] = flow.forward
            ok_fw[:-1] = flow.forward_ok
            bw[1:] = flow.backward
            ok_bw[1:] = flow.backward_ok
        self.flow_fw = torch.from_numpy(fw).to(device)
        self.flow_bw = torch.from_numpy(bw).to(device)
        self.ok_fw = torch.from_numpy(ok_fw).to(device)
        self.ok_bw = torch.from_numpy(ok_bw).to(device)

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        g = self.geometry
        idx = torch.randint(g.n_pixels, (n,), device=self.device, generator=gen)
        f = idx // (g.width * g.height)
        rem = idx - f * (g.width * g.height)
        y = rem // g.width
        x = rem - y * g.width
        return Batch(x, y, f)

    def color(self, b: Batch) -> torch.Tensor:
        return self.frames[b.f, b.y, b.x]

    def color_gradients(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward differences I(x+1) - I(x), I(y+1) - I(y); zero on the last column/row."""
        g = self.geometry
        c = self.frames[b.f, b.y, b.x]
        x1 = (b.x + 1).clamp_max(g.width - 1)
        y1 = (b.y + 1).clamp_max(g.height - 1)
        dx = self.frames[b.f, b.y, x1] - c  # zero where x1 == x
        dy = self.frames[b.f, y1, b.x] - c
        return dx, dy
