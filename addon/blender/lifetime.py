"""The bpy side of edit lifetimes: read a shot's per-layer records (frame range, fades,
keyframed opacity), sample the opacity curve once per frame of the shot and hand the
numbers to ``core.lifetime``, which makes the per-frame opacity that Render Edit sends
and the live preview bakes. One sampling, one formula, both paths.

The opacity curve is the F-Curve of ``neural_atlas.shots["<shot>"].layers["<i>"].opacity``
in the scene's active action (Blender 4.4+ slotted actions, and the 4.2/4.3 flat
``Action.fcurves``); without keyframes it is the property's value on every frame.
NLA strips and drivers on that property are not sampled.
"""

from __future__ import annotations

from typing import Any, Optional

import bpy

from ..core import lifetime as L
from .props import NA_EditLayer, NA_JobItem, shot_edits, settings


def _fcurve(owner: bpy.types.Scene, data_path: str) -> Optional[bpy.types.FCurve]:
    ad = owner.animation_data
    action = ad.action if ad is not None else None
    if action is None:
        return None
    curves: Any = None
    try:  # Blender 4.4+: the channelbag of the owner's slot
        from bpy_extras import anim_utils

        bag = anim_utils.action_get_channelbag_for_slot(action, ad.action_slot)
        curves = bag.fcurves if bag is not None else None
    except (ImportError, AttributeError):
        curves = getattr(action, "fcurves", None)
    if curves is None:
        return None
    return curves.find(data_path)  # type: ignore[no-any-return]


def layer_path(shot: str, layer: int) -> str:
    """Data path (from the scene) of a layer's edit record, by name."""
    return f'neural_atlas.shots["{shot}"].layers["{layer}"]'


def _paths(scene: bpy.types.Scene, shot: str, layer: int) -> list[str]:
    """The record's opacity path by name and by index (how Blender stores a keyframe
    inserted from the UI or ``keyframe_insert``)."""
    paths = [layer_path(shot, layer) + ".opacity"]
    shots = settings(scene).shots
    k = shots.find(shot)
    if k >= 0:
        j = shots[k].layers.find(str(layer))
        if j >= 0:
            paths.append(f"neural_atlas.shots[{k}].layers[{j}].opacity")
    return paths


def sample_opacity(scene: bpy.types.Scene, shot: str, layer: int, rec: NA_EditLayer,
                   first_frame: int, n_frames: int) -> list[float]:
    """The layer's opacity at timeline frames ``first_frame .. first_frame + n_frames - 1``."""
    fc = None
    for path in _paths(scene, shot, layer):
        fc = fc or _fcurve(scene, path)
    if fc is None:
        return [float(rec.opacity)] * n_frames
    return [float(fc.evaluate(first_frame + f)) for f in range(n_frames)]


def layer_lifetime(rec: NA_EditLayer, first_frame: int, n_frames: int) -> L.Lifetime:
    """The record as a core Lifetime in shot frames; range errors are reported in the timeline
    frames the artist typed."""
    if not rec.use_range:
        return L.Lifetime(fade_in=int(rec.fade_in), fade_out=int(rec.fade_out))
    a, b = int(rec.frame_start), int(rec.frame_end)
    if b < a:
        raise L.LifetimeError(f"the edit's frame range {a}-{b} is empty: the end is before the start")
    if b < first_frame or a > first_frame + n_frames - 1:
        raise L.LifetimeError(f"the edit's frame range {a}-{b} is outside the shot's frames "
                              f"{first_frame}-{first_frame + n_frames - 1}")
    return L.Lifetime(start=L.timeline_to_shot(rec.frame_start, first_frame),
                      end=L.timeline_to_shot(rec.frame_end, first_frame),
                      fade_in=int(rec.fade_in), fade_out=int(rec.fade_out))


def first_frame(job: NA_JobItem) -> int:
    """Timeline frame of the shot's frame 0 (where the source strip shows it)."""
    return int(job.src_frame_start + job.range_start)


def per_frame(scene: bpy.types.Scene, job: NA_JobItem) -> dict[int, list[float]]:
    """Per layer with a record: its per-frame opacity over the shot (raises LifetimeError)."""
    n = int(job.range_stop - job.range_start)
    t0 = first_frame(job)
    rec = settings(scene).shots.get(job.shot)
    if rec is None:
        return {}
    out = {}
    for item in rec.layers:
        i = int(item.name)
        curve = sample_opacity(scene, job.shot, i, item, t0, n)
        try:
            out[i] = L.per_frame_opacity(n, layer_lifetime(item, t0, n), curve)
        except L.LifetimeError as e:
            raise L.LifetimeError(f"layer {i}: {e}") from None
    return out


def ensure_records(scene: bpy.types.Scene, job: NA_JobItem) -> None:
    """Create the shot's per-layer records (whole shot, opacity 1) if missing."""
    rec = shot_edits(scene, job.shot, int(job.n_layers))
    t0 = first_frame(job)
    for item in rec.layers:
        if item.frame_start == 0 and item.frame_end == 0:
            item.frame_start, item.frame_end = t0, t0 + int(job.range_stop - job.range_start) - 1
