"""Per-scene settings and job records (saved with the .blend so jobs re-attach)."""

from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty,
                       PointerProperty, StringProperty)

from .prefs import PRESET_ITEMS

MASK_MODES = [
    ("NONE", "None", "No object masks: the shot is decomposed into background layers only"),
    ("FOLDER", "Mask folders", "A folder of per-object mask image sequences (one sub-folder per "
                               "object, sorted by name), or one object's folder"),
    ("MASK", "Blender masks", "Mask datablocks, one per object, rasterised per frame"),
]


class NA_MaskItem(bpy.types.PropertyGroup):
    mask: PointerProperty(type=bpy.types.Mask, name="Mask")  # type: ignore[valid-type]


class NA_JobItem(bpy.types.PropertyGroup):
    job_id: StringProperty(name="Job")  # type: ignore[valid-type]
    token: StringProperty()  # type: ignore[valid-type]
    kind: StringProperty(default="decompose")  # type: ignore[valid-type]
    label: StringProperty(name="Label")  # type: ignore[valid-type]
    state: StringProperty(default="queued")  # type: ignore[valid-type]
    phase: StringProperty()  # type: ignore[valid-type]
    fraction: FloatProperty(min=0.0, max=1.0, subtype="FACTOR")  # type: ignore[valid-type]
    eta_s: FloatProperty(default=-1.0)  # type: ignore[valid-type]
    psnr: FloatProperty(default=0.0)  # type: ignore[valid-type]
    iteration: IntProperty()  # type: ignore[valid-type]
    iterations: IntProperty()  # type: ignore[valid-type]
    message: StringProperty()  # type: ignore[valid-type]
    error: StringProperty()  # type: ignore[valid-type]
    hint: StringProperty()  # type: ignore[valid-type]
    # what was decomposed
    strip_name: StringProperty()  # type: ignore[valid-type]
    source: StringProperty(subtype="FILE_PATH")  # type: ignore[valid-type]
    range_start: IntProperty()  # type: ignore[valid-type]
    range_stop: IntProperty()  # type: ignore[valid-type]
    preset: StringProperty()  # type: ignore[valid-type]
    out_dir: StringProperty(subtype="DIR_PATH")  # type: ignore[valid-type]
    n_layers: IntProperty()  # type: ignore[valid-type]
    atlases_loaded: BoolProperty()  # type: ignore[valid-type]
    shot: StringProperty()  # type: ignore[valid-type]
    src_channel: IntProperty()  # type: ignore[valid-type]
    src_frame_start: IntProperty()  # type: ignore[valid-type]
    mask_count: IntProperty()  # type: ignore[valid-type]
    # a render job: its decomposition and the strip it produced
    parent: StringProperty()  # type: ignore[valid-type]
    render_strip: StringProperty()  # type: ignore[valid-type]
    placed: BoolProperty()  # type: ignore[valid-type]
    # a paint_frame job: the folder with what it painted over (to tell its paint from the rest)
    paint_base: StringProperty(subtype="DIR_PATH")  # type: ignore[valid-type]
    # the backend does not share this machine's files: inputs were uploaded, results are downloaded
    remote: BoolProperty()  # type: ignore[valid-type]


class NA_EditLayer(bpy.types.PropertyGroup):
    """One layer's edit lifetime (``name`` is the layer index). Frames are timeline frames;
    ``opacity`` is animatable: keyframe it and Render Edit and the live preview sample it."""

    use_range: BoolProperty(  # type: ignore[valid-type]
        name="Frame range", default=False,
        description="Show this layer's edit only from Start to End (timeline frames); off: the whole shot")
    frame_start: IntProperty(name="Start", description="First timeline frame the edit shows on")  # type: ignore[valid-type]
    frame_end: IntProperty(name="End", description="Last timeline frame the edit shows on")  # type: ignore[valid-type]
    fade_in: IntProperty(  # type: ignore[valid-type]
        name="Fade in", min=0, soft_max=240, description="Frames over which the edit ramps up after Start")
    fade_out: IntProperty(  # type: ignore[valid-type]
        name="Fade out", min=0, soft_max=240, description="Frames over which the edit ramps down before End")
    opacity: FloatProperty(  # type: ignore[valid-type]
        name="Opacity", default=1.0, min=0.0, max=1.0, subtype="FACTOR",
        description="Strength of this layer's edit; keyframe it (I over the field) to animate it")


