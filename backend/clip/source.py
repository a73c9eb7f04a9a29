"""Loading a clip: a folder of frames, the seed layout or a video file, plus object masks.

``load_clip`` is the only way frames enter the engine. It applies the frame
range, the frame cap and the working resolution, reads and binarises the
masks, and checks everything a later room would otherwise trip over, raising
:class:`backend.errors.ClipError` with a message that names the problem and
the path. It writes nothing.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from ..errors import ClipError, ConfigError
from .storage import DEFAULT_MMAP_THRESHOLD, allocate
from .types import Clip
from .video import VIDEO_SUFFIXES, open_video
from .writers import read_image

PathLike = Union[str, os.PathLike]

#: File suffixes read as frames or masks in a folder (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

__all__ = [
    "IMAGE_SUFFIXES",
    "load_clip",
    "list_images",
    "natural_key",
    "parse_frame_range",
    "working_size",
]


# ----------------------------------------------------------------- small tools
def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``frame2 < frame10``.

    Text parts compare case-insensitively; the full name breaks ties so the
    order is total and deterministic.
    """
    parts = tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower())
                  for t in re.split(r"(\d+)", name) if t)
    return parts, name


def list_images(folder: Path) -> list[Path]:
    """The ``.png/.jpg/.jpeg`` files in ``folder`` (not hidden), in natural order."""
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def parse_frame_range(text: str) -> tuple[int, Optional[int]]:
    """Parse ``"A:B"`` (stop exclusive) as used by the CLI: ``"10:"``, ``":50"``, ``"5:20"``.

    Returns ``(start, stop)`` with ``stop=None`` meaning "to the end".
    """
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text or "")
    if not m:
        raise ClipError(f"frame range {text!r} is not of the form START:STOP "
                        "(e.g. 10:, :50 or 5:20; stop is exclusive)")
    start = int(m.group(1)) if m.group(1) else 0
    stop = int(m.group(2)) if m.group(2) else None
    if stop is not None and stop <= start:
        raise ClipError(f"frame range {text!r} is empty: stop must be greater than start")
    return start, stop


def working_size(width: int, height: int, long_edge: int) -> tuple[int, int]:
    """(W, H) with the aspect ratio kept and the long edge at most ``long_edge``.

    Never upscales; sizes are rounded half up and kept >= 2.
    """
    scale = long_edge / max(width, height)
    if scale >= 1.0:
        return width, height
    return (max(2, int(math.floor(width * scale + 0.5))),
            max(2, int(math.floor(height * scale + 0.5))))


# ------------------------------------------------------------------ load_clip
def load_clip(source: PathLike, *, masks: Optional[Sequence[PathLike]] = None,
              frame_range: Optional[tuple[int, Optional[int]]] = None,
              long_edge: int = 768, max_frames: Optional[int] = None,
              scratch_dir: Optional[PathLike] = None,
              mmap_threshold: Optional[int] = DEFAULT_MMAP_THRESHOLD) -> Clip:
    """Load a clip at its working resolution.

    source
        A folder of ``.png/.jpg/.jpeg`` frames (natural sort order), the seed
        layout (a folder with ``video_frames/`` and optionally
        ``masks/<object>/``), or a video file (``.mp4 .mov .mkv .avi .webm .m4v``;
        decoded sequentially with PyAV, else imageio-ffmpeg).
    masks
        One source per object: a folder of mask images (one per source frame,
        matched in natural sort order) or a mask video. Objects are ordered by
        name (natural sort) and ``Clip.mask_names`` are the folder names (video
        stems). ``None`` uses ``masks/*/`` of a seed layout; ``[]`` loads none.
        A mask pixel is "on" above half the range (> 127 for 8-bit); colour
        masks use their brightest channel, RGBA masks their alpha unless it is
        fully opaque. Masks are resized with nearest-neighbour.
    frame_range
        ``(start, stop)`` in source frame indices, stop exclusive, ``stop=None``
        for the end (see :func:`parse_frame_range`).
    long_edge
        Frames larger than this are shrunk (INTER_AREA) to this long edge,
        aspect ratio kept; smaller clips keep their size.
    max_frames
        At most this many frames after the range (a warning says when it cuts).
    scratch_dir, mmap_threshold
        Frames or masks whose storage takes ``mmap_threshold`` bytes or more
        (default 512 MiB; ``0`` always, ``None`` never) are memory-mapped from an
        unlinked scratch file in ``scratch_dir`` (default: the system temporary
        folder) instead of anonymous RAM; see :func:`backend.clip.storage.allocate`.

    ``clip.frames`` reads as float32 RGB in [0, 1] (grayscale replicated, alpha
    dropped, 16-bit divided by 65535) but is stored compactly: ``clip.frame_data``
    is uint8 for 8-bit files and videos, uint16 for 16-bit files, float32 for float
    images; masks are stored as bool. Raises :class:`ClipError`.
    """
    if int(long_edge) < 2:
        raise ConfigError(f"long_edge must be >= 2, got {long_edge}")
    if max_frames is not None and int(max_frames) < 2:
        raise ConfigError(f"max_frames must be >= 2, got {max_frames}")
    src = Path(source).expanduser()
    if not src.exists():
        raise ClipError(f"clip not found: {src}")

    frames_dir = src
    if src.is_dir():
        if (src / "video_frames").is_dir():
            frames_dir = src / "video_frames"
            if masks is None:
                masks = _seed_mask_dirs(src / "masks")
    elif src.suffix.lower() not in VIDEO_SUFFIXES:
        raise ClipError(f"cannot load {src}: expected a folder of frames, a seed layout folder "
                        f"or a video ({', '.join(VIDEO_SUFFIXES)})")

    mask_sources = sorted((Path(m).expanduser() for m in masks or ()),
                          key=lambda p: (natural_key(_object_name(p)), str(p)))
    store = {"scratch_dir": scratch_dir, "mmap_threshold": mmap_threshold}
    if src.is_dir():
        loaded = _read_folder(frames_dir, frame_range, long_edge, max_frames, store)
    else:
        loaded = _read_video(src, frame_range, long_edge, max_frames, store,
                             need_total=bool(mask_sources))
    frames, names, total, (start, end), source_size, fps = loaded
    clip = Clip(frames=frames, frame_names=names, source=str(src.resolve()),
                source_size=source_size, frame_range=(start, end), fps=fps)
    if mask_sources:
        size = (clip.width, clip.height)
        assert total is not None
        masks_out = allocate((end - start, size[1], size[0], len(mask_sources)), bool, **store)
        for k, p in enumerate(mask_sources):
            _load_mask(p, total, start, end, size, masks_out[..., k])
        clip.masks = masks_out
        clip.mask_names = [_object_name(p) for p in mask_sources]
    return clip


