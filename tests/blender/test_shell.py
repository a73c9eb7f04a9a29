"""The bpy shell without a backend: VSE timing and placement, edit images and pixel
orientation, saving paint, mask rasterisation, paint set-up, the poller body,
error texts, and the mypy lint against removed 5.0 names."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ADDON_MODULE, ROOT, TMP, read_png


def test_strip_timing_and_render_placement(fresh, na, clip):
    bpy = fresh
    vse = na.blender.vse
    scene = bpy.context.scene
    src = vse.add_source_strip(scene, os.path.join(clip, "video_frames"), channel=2, frame_start=10)
    src.frame_offset_start = 2  # the artist trimmed two frames
    info = vse.strip_info(src)
    assert (info.kind, info.channel, info.frame_start, info.final_start, info.final_end) == ("IMAGE", 2, 10, 12, 18)
    assert info.visible_source_range() == (2, 8)
    assert src.strip_elem_from_frame(12).filename == info.files[2] == "00002.png"
    # something already sits on channel 3 over the range: the render goes to 4
    blocker = vse.add_source_strip(scene, os.path.join(clip, "video_frames"), channel=3, frame_start=14)
    frames = [os.path.join(clip, "video_frames", f"{i:05d}.png") for i in range(2, 8)]
    r1 = vse.place_render(scene, info, (2, 8), frames, None, "shotA", "render1", "edit A")
    assert r1.channel == 4 and (r1.frame_final_start, r1.frame_final_end) == (12, 18)
    # frame for frame: the render's k-th file is shown where the source shows frame 2+k
    for t in range(12, 18):
        assert r1.strip_elem_from_frame(t).filename == src.strip_elem_from_frame(t).filename
    # a second render of the same shot replaces the first (same channel), never stacks
    vse.top_level(scene.sequence_editor).remove(blocker)
    r2 = vse.place_render(scene, info, (2, 8), frames, None, "shotA", "render2", "edit A")
    renders = vse.previous_renders(scene, "shotA")
    assert len(renders) == 1 and renders[0].get(vse.KEY_RENDER_JOB) == "render2" and r2.channel == 4
    # another shot's render does not replace it
    vse.place_render(scene, info, (2, 8), frames, None, "shotB", "render3", "edit B")
    assert len(vse.previous_renders(scene, "shotA")) == 1 and len(vse.previous_renders(scene, "shotB")) == 1
    # 5.0 API only: the removed names are really gone in this bpy
    assert not hasattr(scene.sequence_editor, "sequences") and not hasattr(bpy.types, "Sequence")


def test_edit_image_is_transparent_rgba_srgb_and_top_down(fresh, na, tmp_path):
    bpy = fresh
    images = na.blender.images
    path = str(tmp_path / "edits" / "layer_1.png")
    img = images.ensure_edit("shot", 1, "Shot", (48, 32), path)
    assert tuple(img.size) == (48, 32) and img.channels == 4 and not img.is_float
    assert img.colorspace_settings.name == "sRGB" and img.alpha_mode == "STRAIGHT"
    assert os.path.isfile(path) and not img.is_dirty
    assert np.all(images.to_array(img) == 0.0)
    assert np.all(read_png(path) == 0.0)
    # a mark in the top-left corner (top-down coordinates) lands top-left in the file
    images.paint_rect(img, 0, 0, 3, 5, (1.0, 0.0, 0.0, 1.0))
    assert img.is_dirty
    saved = images.save_dirty([img])
    assert saved == [path] and not img.is_dirty
    px = read_png(path)
    assert px.shape == (32, 48, 4)
    assert np.all(px[:3, :5] == [1, 0, 0, 1]) and px[3:, :].max() == 0 and px[:, 5:].max() == 0
    # saving never reloaded: the paint is still in memory, and reusing the image keeps it
    again = images.ensure_edit("shot", 1, "Shot", (48, 32), path)
    assert again == img and images.to_array(again)[0, 0, 0] == 1.0


def test_saving_the_blend_saves_dirty_edits(fresh, na, tmp_path):
    bpy = fresh
    images = na.blender.images
    path = str(tmp_path / "e.png")
    img = images.ensure_edit("shot2", 0, "S", (16, 16), path)
    images.paint_rect(img, 4, 4, 2, 2, (0.0, 1.0, 0.0, 1.0))
    assert img.is_dirty
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "f.blend"))
    assert not img.is_dirty and read_png(path)[4, 4, 1] == 1.0


def test_atlas_load_sets_colour_space(fresh, na, tmp_path):
    images = na.blender.images
    # a 16-bit RGBA PNG like the backend's atlases, written by Blender itself
    bpy = fresh
    src = bpy.data.images.new("a16", 8, 8, alpha=True, float_buffer=True)
    arr = np.zeros((8, 8, 4), np.float32)
    arr[0, :, :] = (0.25, 0.5, 0.75, 1.0)
    images.write_array(src, arr)
    src.filepath_raw = str(tmp_path / "layer_0.png")
    src.file_format = "PNG"
    src.save()
    a = images.load_atlas(str(tmp_path / "layer_0.png"), "shot", 0, "S")
    assert a.colorspace_settings.name == "sRGB" and a.alpha_mode == "STRAIGHT"
    assert a.get(images.KEY_ROLE) == "atlas" and images.find_image("shot", 0, "atlas") == a


def test_mask_datablock_rasterised_per_frame(fresh, na, clip, tmp_path):
    bpy = fresh
    vse, masks = na.blender.vse, na.blender.masks
    scene = bpy.context.scene
    strip = vse.add_source_strip(scene, os.path.join(clip, "video_frames"), channel=1, frame_start=1)
    m = bpy.data.masks.new("Ball")
    spl = m.layers.new(name="L").splines.new()
    spl.points.add(3)
    for p, (x, y) in zip(spl.points, [(0.05, 0.95), (0.3, 0.95), (0.3, 0.7), (0.05, 0.7)]):
        p.co = (x, y)
        p.handle_left_type = p.handle_right_type = "VECTOR"
    folders = masks.rasterise([m], vse.strip_info(strip), (2, 5), (64, 36), str(tmp_path), first_index=2)
    assert len(folders) == 1
    files = sorted(os.listdir(folders[0]))
    assert files == [f"{i:05d}.png" for i in range(5)]  # 0-1 blank padding, 2-4 rasterised
    assert read_png(os.path.join(folders[0], "00000.png")).max() == 0.0
    # what the backend reads: it binarises masks at 0.5 (backend/clip/source.py). Blender's mask
    # render antialiases edges and now and then leaves a faint stray pixel (19/255 seen at a
    # frame corner, about 1 run in 6), which that threshold drops.
    px = read_png(os.path.join(folders[0], "00003.png"))[..., 0] > 0.5
    assert px[:4, 4:12].all(), "the mask is near the top-left corner of the frame"
    assert not px[-10:, :].any() and not px[:, 32:].any()


def test_paint_setup(fresh, na, tmp_path):
    bpy = fresh
    images, paint = na.blender.images, na.blender.paint
    atlases = [bpy.data.images.new(f"atlas{i}", 16, 16, alpha=True) for i in range(2)]
    edits = [images.ensure_edit("s", i, "S", (16, 16), str(tmp_path / f"l{i}.png")) for i in range(2)]
    # give the (background) window an Image Editor, as the Texture Paint workspace has
    area = bpy.context.window.screen.areas[0]
    area.type = "IMAGE_EDITOR"
    with bpy.context.temp_override(window=bpy.context.window, area=area):
        done = paint.setup(bpy.context, bpy.context.scene, "S", atlases, edits, 1)
    assert done["image_editor"]
    sp = area.spaces.active
    assert sp.image == edits[1] and sp.ui_mode == "PAINT"
    assert bpy.context.scene.tool_settings.image_paint.canvas == edits[1]
    ob = bpy.data.objects[done["plane"]]
    nodes = ob.data.materials[0].node_tree.nodes
    imgs = {n.image.name for n in nodes if n.type == "TEX_IMAGE"}
    assert imgs == {"atlas1", edits[1].name} and nodes.active.image == edits[1]
    assert bpy.data.collections[paint.COLLECTION].hide_render


def test_poller_body_is_bounded_and_unreachable_backend_explained(fresh, na, tmp_path):
    bpy = fresh
    rt = na.blender.runtime
    assert rt.tick() == rt.TICK_IDLE_S  # no session: idle, no error
    p = bpy.context.preferences.addons[ADDON_MODULE].preferences
    p.endpoint, p.start_local = "tcp://127.0.0.1:9", False  # nothing listens on the discard port
    p.keys_dir = str(tmp_path / "keys")  # an empty keys folder
    s = rt.session()
    s.timeout, s.retries = 3.0, 0
    # no signing key yet: the error says where it should be and what to do
    with pytest.raises(na.core.jobs.SessionError) as e:
        s.connect(force=True)
    assert e.value.code == "key_missing" and "signing.key" in s.conn.message
    assert "Keys folder" in s.conn.hint
    from importlib import import_module

    import_module(na.__name__ + ".core.signing").ensure_key(str(tmp_path / "keys"))
    s.connect(force=True)
    import time

    t0 = time.monotonic()
    while s.conn.state == "connecting" and time.monotonic() - t0 < 60:  # generous: a loaded box
        t = time.monotonic()
        interval = rt.tick()
        # a tick that blocked on the reply would take the whole 3 s request timeout; half of it
        # is far above any tick's own work, even on a loaded machine
        assert time.monotonic() - t < s.timeout / 2, "a tick must never block"
        if s.conn.state == "connecting":
            assert interval == rt.TICK_BUSY_S  # polls fast while a reply is due
        time.sleep(0.05)
    assert s.conn.state == "unreachable"
    assert "tcp://127.0.0.1:9" in s.conn.message and "firewall" in s.conn.hint.lower()
    assert rt.get().last_error == ""
    p.keys_dir = ""


def test_decompose_without_a_strip_says_what_to_do(fresh, na):
    bpy = fresh
    bpy.context.scene.sequence_editor_create()
    with pytest.raises(RuntimeError, match="Click a movie or image-sequence strip"):
        bpy.ops.neural_atlas.decompose()
    assert "No movie or image strip" in na.blender.runtime.get().last_error


def test_mypy_lint_catches_removed_5_0_names(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import bpy\n\n\ndef f(scene: bpy.types.Scene) -> object:\n"
                   "    ed = scene.sequence_editor\n    assert ed is not None\n"
                   "    return ed.sequences, bpy.types.Sequence\n")
    lint = os.path.join(ROOT, "tests", "blender", "lint.py")
    r = subprocess.run([sys.executable, lint, str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    assert '"sequences"' in r.stdout and '"Sequence"' in r.stdout


def test_overrides_field_takes_json_toml_and_the_command_lines_set_form(na):
    import importlib
    actions = importlib.import_module(f"{ADDON_MODULE}.blender.actions")
    parse = actions.parse_overrides
    want = {"losses": {"optical_flow": 0.01}, "train": {"iterations": 500}}
    assert parse('{"losses": {"optical_flow": 0.01}, "train": {"iterations": 500}}') == want
    assert parse("losses.optical_flow=0.01; train.iterations=500") == want
    assert parse(" losses.optical_flow = 0.01 ;train.iterations=500; ") == want
    # a bare word is a string, nested tables by more dots, quoted strings as in TOML
    assert parse("losses.rigidity_stencil=shared; model.texture_grid.log2_hashmap_size=20") == {
        "losses": {"rigidity_stencil": "shared"}, "model": {"texture_grid": {"log2_hashmap_size": 20}}}
    assert parse('losses.rigidity_stencil="shared"') == {"losses": {"rigidity_stencil": "shared"}}
    assert parse("") == {} and parse("   ") == {}
    for bad in ("iterations=500", "losses.optical_flow", "losses..x=1"):
        with pytest.raises(actions.ActionError):
            parse(bad)
