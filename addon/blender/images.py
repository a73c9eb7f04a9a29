"""Atlas and edit images: load, create, save, pixel I/O. Main thread only.

Conventions:
* Atlases (``out/atlas/layer_<i>.png``, RGBA 16-bit) load as float images; their
  colour space is set explicitly to sRGB (they hold the clip's colours) and their
  alpha is straight. They are never painted on.
* Each layer has an **edit image** of the atlas's size: RGBA, 8-bit, sRGB,
  straight alpha, fully transparent (0,0,0,0) when created, saved as a PNG file
  in the job's ``edits/`` folder. The backend blends it over the atlas using its
  alpha as coverage.
* ``image.pixels`` row 0 is the bottom row of the file; helpers here take and
  return arrays with row 0 at the TOP (as the PNG, and the backend, see them).
* Never ``reload()`` a dirty image: unsaved paint would be discarded.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional

import bpy
import numpy as np

ATLAS_COLORSPACE = "sRGB"
EDIT_COLORSPACE = "sRGB"
KEY_JOB = "neural_atlas_job"  # custom properties tagging our images
KEY_LAYER = "neural_atlas_layer"
KEY_ROLE = "neural_atlas_role"  # "atlas" | "edit"


def atlas_name(job_label: str, layer: int) -> str:
    return f"NA {job_label} atlas {layer}"


def edit_name(job_label: str, layer: int) -> str:
    return f"NA {job_label} edit {layer}"


def _tag(img: bpy.types.Image, job_id: str, layer: int, role: str) -> None:
    img[KEY_JOB] = job_id
    img[KEY_LAYER] = layer
    img[KEY_ROLE] = role


def find_image(job_id: str, layer: int, role: str) -> Optional[bpy.types.Image]:
    for img in bpy.data.images:
        if img.get(KEY_JOB) == job_id and img.get(KEY_LAYER) == layer and img.get(KEY_ROLE) == role:
            return img
    return None


def job_images(job_id: str, role: str) -> list[bpy.types.Image]:
    imgs = [i for i in bpy.data.images if i.get(KEY_JOB) == job_id and i.get(KEY_ROLE) == role]
    return sorted(imgs, key=lambda i: int(i.get(KEY_LAYER, 0)))


def load_atlas(path: str, job_id: str, layer: int, label: str) -> bpy.types.Image:
    """Load (or refresh) the atlas of ``layer``. An atlas is read-only for the artist,
    so refreshing it from disk after a re-decomposition loses nothing; a dirty atlas
    (painted on by mistake) is kept as it is rather than reloaded."""
    img = find_image(job_id, layer, "atlas")
    if img is not None and os.path.abspath(bpy.path.abspath(img.filepath)) == os.path.abspath(path):
        if not img.is_dirty:
            img.reload()
    else:
        img = bpy.data.images.load(path, check_existing=False)
        img.name = atlas_name(label, layer)
        _tag(img, job_id, layer, "atlas")
    img.colorspace_settings.name = ATLAS_COLORSPACE
    img.alpha_mode = "STRAIGHT"
    return img


def ensure_edit(job_id: str, layer: int, label: str, size: tuple[int, int], path: str) -> bpy.types.Image:
    """The edit image of ``layer``: reuse the one in the .blend, else load the saved
    PNG at ``path`` (edits survive a re-decomposition and a restart), else create a
    transparent one of ``size`` and save it to ``path`` right away."""
    img = find_image(job_id, layer, "edit")
    if img is None and os.path.isfile(path):
        img = bpy.data.images.load(path, check_existing=False)
        img.name = edit_name(label, layer)
        _tag(img, job_id, layer, "edit")
    if img is not None and tuple(img.size) != tuple(size):
        # the atlas size changed (new decomposition settings): scale the paint with it
        if img.is_dirty:
            save_image(img)
        img.scale(int(size[0]), int(size[1]))
        # saved at once: setting the colour space below reloads a file image from disk, which
        # would bring back the old size (and each layer's atlas may change size on its own)
        save_image(img)
    if img is None:
        img = bpy.data.images.new(edit_name(label, layer), int(size[0]), int(size[1]), alpha=True,
                                  float_buffer=False)
        img.generated_color = (0.0, 0.0, 0.0, 0.0)
        px = np.zeros(int(size[0]) * int(size[1]) * 4, np.float32)
        _pixels(img).foreach_set(px)
        _tag(img, job_id, layer, "edit")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img.filepath_raw = path
        img.file_format = "PNG"
        img.save()
    img.colorspace_settings.name = EDIT_COLORSPACE
    img.alpha_mode = "STRAIGHT"
    img.use_fake_user = True  # paint survives even if no editor shows the image
    return img


def save_image(img: bpy.types.Image) -> str:
    """Save ``img`` to its file (creating the folder); returns the absolute path."""
    path = bpy.path.abspath(img.filepath_raw or img.filepath)
    if not path:
        raise RuntimeError(f"image {img.name!r} has no file path to save to")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if img.source == "GENERATED":
        img.filepath_raw = path
        img.file_format = "PNG"
    img.save()
    return path


def save_dirty(images: Iterable[bpy.types.Image]) -> list[str]:
    """Save every dirty image (paint is never lost); returns the saved paths."""
    saved = []
    for img in images:
        if img.is_dirty or img.source == "GENERATED" or not os.path.isfile(bpy.path.abspath(img.filepath)):
            saved.append(save_image(img))
    return saved


def _pixels(img: bpy.types.Image) -> Any:
    """``Image.pixels`` (a bpy_prop_array; the stubs type it as float)."""
    return img.pixels


def pixels(img: bpy.types.Image, buffer: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W, C) float32 as Blender holds them, row 0 = the BOTTOM; read into ``buffer`` (a flat
    float32 array at least that large, reused by the caller) when given."""
    w, h = img.size
    n = w * h * img.channels
    a = np.empty(n, np.float32) if buffer is None else buffer[:n]
    _pixels(img).foreach_get(a)
    return a.reshape(h, w, img.channels)


def to_array(img: bpy.types.Image) -> np.ndarray:
    """(H, W, 4) float32, row 0 = top of the image."""
    return np.flipud(pixels(img))


def file_pixels(path: str) -> np.ndarray:
    """A file's pixels as stored, (H, W, C) float32 with the BOTTOM row first (Blender's order),
    read through a temporary Non-Color, channel-packed image (no colour conversion, no
    premultiplication) that is removed again."""
    tmp = bpy.data.images.load(bpy.path.abspath(path), check_existing=False)
    try:
        tmp.colorspace_settings.name = "Non-Color"
        tmp.alpha_mode = "CHANNEL_PACKED"
        return pixels(tmp)
    finally:
        bpy.data.images.remove(tmp)


def write_array(img: bpy.types.Image, a: np.ndarray) -> None:
    """Write (H, W, 4) float32 pixels, row 0 = top, into ``img`` (marks it dirty)."""
    w, h = img.size
    if a.shape != (h, w, 4):
        raise ValueError(f"expected an array of shape {(h, w, 4)}, got {a.shape}")
    _pixels(img).foreach_set(np.ascontiguousarray(np.flipud(a), dtype=np.float32).ravel())
    img.update()


def paint_rect(img: bpy.types.Image, top: int, left: int, height: int, width: int,
               rgba: tuple[float, float, float, float]) -> None:
    """Fill a rectangle given in top-down pixel coordinates (a programmatic brush stroke)."""
    a = to_array(img)
    a[top:top + height, left:left + width] = np.asarray(rgba, np.float32)
    write_array(img, a)
