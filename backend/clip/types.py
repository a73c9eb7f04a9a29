"""The clip every room works on: frames and optional object masks at the working resolution."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Optional

import numpy as np

from .storage import FloatView, as_float_view, is_memory_mapped

_FINGERPRINT_VERSION = 2


class Clip:
    """Frames (and optional object masks) at the working resolution.

    Read as float, stored compactly:

    ``frames``
        ``(F, H, W, 3)`` float32 RGB in [0, 1] *as read*: indexing (``clip.frames[i]``,
        ``clip.frames[a:b]``) returns float32 arrays. When the storage is not float32 this
        is a :class:`~backend.clip.storage.FloatView` that converts only the part read;
        ``np.asarray(clip.frames)`` converts everything (and costs 4 bytes a value).
    ``frame_data``
        The storage itself: uint8 for 8-bit sources (``load_clip``'s usual case), uint16
        for 16-bit files, float32 for float images or arrays passed in as float32. It may
        be a read-only ``np.memmap``. Divide by ``frame_scale`` for [0, 1].
    ``masks``
        ``(F, H, W, K)`` float32 in {0, 1} as read (a ``FloatView`` over bool storage from
        ``load_clip``), K objects in sorted folder-name order, or None.
    ``mask_data``
        The masks' storage (bool from ``load_clip``; whatever was passed otherwise).

    The constructor takes frames and masks of any of these dtypes (uint8, uint16, bool,
    float16, float32), as arrays or memory maps, and keeps them as given.
    """

    def __init__(self, frames, masks=None, mask_names: Optional[Sequence[str]] = None,
                 frame_names: Optional[Sequence[str]] = None, source: str = "",
                 source_size: tuple[int, int] = (0, 0), frame_range: tuple[int, int] = (0, 0),
                 fps: Optional[float] = None) -> None:
        self._fp: Optional[str] = None
        self.frames = frames
        self.masks = masks
        self.mask_names = list(mask_names or [])
        self.frame_names = list(frame_names or [])
        self.source = source
        self.source_size = tuple(source_size)  # (W, H) before resizing
        self.frame_range = tuple(frame_range)  # [start, stop) in source frame indices
        self.fps = fps

    # ---------------------------------------------------------------- storage
    @property
    def frames(self):
        """(F, H, W, 3) float32 in [0, 1] as read (see the class docstring)."""
        return self._frames_view

    @frames.setter
    def frames(self, value) -> None:
        data = value.data if isinstance(value, FloatView) else value
        if not isinstance(data, np.ndarray):
            data = np.asarray(data, np.float32)
        if data.ndim != 4 or data.shape[-1] != 3:
            raise ValueError(f"frames must be (F, H, W, 3), got shape {data.shape}")
        self._frame_data = data
        self._frames_view = as_float_view(data)
        self._fp = None

    @property
    def frame_data(self) -> np.ndarray:
        """The frames' storage array (uint8, uint16, float16 or float32; maybe a memmap)."""
        return self._frame_data

    @property
    def frame_scale(self) -> float:
        """Divisor mapping ``frame_data`` to [0, 1]: 255 (uint8), 65535 (uint16) or 1."""
        return 1.0 if self._frame_data.dtype.kind == "f" else float(np.iinfo(self._frame_data.dtype).max)

    @property
    def masks(self):
        """(F, H, W, K) float32 in {0, 1} as read, or None."""
        return self._masks_view

    @masks.setter
    def masks(self, value) -> None:
        data = value.data if isinstance(value, FloatView) else value
        if data is not None and not isinstance(data, np.ndarray):
            data = np.asarray(data, np.float32)
        if data is not None and data.ndim != 4:
            raise ValueError(f"masks must be (F, H, W, K), got shape {data.shape}")
        self._mask_data = data
        self._masks_view = as_float_view(data)

    @property
    def mask_data(self) -> Optional[np.ndarray]:
        """The masks' storage array (bool from ``load_clip``), or None."""
        return self._mask_data

    def frames_uint8(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Frames ``[start, stop)`` as uint8 RGB ``(n, H, W, 3)``: a view of uint8 storage
        (no copy), else rounded from the stored values. What flow methods and detectors take."""
        part = self._frame_data[start:stop]
        if part.dtype == np.uint8:
            return part
        if part.dtype == np.uint16:
            return ((part.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return (np.clip(part, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    @property
    def memory_mapped(self) -> bool:
        """True when the frames live in a memory-mapped file rather than anonymous RAM."""
        return is_memory_mapped(self._frame_data)

    # ------------------------------------------------------------- geometry
    @property
    def n_frames(self) -> int:
        return int(self._frame_data.shape[0])

    @property
    def height(self) -> int:
        return int(self._frame_data.shape[1])

    @property
    def width(self) -> int:
        return int(self._frame_data.shape[2])

    @property
    def n_objects(self) -> int:
        return 0 if self._mask_data is None else int(self._mask_data.shape[-1])

    def __repr__(self) -> str:
        return (f"Clip({self.source!r}, {self.n_frames} frames {self.width}x{self.height} "
                f"{self._frame_data.dtype}{' mmap' if self.memory_mapped else ''}, "
                f"range={self.frame_range}, objects={self.mask_names})")

    # ------------------------------------------------------------ cache key
    def fingerprint(self) -> str:
        """Stable cache key: source identity, range, working size and a digest of every pixel.

        The digest covers all frames (as rounded 8-bit values), so editing any frame on disk
        and reloading gives a new key. It is computed once per ``Clip`` (about 1 s per GB of
        uint8 frames) and recomputed when ``frames`` is assigned; after changing the frame
        array in place, assign it again (``clip.frames = clip.frame_data``).
        """
        if self._fp is None:
            h = hashlib.sha1()
            h.update(json.dumps([_FINGERPRINT_VERSION, self.source, list(self.frame_range),
                                 [self.n_frames, self.height, self.width, 3]]).encode())
            step = max(1, (64 << 20) // max(1, self.height * self.width * 3))
            for a in range(0, self.n_frames, step):
                h.update(np.ascontiguousarray(self.frames_uint8(a, a + step)).data)
            self._fp = h.hexdigest()[:16]
        return self._fp
