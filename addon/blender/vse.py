"""VSE helpers: the one place that reads strip timing, and render placement.

Blender 5.0 API (``SequenceEditor.strips``, ``bpy.types.Strip``,
``context.sequencer_scene``), with cheap fallbacks for 4.2/4.3 where the old
names still exist (looked up with getattr, never spelled as attributes).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, cast

import bpy

from ..core import strips as S

KEY_RENDER_OF = "neural_atlas_render_of"  # custom prop on a render strip: the decomposition job id
KEY_RENDER_JOB = "neural_atlas_render_job"  # the render job id that produced it
KEY_SOURCE_RANGE = "neural_atlas_source_range"


def sequencer_scene(context: Optional[bpy.types.Context] = None) -> bpy.types.Scene:
    """The scene whose VSE the artist works in: ``context.sequencer_scene`` (5.0+),
    else the context's scene."""
    ctx = context or bpy.context
    scene = getattr(ctx, "sequencer_scene", None) or ctx.scene
    if scene is None:
        scene = bpy.data.scenes[0]
    return scene


def ensure_editor(scene: bpy.types.Scene) -> bpy.types.SequenceEditor:
    ed = scene.sequence_editor
    if ed is None:
        ed = scene.sequence_editor_create()
    return ed


def all_strips(scene: bpy.types.Scene) -> list[bpy.types.Strip]:
    ed = scene.sequence_editor
    if ed is None:
        return []
    coll = getattr(ed, "strips_all", None)
    if coll is None:  # Blender < 4.4
        coll = getattr(ed, "sequences_all")
    return list(coll)


def top_level(ed: bpy.types.SequenceEditor) -> Any:
    coll = getattr(ed, "strips", None)
    if coll is None:  # Blender < 4.4
        coll = getattr(ed, "sequences")
    return coll


def active_strip(scene: bpy.types.Scene) -> Optional[bpy.types.Strip]:
    ed = scene.sequence_editor
    if ed is None:
        return None
    s = ed.active_strip
    if s is not None and s.type in ("MOVIE", "IMAGE"):
        return s
    return None


def find_strip(scene: bpy.types.Scene, name: str) -> Optional[bpy.types.Strip]:
    for s in all_strips(scene):
        if s.name == name:
            return s
    return None


def strip_info(strip: bpy.types.Strip) -> S.StripInfo:
    """Read a movie or image strip's timing and source (the only place that does)."""
    if strip.type == "MOVIE":
        ms = cast(bpy.types.MovieStrip, strip)
        source = os.path.abspath(bpy.path.abspath(ms.filepath))
        files: tuple[str, ...] = ()
    elif strip.type == "IMAGE":
        im = cast(bpy.types.ImageStrip, strip)
        source = os.path.abspath(bpy.path.abspath(im.directory))
        files = tuple(e.filename for e in im.elements)
    else:
        raise S.StripError(f"strip {strip.name!r} is a {strip.type.lower()} strip; pick a movie or "
                           "image-sequence strip (or render this one to an image sequence first)")
    return S.StripInfo(
        name=strip.name, kind=strip.type, channel=int(strip.channel),
        frame_start=int(round(strip.frame_start)),
        final_start=int(strip.frame_final_start), final_end=int(strip.frame_final_end),
        source_length=int(strip.frame_duration), source=source, files=files)


def occupied(scene: bpy.types.Scene) -> list[tuple[int, int, int]]:
    return [(int(s.channel), int(s.frame_final_start), int(s.frame_final_end)) for s in all_strips(scene)]


def previous_renders(scene: bpy.types.Scene, decompose_job: str) -> list[bpy.types.Strip]:
    return [s for s in all_strips(scene) if s.get(KEY_RENDER_OF) == decompose_job]


class _CacheOff:
    """Prefetch/cache off while the strip list changes (a known race with the prefetch thread)."""

    def __init__(self, ed: bpy.types.SequenceEditor) -> None:
        self.ed = ed
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> "_CacheOff":
        for k in ("use_prefetch", "use_cache_raw", "use_cache_final"):
            if hasattr(self.ed, k):
                self.saved[k] = getattr(self.ed, k)
                setattr(self.ed, k, False)
        return self

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            setattr(self.ed, k, v)