# ------------------------------------------------------------------- frames
_Loaded = tuple[np.ndarray, list[str], Optional[int], tuple[int, int], tuple[int, int], Optional[float]]


class _FrameStack:
    """Resized frames gathered into one preallocated ``(F, H, W, 3)`` array of the source's type.

    The array is allocated once at the expected count (growing only when a video
    holds more frames than its container said) with :func:`allocate`, so a large
    clip goes to a memory-mapped scratch file. Storage is uint8 for 8-bit sources,
    uint16 for 16-bit ones and float32 for float images; a wider frame arriving
    later widens the whole stack (uint8 -> uint16 is exact: v * 257).
    """

    def __init__(self, capacity: int, store: dict) -> None:
        self._capacity = max(1, capacity)
        self._store = store
        self._array: Optional[np.ndarray] = None
        self.count = 0

    def append(self, frame: np.ndarray) -> None:
        if self._array is None:
            self._array = allocate((self._capacity,) + frame.shape, frame.dtype, **self._store)
        elif frame.dtype != self._array.dtype:
            wide = np.result_type(frame.dtype, self._array.dtype)
            wide = np.dtype(np.float32) if wide.kind == "f" else wide
            if wide != self._array.dtype:
                self._regrow(self._array.shape[0], wide)
        if self.count == self._array.shape[0]:
            self._regrow(2 * self.count, self._array.dtype)
        self._array[self.count] = _convert(frame, self._array.dtype)
        self.count += 1

    def _regrow(self, capacity: int, dtype) -> None:
        assert self._array is not None
        grown = allocate((capacity,) + self._array.shape[1:], dtype, **self._store)
        for i in range(self.count):
            grown[i] = _convert(self._array[i], grown.dtype)
        self._array = grown

    def result(self) -> np.ndarray:
        """The frames appended so far (at least one)."""
        assert self._array is not None
        if self.count == self._array.shape[0]:
            return self._array
        return self._array[: self.count]


