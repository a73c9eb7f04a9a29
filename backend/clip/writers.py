"""Reading single images and writing images, image sequences and videos.

Every writer creates its parent folders, writes to a temporary file next to the
target and moves it into place with ``os.replace`` (so a crash never leaves a
half-written file under the final name), and raises
:class:`backend.errors.OutputError` naming the path when it cannot write.

Pixel conventions: float images are RGB(A) in [0, 1]; values outside are
clipped and NaN is written as 0. Files go through OpenCV, which stores BGR(A);
the channel swap happens here and nowhere else.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Iterator, Union

import cv2
import numpy as np

from ..errors import ClipError, OutputError
from . import video as _video

PathLike = Union[str, os.PathLike]

__all__ = [
    "read_image",
    "write_png",
    "write_png16_rgba",
    "write_image_sequence",
    "write_video",
]


# --------------------------------------------------------------------- reading
def read_image(path: PathLike, *, native: bool = False) -> np.ndarray:
    """Read an image file as float32 RGB ``(H, W, 3)`` or RGBA ``(H, W, 4)`` in [0, 1].

    8-bit files are divided by 255 and 16-bit files by 65535; float files
    (EXR/TIFF) are returned as stored. Grayscale becomes RGB by replication and
    gray+alpha becomes RGBA. With ``native=True`` the channels are arranged the
    same way but the values keep the file's type (uint8, uint16; float files as
    float32): what ``load_clip`` stores. Raises :class:`ClipError` naming the file
    when it is missing, unreadable or of an unsupported pixel type.
    """
    p = Path(path)
    try:
        data = np.fromfile(p, dtype=np.uint8)  # works with non-ASCII paths on Windows
    except FileNotFoundError:
        raise ClipError(f"image not found: {p}") from None
    except OSError as e:
        raise ClipError(f"cannot read image {p}: {e.strerror or e}") from None
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ClipError(f"cannot read image {p}: the file is empty, corrupt or not an image")
    return _to_float_rgb(img, p, native)


def _to_float_rgb(img: np.ndarray, p: Path, native: bool = False) -> np.ndarray:
    if native and img.dtype in (np.uint8, np.uint16):
        out = img
    elif img.dtype == np.uint8:
        out = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        out = img.astype(np.float32) / 65535.0
    elif img.dtype in (np.float32, np.float64, np.float16):
        out = img.astype(np.float32)
    else:
        raise ClipError(f"cannot read image {p}: unsupported pixel type {img.dtype}")
    if out.ndim == 2:
        return np.repeat(out[:, :, None], 3, axis=2)
    channels = out.shape[2]
    if channels == 1:
        return np.repeat(out, 3, axis=2)
    if channels == 2:  # gray + alpha
        return np.concatenate([np.repeat(out[:, :, :1], 3, axis=2), out[:, :, 1:]], axis=2)
    if channels == 3:
        return np.ascontiguousarray(out[:, :, ::-1])
    if channels == 4:
        return np.ascontiguousarray(out[:, :, [2, 1, 0, 3]])
    raise ClipError(f"cannot read image {p}: unsupported channel count {channels}")


# --------------------------------------------------------------------- writing
def write_png(path: PathLike, rgb: np.ndarray) -> Path:
    """Write an 8-bit PNG from a float image in [0, 1]: gray ``(H, W)``, RGB or RGBA.

    uint8 input is written unchanged. Returns the path written.
    """
    return _write_encoded(Path(path), _encode_png(_to_uint(rgb, np.uint8)))


def write_png16_rgba(path: PathLike, rgba: np.ndarray) -> Path:
    """Write a 16-bit RGBA PNG from a float ``(H, W, 4)`` image in [0, 1].

    An RGB image gets an opaque alpha channel. Returns the path written.
    """
    rgba = np.asarray(rgba)
    if rgba.ndim != 3 or rgba.shape[2] not in (3, 4):
        raise ValueError(f"write_png16_rgba needs an (H, W, 3|4) image, got shape {rgba.shape}")
    if rgba.shape[2] == 3:
        rgba = np.concatenate([rgba, np.ones(rgba.shape[:2] + (1,), rgba.dtype)], axis=2)
    return _write_encoded(Path(path), _encode_png(_to_uint(rgba, np.uint16)))


def write_json(path: PathLike, data) -> Path:
    """Write ``data`` as indented JSON, atomically (a crash leaves the old file or the new one)."""
    return _write_encoded(Path(path), json.dumps(data, indent=1).encode("utf-8"))


def write_image_sequence(folder: PathLike, frames: Iterable[np.ndarray],
                         pattern: str = "%05d.png") -> Path:
    """Write frames as 8-bit PNGs ``folder/(pattern % i)``, i from 0; returns the folder.

    ``frames`` is an array ``(N, H, W, C)`` or any iterable of images (see :func:`write_png`).
    """
    folder = Path(folder)
    _make_dirs(folder)
    for i, frame in enumerate(frames):
        write_png(folder / (pattern % i), frame)
    return folder


def write_video(path: PathLike, frames: Iterable[np.ndarray], fps: float,
                *, encoder: str = "auto") -> Path:
    """Write an H.264 mp4 (yuv420p) and return the path actually written.

    ``frames``: an array ``(N, H, W, 3)`` or an iterable of ``(H, W, 3)`` float
    RGB frames in [0, 1] (uint8 is taken as is). Odd widths/heights are padded
    by one replicated row/column, as H.264 in yuv420p needs even sizes.

    ``encoder``: ``"auto"`` tries PyAV, then imageio-ffmpeg, and when neither
    is installed (with an H.264 encoder) writes a PNG sequence ``path.with_suffix("")/%05d.png``
    instead; ``"av"``, ``"imageio-ffmpeg"`` or ``"png"`` force one. Callers
    must report the returned path, which is the folder in the PNG case.
    """
    path = Path(path)
    if not fps > 0:
        raise ValueError(f"write_video needs fps > 0, got {fps!r}")
    if encoder not in ("auto", "png") + _video.LIBRARIES:
        raise ValueError(f"unknown video encoder {encoder!r}; choose auto, png or "
                         + ", ".join(_video.LIBRARIES))
    library = None
    if encoder != "png":
        library = _video.writer_library(None if encoder == "auto" else encoder)
        if library is None and encoder != "auto":
            raise OutputError(f"cannot write {path}: {encoder} is not installed "
                              "or has no H.264 encoder")
    if library is None:
        return write_image_sequence(path.with_suffix(""), frames)

    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError(f"write_video got no frames for {path}")
    u8 = (_even(_to_uint(f, np.uint8)) for f in itertools.chain([first], it))
    with replacing(path, "video") as tmp:
        _video.encode_h264(tmp, u8, float(fps), library)
    return path


# --------------------------------------------------------------------- helpers
def _to_uint(img: np.ndarray, dtype: type) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == dtype:
        return img
    top = np.iinfo(dtype).max
    x = np.nan_to_num(img.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(x, 0.0, 1.0) * top + 0.5).astype(dtype)


def _even(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        frame = np.repeat(frame[:, :, None], 3, axis=2)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"video frames must be (H, W, 3) RGB, got shape {frame.shape}")
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


def _encode_png(img: np.ndarray) -> bytes:
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[:, :, ::-1]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, [2, 1, 0, 3]]
    elif img.ndim != 2:
        raise ValueError(f"cannot write an image of shape {img.shape} as PNG")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {img.shape} as PNG")
    return buf.tobytes()


def _make_dirs(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {folder}: {e.strerror or e}") from None


def _tmp_path(path: Path) -> Path:
    """A hidden sibling of ``path`` with the same suffix (encoders pick formats by suffix)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


@contextlib.contextmanager
def replacing(path: PathLike, what: str = "") -> Iterator[Path]:
    """Write a file atomically: the body writes the yielded temporary path (same folder, same
    suffix), which then replaces ``path``; on any error the temporary file is removed and
    ``path`` keeps its old content. OS errors become :class:`OutputError`."""
    path = Path(path)
    _make_dirs(path.parent)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {what + ' ' if what else ''}{path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_encoded(path: Path, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return path