def place_render(scene: bpy.types.Scene, source: S.StripInfo, src_range: tuple[int, int],
                 frames: list[str], movie: Optional[str], decompose_job: str, render_job: str,
                 name: str) -> bpy.types.Strip:
    """Put a render into the VSE on a free channel above the source, aligned frame for
    frame with it, replacing the previous render of the same decomposition.

    ``frames`` are the rendered image files in order (preferred: exact frames); when
    empty, ``movie`` is used."""
    ed = ensure_editor(scene)
    start, end = S.render_placement(source, src_range)
    old = previous_renders(scene, decompose_job)
    old_channels = [int(s.channel) for s in old]
    with _CacheOff(ed):
        for s in old:
            top_level(ed).remove(s)
        ignore: list[tuple[int, int, int]] = []
        channel = S.free_channel(occupied(scene), start, end, above=source.channel,
                                 ignore_channel_intervals=ignore)
        # keep the artist's channel choice if the old render's channel is still free
        for ch in old_channels:
            if ch > source.channel and all(c != ch or e <= start or s0 >= end for c, s0, e in occupied(scene)):
                channel = ch
                break
        coll = top_level(ed)
        if frames:
            d = os.path.dirname(frames[0])
            strip = coll.new_image(name=name, filepath=frames[0], channel=channel, frame_start=start,
                                   fit_method="FIT")
            ims = cast(bpy.types.ImageStrip, strip)
            for f in frames[1:]:
                if os.path.dirname(f) != d:
                    raise S.StripError("rendered frames must be in one folder")
                ims.elements.append(os.path.basename(f))
            ims.colorspace_settings.name = "sRGB"
        elif movie:
            strip = coll.new_movie(name=name, filepath=movie, channel=channel, frame_start=start,
                                   fit_method="FIT")
        else:
            raise S.StripError("the render produced neither frames nor a movie")
        # exactly the source range, even if the file holds more frames
        strip.frame_final_duration = end - start
    strip[KEY_RENDER_OF] = decompose_job
    strip[KEY_RENDER_JOB] = render_job
    strip[KEY_SOURCE_RANGE] = list(src_range)
    return strip


def add_source_strip(scene: bpy.types.Scene, path: str, channel: int = 1, frame_start: int = 1,
                     name: Optional[str] = None) -> bpy.types.Strip:
    """Put a clip into the VSE: a movie file, or a folder / first file of an image sequence."""
    ed = ensure_editor(scene)
    coll = top_level(ed)
    if os.path.isdir(path):
        files = S.list_frames(path)
        if not files:
            raise S.StripError(f"no image frames in {path!r}")
        strip = coll.new_image(name=name or os.path.basename(os.path.normpath(path)),
                               filepath=os.path.join(path, files[0]), channel=channel,
                               frame_start=frame_start, fit_method="FIT")
        ims = cast(bpy.types.ImageStrip, strip)
        for f in files[1:]:
            ims.elements.append(f)
        return strip
    return coll.new_movie(name=name or os.path.basename(path), filepath=path, channel=channel,
                          frame_start=frame_start, fit_method="FIT")


def fit_scene_to_strip(scene: bpy.types.Scene, strip: bpy.types.Strip, size: Optional[tuple[int, int]] = None) -> None:
    """Scene frame range (and optionally resolution) matching a strip."""
    scene.frame_start = int(strip.frame_final_start)
    scene.frame_end = int(strip.frame_final_end) - 1
    if size:
        scene.render.resolution_x, scene.render.resolution_y = int(size[0]), int(size[1])
        scene.render.resolution_percentage = 100


def iter_areas(kind: str) -> Iterator[tuple[bpy.types.Window, bpy.types.Area]]:
    wm = bpy.context.window_manager
    if wm is None:
        return
    for win in wm.windows:
        for area in win.screen.areas:
            if area.type == kind:
                yield win, area
