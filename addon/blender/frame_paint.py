"""Paint on a frame of the shot with Blender's own brushes, straight into the atlases.

One mesh per shot (rebuilt for the frame being painted): its vertices sit on that frame's
pixel centres (the maps' working resolution, optionally every ``step``-th pixel), one quad
between four neighbouring pixel centres. Each face belongs to one layer (the frontmost by
alpha at its corners, or the layer the artist picks) and carries that layer's material; the
face's UVs (UV map "Atlas") are the owning layer's atlas coordinates at its corners, from the
frame's STMap: Blender UV = (s, t), the STMap's own convention. Texture Paint in Material mode
then paints a stroke on the frame as seen and Blender's projection painter writes it at those
texels, filling sub-texel holes itself; stencils, clone and every brush work as usual. A second
UV map ("Frame") shows the frame under the paint.

Colour (the rule of the backend's ``paint_frame``): the paint is the frame's colour **as seen**,
which includes that frame's lighting, and the render multiplies an edit by the residual R; so
the edit stores the paint divided by R at that frame, and the painted frame renders the paint
as it was painted (other frames follow the plate's lighting changes). Blender's brush cannot
divide, so each layer's paint slot is a **canvas**: an atlas-sized image holding the edit *as
seen at this frame* (rgb x R_t carried into atlas space, ``core.live.residual_atlas``; texels
the frame does not show keep R = 1). After strokes ``flush`` (run by the live preview's paint
timer and depsgraph handler, by Done Painting and before the mesh is rebuilt) turns the
canvas texels that changed into the edit image (rgb / R_t, clamped, as ``paint_frame`` does)
and leaves every other texel of the edit untouched. Undo on the canvas flows back the same way.

Strokes accumulate in the edit images, whatever frame they were painted on; the live
preview shows them on every frame. The mesh is a painting surface only (excluded from
renders) and is replaced when another frame is painted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import bpy
import numpy as np

from ..core import live
from . import images, preview
from .paint import image_node, node_material
from .lifetime import first_frame
from .props import NA_JobItem

KEY = "neural_atlas_frame_paint"  # custom property on what frame painting creates: the shot key
COLLECTION = "Neural Atlas Paint"


class FramePaintError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass
class FrameMaps:
    """One frame's maps, bottom row first (Blender's pixel order): st (N, H, W, 2), alpha (N, H, W),
    residual (N, H, W, 3) (empty when not read)."""

    st: np.ndarray
    alpha: np.ndarray
    sizes: tuple[int, ...]
    residual: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))


def read_frame(maps: preview.Maps, frame: int, residual: bool = False) -> FrameMaps:
    sts, alphas, rs = [], [], []
    for m in maps.layers:
        for path in (m.stmap_pattern % frame,) + ((m.residual_pattern % frame,) if residual else ()):
            if not os.path.isfile(path):
                raise FramePaintError(f"the map {path} is missing", preview.MAPS_HINT.format(out=maps.folder))
        a = images.file_pixels(m.stmap_pattern % frame)
        h, w = a.shape[:2]
        if (w, h) != (maps.width, maps.height):
            raise FramePaintError(f"{m.stmap_pattern % frame} is {w}x{h}, the maps {maps.width}x{maps.height}")
        sts.append(a[..., :2])
        alphas.append(a[..., 3])
        if residual:
            r = images.file_pixels(m.residual_pattern % frame)
            if r.shape[:2] != (h, w):
                raise FramePaintError(f"{m.residual_pattern % frame} is not {w}x{h}")
            rs.append(r[..., :3])
    fm = FrameMaps(np.stack(sts), np.stack(alphas), tuple(m.atlas_size for m in maps.layers))
    if residual:
        fm.residual = np.stack(rs)
    return fm


def owners(alpha: np.ndarray, layer: int = -1) -> np.ndarray:
    """Per pixel the layer frame paint goes to: ``layer``, or the frontmost by alpha (the largest
    alpha; ties go to the lower index, objects before the background)."""
    if layer >= 0:
        return np.full(alpha.shape[1:], layer, np.int32)
    return np.argmax(alpha, axis=0).astype(np.int32)


def build_mesh(name: str, fm: FrameMaps, layer: int = -1, step: int = 1) -> bpy.types.Mesh:
    """The painting surface of one frame (see the module docstring); pixel units, x right, y up."""
    N, H, W = fm.alpha.shape
    ys = np.arange(0, H, step)
    xs = np.arange(0, W, step)
    if ys[-1] != H - 1:
        ys = np.append(ys, H - 1)
    if xs[-1] != W - 1:
        xs = np.append(xs, W - 1)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # (h, w) grid of pixel indices, bottom row first
    h, w = gy.shape
    co = np.zeros((h, w, 3), np.float32)
    co[..., 0], co[..., 1] = gx + 0.5, gy + 0.5
    vid = np.arange(h * w, dtype=np.int32).reshape(h, w)
    # quads counter-clockwise seen from +z: (x, y), (x+1, y), (x+1, y+1), (x, y+1)
    quad = np.stack([vid[:-1, :-1], vid[:-1, 1:], vid[1:, 1:], vid[1:, :-1]], -1).reshape(-1, 4)
    # each face's layer: the largest alpha summed over its corners, or the chosen layer
    a = fm.alpha[:, gy, gx].reshape(N, -1)  # (N, h*w)
    if layer >= 0:
        face_layer = np.full(len(quad), layer, np.int32)
    else:
        face_layer = np.argmax(a[:, quad].sum(-1), axis=0).astype(np.int32)
    st = fm.st[:, gy, gx].reshape(N, -1, 2)  # (N, h*w, 2)
    loop_v = quad.reshape(-1)
    loop_layer = np.repeat(face_layer, 4)
    uv_atlas = st[loop_layer, loop_v]  # Blender UV = (s, t)
    frame_uv = np.stack([(gx.reshape(-1) + 0.5) / W, (gy.reshape(-1) + 0.5) / H], -1)[loop_v]
    me = bpy.data.meshes.new(name)
    me.vertices.add(h * w)
    me.vertices.foreach_set("co", co.reshape(-1))
    me.loops.add(len(loop_v))
    me.loops.foreach_set("vertex_index", loop_v)
    me.polygons.add(len(quad))
    me.polygons.foreach_set("loop_start", np.arange(0, len(loop_v), 4, dtype=np.int32))
    me.polygons.foreach_set("material_index", face_layer)
    for uv_name, values in (("Atlas", uv_atlas), ("Frame", frame_uv)):
        uvl = me.uv_layers.new(name=uv_name)
        uvl.data.foreach_set("uv", np.ascontiguousarray(values, np.float32).reshape(-1))
    me.uv_layers.active = me.uv_layers["Atlas"]  # what Texture Paint projects through
    me.update(calc_edges=True)
    me[KEY + "_grid"] = [w, h, step, H]
    return me


def _material(name: str, shot: str, edit: bpy.types.Image, plate: Optional[bpy.types.Image]) -> bpy.types.Material:
    """Shows the frame with the layer's paint as seen over it; ``edit`` (the layer's canvas) is
    the active paint slot."""
    mat, nt = node_material(name, reuse=False)
    mat[KEY] = shot
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    emit = nt.nodes.new("ShaderNodeEmission")
    t_edit = image_node(nt, edit, "Paint as seen on this frame (paint here)", "Atlas")
    color = t_edit.outputs["Color"]
    if plate is not None:
        t_plate = image_node(nt, plate, "Frame", "Frame")
        mix = nt.nodes.new("ShaderNodeMix")
        mix.data_type = "RGBA"  # type: ignore[attr-defined]
        nt.links.new(t_edit.outputs["Alpha"], mix.inputs[0])
        nt.links.new(t_plate.outputs["Color"], mix.inputs[6])
        nt.links.new(t_edit.outputs["Color"], mix.inputs[7])
        color = mix.outputs[2]
    nt.links.new(color, emit.inputs["Color"])
    nt.links.new(emit.outputs[0], out.inputs["Surface"])
    nt.nodes.active = t_edit  # Texture Paint's active slot: the canvas
    return mat


# ------------------------------------------------------------------ canvases
@dataclass
class _Canvas:
    layer: int
    canvas: str  # image names
    edit: str
    R: np.ndarray  # (S, S, 3) the frame's residual in atlas space, bottom row first
    last: np.ndarray  # (S, S, 4) uint8: the canvas as last flushed
    tracker: live.EditTracker


_CANVASES: dict[str, dict[int, _Canvas]] = {}  # shot -> layer -> canvas


def _make_canvas(name: str, shot: str, layer: int, edit: bpy.types.Image, R: np.ndarray) -> _Canvas:
    S = int(edit.size[0])
    img = bpy.data.images.new(name, S, S, alpha=True, float_buffer=False)
    img[KEY] = shot
    img.colorspace_settings.name = "sRGB"  # encoded values, like the edit's PNG
    img.alpha_mode = "STRAIGHT"
    seen = live.light(preview._encoded(edit), R)
    images._pixels(img).foreach_set(seen.ravel())
    img.update()
    stored = images.pixels(img)  # what the 8-bit canvas holds
    c = _Canvas(layer, img.name, edit.name, R, np.rint(stored * 255).astype(np.uint8), live.EditTracker(S))
    c.tracker.changed_bands(stored)
    return c


def flush(shot: Optional[str] = None) -> int:
    """Turn changed canvas texels into their edit images (rgb / R of the painted frame); the
    live preview follows. Returns how many layers changed."""
    changed = 0
    for key, layers in list(_CANVASES.items()):
        if shot is not None and key != shot:
            continue
        for c in layers.values():
            canvas, edit = bpy.data.images.get(c.canvas), bpy.data.images.get(c.edit)
            if canvas is None or edit is None or tuple(canvas.size) != tuple(edit.size):
                continue
            px = images.pixels(canvas)
            bands = c.tracker.changed_bands(px)
            if not bands:
                continue
            e = None
            for r0, r1 in bands:
                now = np.rint(px[r0:r1] * 255).astype(np.uint8)
                diff = (now != c.last[r0:r1]).any(-1)
                if not diff.any():
                    continue
                if e is None:
                    e = preview._encoded(edit)  # read now: paint made elsewhere stays
                band = e[r0:r1]
                band[diff] = live.unlight(px[r0:r1][diff], c.R[r0:r1][diff])
                c.last[r0:r1] = now
            if e is None:
                continue
            if preview.holds_linear(edit):
                e[..., :3] = live.srgb_decode(e[..., :3])
            images._pixels(edit).foreach_set(e.ravel())
            edit.update()
            changed += 1
            preview.sync(key, only=[edit.name])
    return changed


def plate_image(job: NA_JobItem, shot: str, frame: int) -> Optional[bpy.types.Image]:
    """The source frame ``frame`` of the shot as an image (tagged: ``remove`` takes it away)."""
    plate = preview.plate_of(job.out_dir)
    if plate.movie:
        img = bpy.data.images.load(plate.path, check_existing=False)
        img.source = "MOVIE"
        return None if img is None else _tag_plate(img, shot)  # the Frame UV shows the movie's frame 1
    first = os.path.basename(plate.path)
    m = preview._LAST_NUMBER.search(first)
    assert m is not None
    name = first[:m.start(1)] + str(plate.offset + 1 + frame).zfill(len(m.group(1))) + first[m.end(1):]
    path = os.path.join(os.path.dirname(plate.path), name)
    if not os.path.isfile(path):
        return None
    return _tag_plate(bpy.data.images.load(path, check_existing=False), shot)


def _tag_plate(img: bpy.types.Image, shot: str) -> bpy.types.Image:
    img[KEY] = shot
    img.colorspace_settings.name = "sRGB"
    return img


def remove(shot: str) -> None:
    """Remove the shot's frame-paint mesh, its materials, canvases and frame image (never an
    edit image); paint still on a canvas goes into the edit images first."""
    try:
        flush(shot)
    finally:
        _CANVASES.pop(shot, None)
    for coll in (bpy.data.objects, bpy.data.meshes, bpy.data.materials, bpy.data.images):
        for idb in [d for d in coll if d.get(KEY) == shot]:
            coll.remove(idb)  # type: ignore[arg-type]


def setup(scene: bpy.types.Scene, job: NA_JobItem, timeline_frame: int, layer: int = -1,
          step: int = 1, link_to: Optional[bpy.types.Scene] = None) -> bpy.types.Object:
    """Build (or rebuild) the painting surface of ``job``'s shot at ``timeline_frame``; the mesh
    goes into ``link_to`` (the scene the 3D View shows; default ``scene``)."""
    if job.kind != "decompose" or job.state != "done" or not job.out_dir:
        raise FramePaintError(f"{job.label}: the decomposition is {job.state}", "Wait until it is done")
    try:
        maps = preview.read_maps(job.out_dir)
    except preview.PreviewError as e:
        raise FramePaintError(e.message, e.hint) from None
    t0 = first_frame(job)
    f = int(timeline_frame) - t0
    if not 0 <= f < maps.frames:
        raise FramePaintError(f"frame {timeline_frame} is outside the shot (timeline frames {t0}-"
                              f"{t0 + maps.frames - 1})", "Go to a frame of the shot and try again")
    if layer >= len(maps.layers):
        raise FramePaintError(f"layer {layer} does not exist (the shot has {len(maps.layers)} layers)")
    if step < 1:
        raise FramePaintError("the mesh step must be at least 1 pixel")
    edits = {int(i[images.KEY_LAYER]): i for i in images.job_images(job.shot, "edit")}
    missing = [m.index for m in maps.layers if m.index not in edits]
    if missing:
        raise FramePaintError(f"layer(s) {missing} have no edit image in this file", "Use Load Atlases first")
    fm = read_frame(maps, f, residual=True)
    remove(job.shot)
    name = f"NA {job.label} frame paint"
    me = build_mesh(name, fm, layer, step)
    me[KEY] = job.shot
    plate = plate_image(job, job.shot, f)
    own = owners(fm.alpha, layer)
    canvases: dict[int, _Canvas] = {}
    for k, m in enumerate(maps.layers):
        R = live.residual_atlas(fm.st[k], own == k, fm.residual[k], m.atlas_size)
        c = _make_canvas(f"{name} canvas {m.index}", job.shot, m.index, edits[m.index], R)
        canvases[m.index] = c
        me.materials.append(_material(f"{name} {m.index}", job.shot, bpy.data.images[c.canvas], plate))
    _CANVASES[job.shot] = canvases
    preview._arm_paint_poll()
    ob = bpy.data.objects.new(name, me)
    ob[KEY] = job.shot
    ob["neural_atlas_frame"] = int(timeline_frame)
    coll = bpy.data.collections.get(COLLECTION)
    if coll is None:
        coll = bpy.data.collections.new(COLLECTION)
        coll.hide_render = True
    target = link_to or scene
    if coll.name not in target.collection.children:
        target.collection.children.link(coll)
    coll.objects.link(ob)
    # fit the frame in a 2 x (2 H / W) area around the origin, like the paint planes
    k = 2.0 / max(maps.width, maps.height)
    ob.scale = (k, k, k)
    ob.location = (-maps.width * k / 2.0, -maps.height * k / 2.0, 0.0)
    return ob


def face_at(me: bpy.types.Mesh, x: int, y_top: int) -> int:
    """Index of the face whose corners are the grid pixels around frame pixel (x, y), y counted
    from the top (the face whose lower-left corner is the nearest grid pixel below-left)."""
    w, h, step, height = (int(v) for v in me[KEY + "_grid"])
    yb = height - 1 - int(y_top)
    col = min(int(x) // step, w - 2)
    row = min(yb // step, h - 2)
    return row * (w - 1) + col


def enter_paint_mode(context: bpy.types.Context, scene: bpy.types.Scene, ob: bpy.types.Object) -> dict:
    """UI: select the mesh, Texture Paint in Material mode, a top orthographic 3D view on it."""
    done = {"mode": False, "view3d": False}
    vl = context.view_layer
    if vl is None:
        return done
    for o in vl.objects:
        if o is not None and o.select_get():
            o.select_set(False)
    vl.objects.active = ob
    ob.select_set(True)
    ip = scene.tool_settings.image_paint
    ip.mode = "MATERIAL"
    if bpy.app.background:
        return done
    from . import vse

    for win, area in vse.iter_areas("VIEW_3D"):
        region = next((r for r in area.regions if r.type == "WINDOW"), None)
        sp = area.spaces.active
        if region is None or not isinstance(sp, bpy.types.SpaceView3D):
            continue
        sp.shading.type = "MATERIAL"
        r3d = sp.region_3d
        r3d.view_perspective = "ORTHO"
        r3d.view_rotation = (1.0, 0.0, 0.0, 0.0)  # looking down -z: the frame upright
        with context.temp_override(window=win, area=area, region=region):
            if ob.mode != "TEXTURE_PAINT":
                bpy.ops.object.mode_set(mode="TEXTURE_PAINT")
            bpy.ops.view3d.view_selected()
        done["mode"] = done["view3d"] = True
        break
    return done