def _convert(frame: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A frame in another storage type, same [0, 1] meaning (uint8 -> uint16 is exact)."""
    if frame.dtype == dtype:
        return frame
    if frame.dtype == np.uint8 and dtype == np.uint16:
        return frame.astype(np.uint16) * np.uint16(257)
    if dtype.kind == "f":
        scale = 1.0 if frame.dtype.kind == "f" else float(np.iinfo(frame.dtype).max)
        return frame.astype(np.float32) / np.float32(scale)
    raise TypeError(f"cannot store {frame.dtype} frames as {dtype}")


class _Sizer:
    """Checks that every frame has the first frame's size and resizes to the working size."""

    def __init__(self, long_edge: int) -> None:
        self.long_edge = int(long_edge)
        self.first: Optional[tuple[str, int, int]] = None
        self.source_size = (0, 0)
        self.work = (0, 0)

    def __call__(self, frame: np.ndarray, where: str) -> np.ndarray:
        h, w = frame.shape[:2]
        if self.first is None:
            if w < 2 or h < 2:
                raise ClipError(f"frame {where} is {w}x{h}: frames need at least 2x2 pixels")
            self.first = (where, w, h)
            self.source_size = (w, h)
            self.work = working_size(w, h, self.long_edge)
        elif (w, h) != self.source_size:
            raise ClipError(f"frame {where} is {w}x{h} but {self.first[0]} is "
                            f"{self.first[1]}x{self.first[2]}: all frames must have the same size")
        rgb = frame[:, :, :3]
        if self.work != (w, h):
            rgb = cv2.resize(np.ascontiguousarray(rgb), self.work, interpolation=cv2.INTER_AREA)
        return np.clip(rgb, 0.0, 1.0) if rgb.dtype.kind == "f" else rgb


def _range_bounds(frame_range, path: Path) -> tuple[int, Optional[int]]:
    start, stop = frame_range if frame_range is not None else (0, None)
    start = int(start)
    stop = None if stop is None else int(stop)
    if start < 0 or (stop is not None and stop <= start):
        raise ClipError(f"frame range {_fmt(start, stop)} for {path} is invalid: "
                        "need 0 <= start < stop")
    return start, stop


def _check_range(start: int, stop: Optional[int], total: int, path: Path) -> None:
    if total == 0:
        raise ClipError(f"{path} contains no frames")
    if start >= total or (stop is not None and stop > total):
        raise ClipError(f"frame range {_fmt(start, stop)} is outside the clip {path}, "
                        f"which has {total} frames (0:{total})")


def _cap_end(start: int, stop: Optional[int], max_frames: Optional[int]) -> Optional[int]:
    if max_frames is None:
        return stop
    return start + int(max_frames) if stop is None else min(stop, start + int(max_frames))


def _warn_capped(path: Path, start: int, end: int, stop: Optional[int],
                 max_frames: Optional[int]) -> None:
    warnings.warn(f"{path}: max_frames={max_frames} keeps frames {start}:{end} of the range "
                  f"{_fmt(start, stop)}; raise max_frames or pass a frame range to use others",
                  stacklevel=4)


def _fmt(start: int, stop: Optional[int]) -> str:
    return f"{start}:{'' if stop is None else stop}"


def _require_two(n: int, path: Path) -> None:
    if n < 2:
        raise ClipError(f"{path} gives only {n} frame in the chosen range: "
                        "a clip needs at least 2 frames")


def _ordered_map(fn, items: Sequence, window: Optional[int] = None) -> Iterator:
    """``fn`` over ``items`` on a few threads (image decoding releases the GIL), yielded in order,
    with at most ``window`` results decoded ahead of the consumer (memory stays bounded at any
    clip length). An exception is raised when its item's turn comes, as a plain loop would."""
    workers = max(1, min(8, os.cpu_count() or 1))
    window = window or workers + 2
    if workers == 1 or len(items) < 2:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clip-read") as pool:
        pending = deque(pool.submit(fn, it) for it in items[:window])
        nxt = len(pending)
        try:
            while pending:
                result = pending.popleft().result()
                if nxt < len(items):
                    pending.append(pool.submit(fn, items[nxt]))
                    nxt += 1
                yield result
        finally:
            for f in pending:
                f.cancel()


def _read_folder(folder: Path, frame_range, long_edge: int, max_frames: Optional[int],
                 store: dict) -> _Loaded:
    files = list_images(folder)
    if not files:
        raise ClipError(f"no frames in {folder}: expected {', '.join(IMAGE_SUFFIXES)} files")
    total = len(files)
    start, stop = _range_bounds(frame_range, folder)
    _check_range(start, stop, total, folder)
    stop = total if stop is None else stop
    end = _cap_end(start, stop, max_frames)
    assert end is not None
    _require_two(end - start, folder)
    stack = _FrameStack(end - start, store)
    sizer = _Sizer(long_edge)
    chosen = files[start:end]
    for p, frame in zip(chosen, _ordered_map(lambda q: read_image(q, native=True), chosen)):
        stack.append(sizer(frame, str(p)))
    if end < stop:
        _warn_capped(folder, start, end, stop, max_frames)
    return (stack.result(), [p.name for p in chosen], total, (start, end),
            sizer.source_size, None)


def _read_video(path: Path, frame_range, long_edge: int, max_frames: Optional[int],
                store: dict, need_total: bool) -> _Loaded:
    start, stop = _range_bounds(frame_range, path)
    end = _cap_end(start, stop, max_frames)
    # decode up to `stop` so that a range past the end is reported, or to the
    # end of the video when the total count is needed (to check mask counts)
    decode_until = None if need_total else (stop if stop is not None else end)
    stream = open_video(path)
    hint = stream.count_hint - start if stream.count_hint > start else 64
    stack = _FrameStack(min(hint, end - start) if end is not None else hint, store)
    sizer = _Sizer(long_edge)
    names: list[str] = []
    seen = 0
    exhausted = True
    try:
        for index, rgb8 in enumerate(stream.frames):
            if decode_until is not None and index >= decode_until:
                exhausted = False
                break
            seen = index + 1
            if start <= index and (end is None or index < end):
                name = f"{index:05d}"
                stack.append(sizer(rgb8, f"{name} of {path}"))
                names.append(name)
    finally:
        stream.close()
    total = seen if exhausted else None
    if total is not None:
        _check_range(start, stop, total, path)
    _require_two(len(names), path)
    capped = end is not None and (stop is None or end < stop) and (total is None or total > end)
    if capped:
        _warn_capped(path, start, start + len(names), stop, max_frames)
    return stack.result(), names, total, (start, start + len(names)), sizer.source_size, stream.fps


# -------------------------------------------------------------------- masks
def _seed_mask_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _object_name(p: Path) -> str:
    return p.stem if p.suffix.lower() in VIDEO_SUFFIXES else p.name


#: (half, full) of a mask image's value range by pixel type: "on" is above half of full scale
_MASK_RANGE = {np.dtype(np.uint8): (127, 255), np.dtype(np.uint16): (32767, 65535)}


def _binarize(img: np.ndarray) -> np.ndarray:
    """Mask image (H, W, 3|4) -> bool: alpha when it varies, else the brightest channel, on above
    half of full scale. Float images are in [0, 1]; uint8/uint16 (the file's own values, read
    without conversion: 10x less work at 1080p) compare against the same thresholds exactly
    (x / 255 > 0.5 is x > 127; x / 65535 > 0.5 is x > 32767)."""
    half, full = _MASK_RANGE.get(img.dtype, (0.5, 1.0))
    if img.shape[2] == 4 and img[:, :, 3].min() < full:
        return img[:, :, 3] > half
    # the channels' maximum as two element-wise passes (numpy's reduce over a last axis of 3 is
    # ~10x slower at 1080p)
    return np.maximum(np.maximum(img[:, :, 0], img[:, :, 1]), img[:, :, 2]) > half


def _load_mask(source: Path, total: int, start: int, end: int, size: tuple[int, int],
               out: np.ndarray) -> None:
    """One object's masks for source frames [start, end) into bool ``out`` (F, H, W).

    Any mask size is accepted: each is binarised at its own size, then resized to the
    working size with nearest-neighbour, so it stays binary."""
    name = _object_name(source)
    if not source.exists():
        raise ClipError(f"mask source for object {name!r} not found: {source}")
    if source.is_dir():
        files = list_images(source)
        if len(files) != total:
            raise ClipError(f"mask folder {source} has {len(files)} images but the clip has "
                            f"{total} frames: give one mask per frame")
        binary = _ordered_map(lambda p: _binarize(_read_mask_image(p, name)), files[start:end])
    elif source.suffix.lower() in VIDEO_SUFFIXES:
        binary = _video_masks(source, total, start, end)
    else:
        raise ClipError(f"mask source {source} is neither a folder of images nor a video")
    any_on = False
    for i, m in enumerate(binary):
        out[i] = cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        any_on = any_on or bool(out[i].any())
    if not any_on:
        raise ClipError(f"the mask of object {name!r} ({source}) is empty in every frame "
                        f"{start}:{end} at the working size {size[0]}x{size[1]}")


def _read_mask_image(path: Path, name: str) -> np.ndarray:
    try:
        return read_image(path, native=True)
    except ClipError as e:
        raise ClipError(f"mask of object {name!r}: {e}") from None


def _video_masks(source: Path, total: int, start: int, end: int) -> list[np.ndarray]:
    stream = open_video(source)
    kept: list[np.ndarray] = []
    count = 0
    try:
        for index, rgb8 in enumerate(stream.frames):
            count = index + 1
            if start <= index < end:
                kept.append(rgb8.max(axis=2) > 127)
    finally:
        stream.close()
    if count != total:
        raise ClipError(f"mask video {source} has {count} frames but the clip has {total} frames: "
                        "give one mask per frame")
    return kept