class NA_ShotEdits(bpy.types.PropertyGroup):
    """The edit state of one shot (``name`` is the shot key): per-layer lifetimes, the
    layer frame painting goes to, and the frame-paint mesh's frame."""

    layers: CollectionProperty(type=NA_EditLayer)  # type: ignore[valid-type]
    paint_layer: IntProperty(  # type: ignore[valid-type]
        name="Paint into", default=-1, min=-1, max=7,
        description="Layer that frame painting goes to: -1 = the layer that owns each pixel "
                    "(the frontmost by alpha)")
    paint_frame: IntProperty(default=0)  # type: ignore[valid-type]


class NA_SceneSettings(bpy.types.PropertyGroup):
    preset: EnumProperty(name="Preset", items=PRESET_ITEMS, default="demo")  # type: ignore[valid-type]
    n_layers: IntProperty(  # type: ignore[valid-type]
        name="Layers", default=2, min=1, max=8,
        description="Number of layers. With masks it is the number of objects + 1 (background)")
    mask_mode: EnumProperty(name="Masks", items=MASK_MODES, default="NONE")  # type: ignore[valid-type]
    mask_folder: StringProperty(name="Mask folder", subtype="DIR_PATH")  # type: ignore[valid-type]
    masks: CollectionProperty(type=NA_MaskItem)  # type: ignore[valid-type]
    use_scene_range: BoolProperty(  # type: ignore[valid-type]
        name="Scene frame range", default=False,
        description="Decompose only the part of the strip inside the scene's frame range")
    overrides: StringProperty(  # type: ignore[valid-type]
        name="Overrides",
        description='Advanced: configuration overrides, e.g. losses.optical_flow=0.01; train.iterations=500 '
                    '(or JSON: {"train": {"iterations": 500}})')
    max_frames: IntProperty(  # type: ignore[valid-type]
        name="Max frames", default=0, min=0,
        description="Decompose at most this many frames from the start of the range (0: no limit)")
    jobs: CollectionProperty(type=NA_JobItem)  # type: ignore[valid-type]
    active_job: IntProperty(default=0)  # type: ignore[valid-type]
    shots: CollectionProperty(type=NA_ShotEdits)  # type: ignore[valid-type]


CLASSES = (NA_MaskItem, NA_JobItem, NA_EditLayer, NA_ShotEdits, NA_SceneSettings)


def register() -> None:
    bpy.types.Scene.neural_atlas = PointerProperty(type=NA_SceneSettings)  # type: ignore[attr-defined]


def unregister() -> None:
    if hasattr(bpy.types.Scene, "neural_atlas"):
        del bpy.types.Scene.neural_atlas  # type: ignore[attr-defined]


def settings(scene: bpy.types.Scene) -> NA_SceneSettings:
    return scene.neural_atlas  # type: ignore[attr-defined, no-any-return]


def find_job(scene: bpy.types.Scene, job_id: str) -> NA_JobItem | None:
    for j in settings(scene).jobs:
        if j.job_id == job_id:
            return j  # type: ignore[no-any-return]
    return None


def shot_edits(scene: bpy.types.Scene, shot: str, n_layers: int = 0) -> NA_ShotEdits:
    """The edit record of ``shot`` (created on first use), with at least ``n_layers`` layers.
    Items are named (shot key, layer index) so keyframe paths stay valid when others go."""
    shots = settings(scene).shots
    rec = shots.get(shot)
    if rec is None:
        rec = shots.add()
        rec.name = shot
    while len(rec.layers) < n_layers:
        item = rec.layers.add()
        item.name = str(len(rec.layers) - 1)
    return rec  # type: ignore[no-any-return]


def find_job_any(job_id: str) -> tuple[bpy.types.Scene, NA_JobItem] | tuple[None, None]:
    for sc in bpy.data.scenes:
        j = find_job(sc, job_id)
        if j is not None:
            return sc, j
    return None, None
