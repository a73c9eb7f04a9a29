"""Shared fixtures for engine tests: the tennis clip and tiny synthetic PNG clips."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

TENNIS = Path(__file__).resolve().parents[2] / "../shared/data/tennis"


@pytest.fixture
def tennis_dir() -> Path:
    """The real 70-frame tennis clip (seed layout); skips where ../shared/data/tennis is absent."""
    if not (TENNIS / "video_frames").is_dir():
        pytest.skip(f"tennis clip not found at {TENNIS.resolve()} (shared data not mounted)")
    return TENNIS.resolve()


def textured_frames(n: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """``n`` smooth random RGB frames, float32 (n, H, W, 3) in [0, 1], each different."""
    rng = np.random.default_rng(seed)
    noise = rng.random((n, height, width, 3), dtype=np.float32)
    return np.stack([cv2.GaussianBlur(f, (0, 0), 1.5) for f in noise]).clip(0, 1)


@pytest.fixture
def png_clip(tmp_path: Path):
    """Factory writing a tiny 8-bit PNG clip; returns the folder.

    ``png_clip(name="frames", n=4, width=24, height=16, seed=0, pattern="%05d.png")``
    """
    def make(name: str = "frames", n: int = 4, width: int = 24, height: int = 16,
             seed: int = 0, pattern: str = "%05d.png") -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(textured_frames(n, width, height, seed)):
            bgr = (frame[:, :, ::-1] * 255 + 0.5).astype(np.uint8)
            assert cv2.imwrite(str(folder / (pattern % i)), bgr)
        return folder
    return make
