"""The in-memory clip every room works on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Clip:
    """Frames (and optional object masks) at the working resolution.

    frames: (F, H, W, 3) float32 RGB in [0, 1].
    masks:  (F, H, W, K) float32 in {0, 1}, K objects in sorted folder-name order, or None.
    """

    frames: np.ndarray
    masks: Optional[np.ndarray] = None
    mask_names: list[str] = field(default_factory=list)
    frame_names: list[str] = field(default_factory=list)
    source: str = ""
    source_size: tuple[int, int] = (0, 0)  # (W, H) before resizing
    frame_range: tuple[int, int] = (0, 0)  # [start, stop) in source frame indices
    fps: Optional[float] = None

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def n_objects(self) -> int:
        return 0 if self.masks is None else int(self.masks.shape[-1])

    def fingerprint(self) -> str:
        """Stable cache key: source identity, range, working size and a pixel digest."""
        h = hashlib.sha1()
        h.update(json.dumps([self.source, list(self.frame_range), list(self.frames.shape)]).encode())
        # a coarse digest of the pixels so edited frames invalidate caches
        step = max(1, self.n_frames // 8)
        for f in range(0, self.n_frames, step):
            h.update(np.ascontiguousarray(self.frames[f, ::7, ::7]).astype(np.float16).tobytes())
        return h.hexdigest()[:16]
