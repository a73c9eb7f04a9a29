"""Strip and frame-range arithmetic for the VSE side, without bpy.

Conventions (checked against bpy 5.0.1, see docs/addon.md "Frames"):

* A strip shows source frame ``i`` (0-based) at timeline frame ``frame_start + i``
  (no speed effects or retiming).
* The visible part is ``[final_start, final_end)`` on the timeline: ``final_end``
  is exclusive, as ``Strip.frame_final_end`` is.
* A source range is ``(start, stop)`` with ``stop`` exclusive, in 0-based source
  frame indices (movie frames, or image-strip elements).
* Channels are 1..128.

The bpy shell turns a ``bpy.types.Strip`` into a :class:`StripInfo` (one place
that reads strip timing) and everything else is plain arithmetic tested with
plain pytest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

MAX_CHANNEL = 128
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".exr", ".tif", ".tiff", ".bmp", ".webp")


class StripError(ValueError):
    """A strip or frame range cannot be used; the message says what to do."""


@dataclass(frozen=True)
class StripInfo:
    name: str
    kind: str  # "MOVIE" or "IMAGE"
    channel: int
    frame_start: int  # timeline frame of source frame 0
    final_start: int  # first visible timeline frame
    final_end: int  # exclusive
    source_length: int  # frames in the source (movie length / number of elements)
    source: str  # absolute movie path, or absolute image directory
    files: tuple[str, ...] = field(default=())  # image-strip element file names, in order

    # ---------------------------------------------------------------- ranges
    def visible_source_range(self) -> tuple[int, int]:
        """Source frames the strip shows on the timeline, ``[a, b)``."""
        a = max(0, self.final_start - self.frame_start)
        b = min(self.source_length, self.final_end - self.frame_start)
        return a, max(a, b)

    def timeline_to_source(self, frame: int) -> int:
        return frame - self.frame_start

    def source_to_timeline(self, index: int) -> int:
        return self.frame_start + index

    def frame_file(self, index: int) -> str:
        """The file shown for source frame ``index`` (image strips only)."""
        if self.kind != "IMAGE":
            raise StripError(f"strip {self.name!r} is a {self.kind.lower()} strip, not an image sequence")
        return os.path.join(self.source, self.files[index])


def source_range(
    info: StripInfo,
    timeline_range: Optional[tuple[int, int]] = None,
    max_frames: Optional[int] = None,
) -> tuple[int, int]:
    """The source frames to decompose: the strip's visible frames, intersected with
    ``timeline_range`` (``[first, last]`` inclusive timeline frames, e.g. the scene's
    frame range) when given, and cut to ``max_frames`` frames from the start."""
    a, b = info.visible_source_range()
    if timeline_range is not None:
        first, last = timeline_range
        if last < first:
            raise StripError(f"the frame range {first}-{last} is empty: the end is before the start")
        a = max(a, info.timeline_to_source(first))
        b = min(b, info.timeline_to_source(last) + 1)
    if b - a < 2:
        raise StripError(
            f"strip {info.name!r} has {max(0, b - a)} frame(s) in the chosen range; a decomposition "
            "needs at least 2: widen the scene frame range or pick another strip")
    if max_frames is not None and max_frames > 0 and b - a > max_frames:
        b = a + max_frames
    return a, b


def render_placement(info: StripInfo, src_range: tuple[int, int]) -> tuple[int, int]:
    """Timeline ``[start, end)`` where a render of source frames ``src_range`` lines up
    with the source strip frame for frame."""
    a, b = src_range
    return info.source_to_timeline(a), info.source_to_timeline(b)


def free_channel(
    occupied: Iterable[tuple[int, int, int]],
    start: int,
    end: int,
    above: int,
    ignore_channel_intervals: Iterable[tuple[int, int, int]] = (),
) -> int:
    """The lowest channel strictly above ``above`` with nothing in ``[start, end)``.

    ``occupied`` holds ``(channel, start, end)`` of every strip (``end`` exclusive);
    entries in ``ignore_channel_intervals`` are treated as free (a previous render
    that is about to be replaced)."""
    ignore = set(ignore_channel_intervals)
    busy: dict[int, list[tuple[int, int]]] = {}
    for ch, s, e in occupied:
        if (ch, s, e) in ignore:
            continue
        busy.setdefault(ch, []).append((s, e))
    for ch in range(max(1, above + 1), MAX_CHANNEL + 1):
        if all(e <= start or s >= end for s, e in busy.get(ch, ())):
            return ch
    raise StripError(f"no free VSE channel above {above} for frames {start}-{end - 1}: "
                     "delete or move strips above the source")


_NUM = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders frame_2 before frame_10."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in _NUM.split(name))


def list_frames(directory: str) -> list[str]:
    """Image files in ``directory`` in natural order (how a folder of frames is read)."""
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise StripError(f"cannot read the frame folder {directory!r}: {e.strerror or e}") from None
    return sorted((n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(directory, n))), key=natural_key)


def folder_range(folder_files: Sequence[str], strip_files: Sequence[str],
                 src_range: tuple[int, int]) -> tuple[int, int]:
    """Map an image strip's source range onto indices of its folder's frames.

    The backend reads a folder of frames in natural order; an image strip may show
    only some of them. The strip's frames ``src_range`` must be a contiguous run of
    the folder, else the clip cannot be described as folder + range."""
    a, b = src_range
    wanted = list(strip_files[a:b])
    if not wanted:
        raise StripError("the image strip has no frames in the chosen range")
    index = {n: i for i, n in enumerate(folder_files)}
    try:
        first = index[wanted[0]]
    except KeyError:
        raise StripError(f"frame {wanted[0]!r} of the image strip is not in its folder: "
                         "was it moved or renamed?") from None
    if list(folder_files[first:first + len(wanted)]) != wanted:
        raise StripError(
            "the image strip's frames are not a contiguous run of its folder's files in name "
            "order; render the strip to an image sequence first (Render > Render Animation)")
    return first, first + len(wanted)


def mask_folders(root: str) -> list[str]:
    """Object mask folders under ``root``, sorted by name (the backend's layer order).

    ``root`` may be a seed-layout ``masks/`` folder holding one sub-folder per object,
    or a single object's folder of frames."""
    if not os.path.isdir(root):
        raise StripError(f"mask folder {root!r} does not exist")
    subs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    subs = [d for d in subs if list_frames(os.path.join(root, d))]
    if subs:
        return [os.path.join(root, d) for d in subs]
    if list_frames(root):
        return [root]
    raise StripError(f"mask folder {root!r} has no image frames and no object sub-folders")


def seed_masks_for(directory: str) -> Optional[str]:
    """For a seed-layout clip (``<clip>/video_frames``), its ``<clip>/masks`` folder."""
    d = os.path.normpath(directory)
    if os.path.basename(d) == "video_frames":
        m = os.path.join(os.path.dirname(d), "masks")
        if os.path.isdir(m):
            return m
    return None


def format_duration(seconds: Optional[float]) -> str:
    """``95 -> '1m 35s'``; for ETAs in the panel."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "--"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"
