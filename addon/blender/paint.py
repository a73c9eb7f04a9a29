"""One-click paint set-up: the edit image in an Image Editor in Paint mode, with the
atlas visible under it.

Blender has no paint layers, so "atlas under edit" is built two ways at once:
* the Image Editor (2D painting) shows the edit image in Paint mode, with the
  atlas as the brush's clone/stencil reference (``image_paint.clone_image``);
* a preview plane per layer ("NA <job> paint <i>", in a collection excluded from
  renders) whose material shows edit-over-atlas; Texture Paint on it paints into
  the edit image (``image_paint.canvas``), and the 3D view shows the composite.
All of this is data set-up that also works headless; UI parts are skipped when
there is no window.
"""

from __future__ import annotations

from typing import Optional

import bpy

from . import vse

COLLECTION = "Neural Atlas Paint"


def node_material(name: str, reuse: bool = True) -> tuple[bpy.types.Material, bpy.types.NodeTree]:
    """A material (the existing one of that name when ``reuse``) with an empty node tree."""
    mat = (bpy.data.materials.get(name) if reuse else None) or bpy.data.materials.new(name)
    if not mat.node_tree:  # Blender < 5.0 creates materials without nodes
        mat.use_nodes = True
    nt = mat.node_tree
    assert nt is not None
    nt.nodes.clear()
    return mat, nt


def image_node(nt: bpy.types.NodeTree, image: bpy.types.Image, label: str, uv_map: str = "") -> bpy.types.Node:
    """An Image Texture node of ``image``, read through the UV map ``uv_map`` when given."""
    tex = nt.nodes.new("ShaderNodeTexImage")
    tex.image = image  # type: ignore[attr-defined]
    tex.label = label
    if uv_map:
        uv = nt.nodes.new("ShaderNodeUVMap")
        uv.uv_map = uv_map  # type: ignore[attr-defined]
        nt.links.new(uv.outputs["UV"], tex.inputs["Vector"])
    return tex


def _material(name: str, atlas: bpy.types.Image, edit: bpy.types.Image) -> bpy.types.Material:
    mat, nt = node_material(name)
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    t_atlas = nt.nodes.new("ShaderNodeTexImage")
    t_atlas.image = atlas  # type: ignore[attr-defined]
    t_atlas.label = "Atlas (read-only)"
    t_edit = nt.nodes.new("ShaderNodeTexImage")
    t_edit.image = edit  # type: ignore[attr-defined]
    t_edit.label = "Edit (paint here)"
    mix = nt.nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"  # type: ignore[attr-defined]
    emit = nt.nodes.new("ShaderNodeEmission")
    nt.links.new(t_edit.outputs["Alpha"], mix.inputs[0])
    nt.links.new(t_atlas.outputs["Color"], mix.inputs[6])
    nt.links.new(t_edit.outputs["Color"], mix.inputs[7])
    nt.links.new(mix.outputs[2], emit.inputs["Color"])
    nt.links.new(emit.outputs["Emission"], out.inputs["Surface"])
    t_atlas.location, t_edit.location = (-600, 200), (-600, -150)
    mix.location, emit.location, out.location = (-300, 0), (-100, 0), (100, 0)
    nt.nodes.active = t_edit  # texture paint's "active image" is the edit
    return mat


def _plane(name: str, mat: bpy.types.Material, x: float, coll: bpy.types.Collection) -> bpy.types.Object:
    ob = bpy.data.objects.get(name)
    if ob is None:
        me = bpy.data.meshes.new(name)
        me.from_pydata([(-1, -1, 0), (1, -1, 0), (1, 1, 0), (-1, 1, 0)], [], [(0, 1, 2, 3)])
        uv = me.uv_layers.new(name="UVMap")
        for loop, (u, v) in zip(uv.data, ((0, 0), (1, 0), (1, 1), (0, 1))):
            loop.uv = (u, v)
        me.update()
        ob = bpy.data.objects.new(name, me)
    if ob.name not in coll.objects:
        coll.objects.link(ob)
    ob.location = (x, 0.0, 0.0)
    me = ob.data
    assert isinstance(me, bpy.types.Mesh)
    if not me.materials:
        me.materials.append(mat)
    else:
        me.materials[0] = mat
    return ob


def setup(context: bpy.types.Context, scene: bpy.types.Scene, job_label: str, atlases: list[bpy.types.Image],
          edits: list[bpy.types.Image], layer: int) -> dict:
    """Set up painting on ``edits[layer]``. Returns what was done (for tests/reports)."""
    edit, atlas = edits[layer], atlases[layer]
    coll = bpy.data.collections.get(COLLECTION)
    if coll is None:
        coll = bpy.data.collections.new(COLLECTION)
        coll.hide_render = True
    if coll.name not in scene.collection.children:
        scene.collection.children.link(coll)
    planes = []
    for i, (a, e) in enumerate(zip(atlases, edits)):
        mat = _material(f"NA {job_label} paint {i}", a, e)
        planes.append(_plane(f"NA {job_label} paint {i}", mat, 2.4 * i, coll))
    ts = scene.tool_settings
    ip = ts.image_paint
    ip.mode = "IMAGE"
    ip.canvas = edit
    try:
        ip.clone_image = atlas
    except (AttributeError, TypeError):
        pass
    done = {"image_editor": False, "view3d": False, "plane": planes[layer].name}
    # UI: the first Image Editor shows the edit in Paint mode; the 3D view the composite
    area = _image_editor(context)
    if area is not None:
        sp = area.spaces.active
        assert isinstance(sp, bpy.types.SpaceImageEditor)
        sp.image = edit
        sp.ui_mode = "PAINT"
        area.tag_redraw()
        done["image_editor"] = True
    for _win, area3d in vse.iter_areas("VIEW_3D"):
        sp3 = area3d.spaces.active
        if isinstance(sp3, bpy.types.SpaceView3D):
            sp3.shading.type = "MATERIAL"
            area3d.tag_redraw()
            done["view3d"] = True
    return done


def _image_editor(context: bpy.types.Context) -> Optional[bpy.types.Area]:
    screen = getattr(context, "screen", None)
    if screen is not None:
        for area in screen.areas:
            if area.type == "IMAGE_EDITOR":
                return area
    for _win, area in vse.iter_areas("IMAGE_EDITOR"):
        return area
    return None
