"""Pixel and frame coordinates <-> the networks' normalised (x, y, t) (method.md 1.1).

``x = col / (rez/2) - 1``, ``y = row / (rez/2) - 1`` with ``rez = max(W, H)`` (aspect kept,
so for landscape clips y covers only part of [-1, 1]); ``t = f / (F/2) - 1``. Pixel
(col j, row i) sits at x = j: no half-pixel offset, as in the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Geometry:
    width: int
    height: int
    n_frames: int

    @property
    def rez(self) -> int:
        return max(self.width, self.height)

    @property
    def n_pixels(self) -> int:
        return self.width * self.height * self.n_frames

    def xyt(self, x: torch.Tensor, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Pixel coordinates and frame indices (any float/int tensors of shape (B,)) -> (B, 3)."""
        half = self.rez / 2.0
        return torch.stack([x / half - 1.0, y / half - 1.0, f / (self.n_frames / 2.0) - 1.0], dim=-1).float()

    def t(self, f: torch.Tensor) -> torch.Tensor:
        return f / (self.n_frames / 2.0) - 1.0

    def px(self, xy: torch.Tensor) -> torch.Tensor:
        """Normalised (x, y) -> pixel coordinates."""
        return (xy + 1.0) * (self.rez / 2.0)
