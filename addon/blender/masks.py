"""Rasterise Blender Mask datablocks into per-frame PNG folders for the backend.

Each Mask becomes ``<dest>/<index>_<name>/%05d.png`` (white = object), one file
per source frame of the decomposed range, at the clip's size. The Mask is
evaluated at the timeline frame where the source strip shows that frame, so a
mask drawn over the strip lines up with it. Rasterisation goes through a
temporary scene's sequencer (a mask strip), which works headless too. The files keep
Blender's antialiased edges; the backend binarises masks at 0.5, which also drops the
faint stray pixel Blender's mask render sometimes leaves near a frame corner.
"""

from __future__ import annotations

import os
import shutil

import bpy

from ..core import strips as S
from . import images, vse


def rasterise(masks: list[bpy.types.Mask], info: S.StripInfo, src_range: tuple[int, int],
              size: tuple[int, int], dest: str, first_index: int = 0) -> list[str]:
    """Write one folder per mask; returns the folders in layer order (as given).

    Files are numbered from ``first_index`` (the range start in the backend's clip);
    frames before it are written blank so the folder lines up with the clip."""
    if not masks:
        return []
    os.makedirs(dest, exist_ok=True)
    a, b = src_range
    first, last = info.source_to_timeline(a), info.source_to_timeline(b) - 1
    tmp = bpy.data.scenes.new("NA mask raster")
    folders = []
    try:
        r = tmp.render
        r.resolution_x, r.resolution_y = int(size[0]), int(size[1])
        r.resolution_percentage = 100
        if hasattr(r.image_settings, "media_type"):
            r.image_settings.media_type = "IMAGE"
        r.image_settings.file_format = "PNG"
        r.image_settings.color_mode = "BW"
        r.use_sequencer = True
        r.use_compositing = False
        tmp.display_settings.display_device = "sRGB"
        tmp.view_settings.view_transform = "Standard"
        ed = vse.ensure_editor(tmp)
        for k, m in enumerate(masks):
            folder = os.path.join(dest, f"{k:02d}_{bpy.path.clean_name(m.name)}")
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            os.makedirs(folder)
            strip = vse.top_level(ed).new_mask(name=f"mask{k}", mask=m, channel=1, frame_start=first)
            strip.frame_final_duration = last - first + 1
            for i, frame in enumerate(range(first, last + 1)):
                tmp.frame_set(frame)
                r.filepath = os.path.join(folder, f"{first_index + i:05d}.png")
                with bpy.context.temp_override(scene=tmp):
                    bpy.ops.render.render(write_still=True, scene=tmp.name)
            vse.top_level(ed).remove(strip)
            if first_index:
                blank = os.path.join(folder, f"{first_index:05d}.png")
                img = bpy.data.images.load(blank, check_existing=False)
                images._pixels(img).foreach_set([0.0, 0.0, 0.0, 1.0] * (img.size[0] * img.size[1]))
                for j in range(first_index):
                    img.save(filepath=os.path.join(folder, f"{j:05d}.png"), save_copy=True)
                bpy.data.images.remove(img)
            folders.append(folder)
    finally:
        bpy.data.scenes.remove(tmp)
    return folders
