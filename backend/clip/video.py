"""Sequential video decoding and H.264 encoding through PyAV or imageio-ffmpeg.

Both libraries are optional extras (``pip install neural-atlas[video]``) and are
imported only when a video is read or written. Decoding is strictly sequential
(no seeking, which is unreliable on many files); callers stop iterating when
they have what they need.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ClipError

#: Video libraries in order of preference ("auto" picks the first one installed).
LIBRARIES = ("av", "imageio-ffmpeg")
#: File suffixes read as videos (lower case).
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")

_MODULES = {"av": "av", "imageio-ffmpeg": "imageio_ffmpeg"}
_CRF = "15"  # x264 constant rate factor: visually lossless for previews and edits


@dataclass
class VideoStream:
    """An open video: metadata plus a one-shot iterator of uint8 RGB ``(H, W, 3)`` frames.

    ``count_hint`` is the container's frame count (0 when unknown); it is only a
    hint, the true count is what ``frames`` yields. Exhaust or ``close()`` it.
    """

    path: Path
    fps: Optional[float]
    count_hint: int
    frames: Iterator[np.ndarray]
    library: str

    def close(self) -> None:
        close = getattr(self.frames, "close", None)
        if close is not None:
            close()


def available_library(preferred: Optional[str] = None) -> Optional[str]:
    """The video library to use: ``preferred`` if installed, else the first installed, else None."""
    names = (preferred,) if preferred else LIBRARIES
    for name in names:
        if name not in _MODULES:
            raise ValueError(f"unknown video library {name!r}; choose one of {', '.join(LIBRARIES)}")
        if importlib.util.find_spec(_MODULES[name]) is not None:
            return name
    return None


def writer_library(preferred: Optional[str] = None) -> Optional[str]:
    """The library to encode H.264 with: like :func:`available_library`, but a PyAV
    build without an H.264 encoder does not count."""
    for name in ((preferred,) if preferred else LIBRARIES):
        if available_library(name) and (name != "av" or _av_h264_codec() is not None):
            return name
    return None


def open_video(path: Path, library: Optional[str] = None) -> VideoStream:
    """Open ``path`` for sequential decoding; raises :class:`ClipError` naming the file."""
    name = available_library(library)
    if name is None:
        wanted = library or " or ".join(LIBRARIES)
        raise ClipError(f"cannot read video {path}: {wanted} is not installed "
                        "(pip install 'neural-atlas[video]'), or convert it to a folder of PNG frames")
    return _open_av(path) if name == "av" else _open_imageio_ffmpeg(path)


def encode_h264(path: Path, frames: Iterator[np.ndarray], fps: float, library: str) -> int:
    """Encode uint8 RGB frames (at least one, even size) into an H.264 yuv420p file.

    Returns the number of frames written.

    Raises OSError (or a library error converted to OSError) when writing fails.
    """
    if library == "av":
        return _encode_av(path, frames, fps)
    return _encode_imageio_ffmpeg(path, frames, fps)


# ---------------------------------------------------------------------- PyAV
def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.error.FFmpegError, OSError, ValueError)


def _open_av(path: Path) -> VideoStream:
    import av

    errors = _av_errors()
    try:
        container = av.open(str(path))
    except errors as e:
        raise ClipError(f"cannot read video {path}: {e}") from None
    if not container.streams.video:
        container.close()
        raise ClipError(f"cannot read video {path}: the file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else None

    def frames() -> Iterator[np.ndarray]:
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except errors as e:
            raise ClipError(f"cannot decode video {path}: {e}") from None
        finally:
            container.close()

    return VideoStream(path, fps, int(stream.frames or 0), frames(), "av")


def _av_h264_codec() -> Optional[str]:
    import av

    for name in ("libx264", "libopenh264"):
        try:
            av.codec.Codec(name, "w")
        except _av_errors():
            continue
        return name
    return None


def _encode_av(path: Path, frames: Iterator[np.ndarray], fps: float) -> int:
    import av

    codec = _av_h264_codec()
    if codec is None:
        raise OSError("this PyAV build has no H.264 encoder (libx264 or libopenh264)")
    count = 0
    try:
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": _CRF}
            for rgb in frames:
                if count == 0:
                    stream.height, stream.width = rgb.shape[:2]
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                container.mux(stream.encode(frame))
                count += 1
            container.mux(stream.encode(None))
    except av.error.FFmpegError as e:
        raise OSError(str(e)) from None
    return count


# ----------------------------------------------------------- imageio-ffmpeg
def _open_imageio_ffmpeg(path: Path) -> VideoStream:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as e:
        reader.close()
        raise ClipError(f"cannot read video {path}: {e}") from None
    w, h = meta["size"]
    fps = float(meta.get("fps") or 0) or None
    duration = float(meta.get("duration") or 0)
    count_hint = int(round(duration * fps)) if fps and duration > 0 else 0

    def frames() -> Iterator[np.ndarray]:
        try:
            for raw in reader:
                yield np.frombuffer(raw, np.uint8).reshape(h, w, 3)
        except (OSError, RuntimeError, ValueError) as e:
            raise ClipError(f"cannot decode video {path}: {e}") from None
        finally:
            reader.close()

    return VideoStream(path, fps, count_hint, frames(), "imageio-ffmpeg")


def _encode_imageio_ffmpeg(path: Path, frames: Iterator[np.ndarray], fps: float) -> int:
    import imageio_ffmpeg

    writer = None
    count = 0
    try:
        for rgb in frames:
            if writer is None:
                h, w = rgb.shape[:2]
                # codec None: imageio-ffmpeg picks its first working H.264 encoder;
                # quality 7 is crf 15 for libx264
                writer = imageio_ffmpeg.write_frames(
                    str(path), (w, h), fps=float(fps), codec=None, quality=7,
                    pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
                    macro_block_size=1, ffmpeg_log_level="error")
                writer.send(None)
            writer.send(rgb)
            count += 1
    except RuntimeError as e:
        raise OSError(str(e)) from None
    finally:
        if writer is not None:
            writer.close()
    return count
