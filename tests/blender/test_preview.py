"""The live preview, frame painting and edit lifetime, with the real bpy 5.0.1 and a real
backend (CPU, the tiny synthetic clip): one decomposition serves every test (ordered).

* the preview, rendered through the VSE headless, matches the backend's Render Edit of the same
  edits within 1/255 mean and 3/255 max on several frames, with both engines (numpy: an image
  strip; Cycles, one sample: a scene strip);
* a stroke updates the cached frame incrementally, bit for bit what a full recompute gives,
  and leaves the paint unsaved in memory (a sequencer-only render frees nothing);
* per-frame opacity (a keyframed curve, a frame range with a fade) in both outputs equals the
  curve; a new stroke shows in the preview without any backend call;
* preview off leaves the file's datablocks, strips and the rendered VSE frame bit for bit as
  they were, and nothing of the artist's (edit images, atlases) is modified;
* a decomposition without maps gets a message saying how to add them and changes nothing;
* the frame-paint mesh: a frame pixel's face carries its owner layer's material and UVs that
  land on that layer's texel for the pixel.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import BACKEND_PY, ROOT, TMP, read_png, tiny_overrides, use_local_backend

S: dict = {}


@pytest.fixture(scope="module")
def shot(na, clip):
    import bpy

    na.blender.runtime.reset()
    bpy.ops.wm.read_homefile(use_empty=True)
    use_local_backend(na, os.path.join(TMP, "ws_preview"))
    scene = bpy.context.scene
    B = na.blender
    strip = B.vse.add_source_strip(scene, os.path.join(clip, "video_frames"), channel=1, frame_start=3)
    scene.sequence_editor.active_strip = strip
    B.vse.fit_scene_to_strip(scene, strip, (64, 36))
    st = B.props.settings(scene)
    st.mask_mode, st.mask_folder = "FOLDER", os.path.join(clip, "masks")
    r = bpy.ops.neural_atlas.decompose(preset="demo", overrides=tiny_overrides(iterations=30), wait=True,
                                       timeout=600)
    assert r == {"FINISHED"}
    job = [j for j in st.jobs if j.kind == "decompose"][-1]
    assert job.state == "done" and job.atlases_loaded, (job.error, job.hint)
    # the VSE output as an artist would compare it: Standard view, no dither noise
    scene.view_settings.view_transform = "Standard"
    scene.render.dither_intensity = 0.0
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    yield {"scene": scene, "strip": strip, "job_id": job.job_id, "clip": clip}
    na.blender.runtime.shutdown()


def _job(na, scene, kind="decompose"):
    return [j for j in na.blender.props.settings(scene).jobs if j.kind == kind][-1]


def _render(scene, timeline_frame: int, name: str) -> np.ndarray:
    import bpy

    scene.frame_set(timeline_frame)
    scene.render.filepath = os.path.join(TMP, f"{name}.png")
    bpy.ops.render.render(write_still=True)
    return read_png(scene.render.filepath)[..., :3]


def _datablocks():
    """Names of the file's datablocks (Blender's own Render Result image, which any render makes, aside)."""
    import bpy

    return {c: sorted(d.name for d in getattr(bpy.data, c) if getattr(d, "type", "") != "RENDER_RESULT") for c in
            ("scenes", "objects", "cameras", "meshes", "materials", "images", "actions", "node_groups",
             "collections", "worlds", "textures")}


def _strips(scene):
    return sorted((s.name, s.channel, s.frame_final_start, s.frame_final_end) for s in
                  scene.sequence_editor.strips_all)


def _plate(clip, f):
    return read_png(os.path.join(clip, "video_frames", f"{f:05d}.png"))[..., :3]


def test_preview_without_maps_says_how_to_add_them_and_changes_nothing(na, shot):
    import bpy

    scene, job = shot["scene"], _job(na, shot["scene"])
    maps = os.path.join(job.out_dir, "maps")
    hidden = maps + ".hidden"
    os.rename(maps, hidden)
    try:
        before, strips = _datablocks(), _strips(scene)
        with pytest.raises(RuntimeError, match="no EXR maps") as e:
            bpy.ops.neural_atlas.preview(job_id=job.job_id, action="ON")
        assert f"add them with `python -m backend render {job.out_dir} --maps`" in str(e.value)
        assert _datablocks() == before and _strips(scene) == strips
        with pytest.raises(na.blender.frame_paint.FramePaintError, match="no EXR maps"):
            na.blender.frame_paint.setup(scene, job, scene.frame_current)
        assert _datablocks() == before
    finally:
        os.rename(hidden, maps)
    # a lifetime that ends before it starts: refused with what to fix, by both paths, nothing made
    rec = na.blender.props.settings(scene).shots[job.shot]
    item = rec.layers["0"]
    item.use_range, item.frame_start, item.frame_end = True, 8, 5
    try:
        with pytest.raises(RuntimeError, match="layer 0: the edit's frame range 8-5 is empty"):
            bpy.ops.neural_atlas.preview(job_id=job.job_id, action="ON")
        with pytest.raises(RuntimeError, match="end is before the start"):
            bpy.ops.neural_atlas.render_edit(job_id=job.job_id)
        assert _datablocks() == before and _strips(scene) == strips
        assert len([j for j in na.blender.props.settings(scene).jobs if j.kind == "render"]) == 0
    finally:
        item.use_range = False


def _paint_and_keyframe(na, scene, job):
    """Marks on both layers' edits; layer 1: an opacity keyframed 0 -> 1 over the shot; layer 0:
    a frame range (shot frames 2..7) with a 2-frame fade-in."""
    B = na.blender
    edits = {int(e[B.images.KEY_LAYER]): e for e in B.images.job_images(job.shot, "edit")}
    seen = [np.load(os.path.join(job.out_dir, "bake", f"atlas_{i}_seen.npy")) for i in range(2)]
    for i, rgba in ((0, (0.1, 0.8, 0.3, 0.75)), (1, (0.9, 0.2, 0.5, 1.0))):
        k = 14
        cs = np.pad(seen[i], ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        win = cs[k:, k:] - cs[:-k, k:] - cs[k:, :-k] + cs[:-k, :-k]
        r0, c0 = np.unravel_index(np.argmax(win), win.shape)
        B.images.paint_rect(edits[i], int(r0), int(c0), k, k, rgba)
    t0 = B.lifetime.first_frame(job)
    rec = B.props.settings(scene).shots[job.shot]
    path = B.lifetime.layer_path(job.shot, 1) + ".opacity"
    item = rec.layers["1"]
    item.opacity = 0.0
    scene.keyframe_insert(path, frame=t0)
    item.opacity = 1.0
    scene.keyframe_insert(path, frame=t0 + 7)
    lay0 = rec.layers["0"]
    lay0.use_range, lay0.frame_start, lay0.frame_end, lay0.fade_in = True, t0 + 2, t0 + 7, 2
    return edits


def test_preview_matches_render_edit_on_several_frames(na, shot):
    import bpy

    scene, job, clip = shot["scene"], _job(na, shot["scene"]), shot["clip"]
    B = na.blender
    t0 = B.lifetime.first_frame(job)
    edits = _paint_and_keyframe(na, scene, job)
    curve = B.lifetime.per_frame(scene, job)
    assert curve[1][0] == 0.0 and curve[1][7] == 1.0 and 0 < curve[1][3] < 1  # keyframed ramp
    assert curve[0][:2] == [0.0, 0.0] and curve[0][2] == pytest.approx(1 / 3) and curve[0][4:] == [1.0] * 4
    # the exact path: Render Edit (saves the edits, sends the sampled opacity, places the result)
    assert bpy.ops.neural_atlas.render_edit(job_id=job.job_id, wait=True, timeout=300) == {"FINISHED"}
    rjob = _job(na, scene, "render")
    assert rjob.state == "done" and rjob.placed, (rjob.error, rjob.hint)
    rendered = B.vse.find_strip(scene, rjob.render_strip)
    frames_dir = bpy.path.abspath(rendered.directory)
    # the live path: Blender computes the same from the maps
    before, strips = _datablocks(), _strips(scene)
    assert bpy.ops.neural_atlas.preview(job_id=job.job_id, action="ON") == {"FINISHED"}
    strip = B.preview.preview_strip(scene, job.shot)
    assert strip is not None and strip.type == "IMAGE" and strip.channel > rendered.channel
    assert B.preview.engine_of(job.shot) == "numpy"
    assert (strip.frame_final_start, strip.frame_final_end) == (shot["strip"].frame_final_start,
                                                                shot["strip"].frame_final_end)
    edited_pixels = 0
    for f in range(8):
        got = _render(scene, t0 + f, f"preview_{f}")
        ref = read_png(os.path.join(frames_dir, f"{f:05d}.png"))[..., :3]
        d = np.abs(got - ref) * 255
        assert d.mean() <= 1.0 and d.max() <= 3.0, (f, d.mean(), d.max())
        edited_pixels += int((np.abs(ref - _plate(clip, f)).max(-1) > 8 / 255).sum())
        S.setdefault("preview", {})[f] = got
        S.setdefault("render", {})[f] = ref
    # the Cycles engine (movie plates) computes the same on a scene strip
    shading = scene.render.sequencer_gl_preview
    strip = B.preview.enable(scene, job, engine="cycles")
    assert strip.type == "SCENE" and B.preview.engine_of(job.shot) == "cycles"
    assert scene.render.sequencer_gl_preview == "RENDERED"
    for f in (2, 6):
        got = _render(scene, t0 + f, f"preview_cycles_{f}")
        d = np.abs(got - S["render"][f]) * 255
        assert d.mean() <= 1.0 and d.max() <= 3.0, ("cycles", f, d.mean(), d.max())
    B.preview.enable(scene, job)  # back to the default engine
    assert B.preview.engine_of(job.shot) == "numpy" and scene.render.sequencer_gl_preview == shading
    assert edited_pixels > 200  # the edits are visible: the comparison is not plate vs plate
    S.update(before=before, strips=strips, curve=curve, edits={i: e.name for i, e in edits.items()})


def _layer_deltas(na, job, layer: int) -> dict[int, np.ndarray]:
    """The backend's full-strength render of one layer's edit, minus the plate, per frame."""
    B = na.blender
    edit = B.images.find_image(job.shot, layer, "edit")
    out = os.path.join(TMP, f"full_{layer}")
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([BACKEND_PY, "-m", "backend", "edit", job.out_dir, "--layer",
                    f"{layer}={os.path.abspath(edit.filepath)}", "--out", out, "--format", "png", "--quiet"],
                   check=True, cwd=ROOT, capture_output=True)
    return {f: read_png(os.path.join(out, "frames", f"{f:05d}.png"))[..., :3] for f in range(8)}


def test_per_frame_opacity_follows_the_keyframed_curve_on_both_paths(na, shot):
    scene, job, clip = shot["scene"], _job(na, shot["scene"]), shot["clip"]
    curve = S["curve"]
    full = {i: _layer_deltas(na, job, i) for i in (0, 1)}
    for f in range(8):
        plate = _plate(clip, f)
        d0, d1 = full[0][f] - plate, full[1][f] - plate
        A = np.stack([d0.ravel(), d1.ravel()], 1)
        for name in ("render", "preview"):
            got = S[name][f] - plate
            # least squares o0, o1 with got = o0 d0 + o1 d1 (the marks do not clip)
            o, *_ = np.linalg.lstsq(A, got.ravel(), rcond=None)
            for i in (0, 1):
                if np.abs((d0, d1)[i]).max() > 0.1:
                    assert o[i] == pytest.approx(curve[i][f], abs=0.03), (name, f, i, o, curve[i][f])


def test_a_new_stroke_shows_in_the_preview_without_the_backend(na, shot):
    scene, job = shot["scene"], _job(na, shot["scene"])
    B = na.blender
    edit = B.images.find_image(job.shot, 1, "edit")
    on_disk = open(edit.filepath_raw, "rb").read()
    t0 = B.lifetime.first_frame(job)
    a = B.images.to_array(edit)
    seen = np.load(os.path.join(job.out_dir, "bake", "atlas_1_seen.npy"))
    seen[a[..., 3] > 0] = 0  # somewhere not painted yet, seen best
    r, c = (int(v) for v in np.unravel_index(np.argmax(seen), seen.shape))
    r, c = min(max(r, 3), seen.shape[0] - 3), min(max(c, 3), seen.shape[1] - 3)
    # the frame where most background pixels map onto it, weighted by the layer's opacity there
    uv = np.load(os.path.join(job.out_dir, "bake", "layer_1_uv.npy"))
    al = np.load(os.path.join(job.out_dir, "bake", "layer_1_alpha.npy")).astype(np.float32)
    S_ = seen.shape[0]
    near = (np.abs((uv[..., 0] + 1) * S_ / 2 - 0.5 - c) < 3) & (np.abs((uv[..., 1] + 1) * S_ / 2 - 0.5 - r) < 3)
    f = int(np.argmax((near & (al > 0.5)).sum((1, 2)) * np.asarray(S["curve"][1])))
    state = B.preview._SHOTS[job.shot]
    _render(scene, t0 + f, f"before_stroke_{f}")  # frame f is on screen (cached as arrays)
    assert f in state.frames
    B.images.paint_rect(edit, r - 3, c - 3, 6, 6, (0.0, 0.0, 1.0, 1.0))  # unsaved
    # what the add-on's depsgraph handler and paint timer run after a stroke in the UI
    assert B.preview.sync() == 1 and B.preview.sync() == 0  # only the changed layer, once
    # incremental: only the pixels that see the stroke's tiles, and exactly a full recompute
    H, W = state.frames[f].shape
    assert 0 < state.stats["sync_pixels"][f] < H * W  # (the tiny atlas: most of its frame sees the stroke)
    assert np.array_equal(state.frames[f].u8, B.preview._compute(state, f).u8)
    got = _render(scene, t0 + f, f"stroke_{f}")
    assert np.abs(got - S["preview"][f]).max() > 0.1  # the stroke is there at once
    # a sequencer-only render frees nothing: the paint stays unsaved, in memory
    assert edit.is_dirty and open(edit.filepath_raw, "rb").read() == on_disk
    assert B.images.to_array(edit)[r, c].tolist() == [0.0, 0.0, 1.0, 1.0]
    # another frame, shown later, is computed with the stroke, and the VSE shows its values as they are
    g = (f + 4) % 8
    got = _render(scene, t0 + g, f"stroke_{g}")
    u8 = state.frames[g].u8
    assert np.array_equal(u8, B.preview._compute(state, g).u8)
    assert np.array_equal(np.round(got * 255).astype(np.uint8), u8[::-1])


def test_preview_off_restores_the_file_bit_for_bit(na, shot):
    import bpy

    scene, job = shot["scene"], _job(na, shot["scene"])
    B = na.blender
    edits = B.images.job_images(job.shot, "edit")
    atlases = B.images.job_images(job.shot, "atlas")
    pixels = [B.images.to_array(i).copy() for i in edits + atlases]
    assert bpy.ops.neural_atlas.preview(job_id=job.job_id, action="OFF") == {"FINISHED"}
    assert B.preview.preview_strip(scene, job.shot) is None
    assert not list(B.preview.tagged(job.shot))
    # exactly what was there before preview on (the render strip, the artist's images, untouched)
    assert _datablocks() == S["before"] and _strips(scene) == S["strips"]
    assert all(np.array_equal(p, B.images.to_array(i)) for p, i in zip(pixels, edits + atlases))
    # and from a file without preview: on + off leaves datablocks, strips, the rendered frame as they were
    t0 = B.lifetime.first_frame(job)
    before, strips, frame = _datablocks(), _strips(scene), _render(scene, t0 + 3, "before_on")
    shading = scene.render.sequencer_gl_preview
    assert bpy.ops.neural_atlas.preview(job_id=job.job_id, action="TOGGLE") == {"FINISHED"}
    assert B.preview.is_on(scene, job) and scene.render.sequencer_gl_preview == shading
    folder = B.preview._SHOTS[job.shot].folder
    assert os.path.isfile(B.preview._frame_file(B.preview._SHOTS[job.shot], 3))
    assert bpy.ops.neural_atlas.preview(job_id=job.job_id, action="TOGGLE") == {"FINISHED"}
    assert not os.path.exists(folder)  # its frame files go with it
    assert _datablocks() == before and _strips(scene) == strips
    assert scene.render.sequencer_gl_preview == shading
    assert np.array_equal(_render(scene, t0 + 3, "after_off"), frame)


def test_frame_paint_mesh_lands_on_the_owner_layers_texels(na, shot):
    import bpy

    scene, job, clip = shot["scene"], _job(na, shot["scene"]), shot["clip"]
    B, fp = na.blender, na.blender.frame_paint
    t0 = B.lifetime.first_frame(job)
    before = _datablocks()
    with pytest.raises(fp.FramePaintError, match="outside the shot"):
        fp.setup(scene, job, t0 + 8)
    assert _datablocks() == before
    f = 5
    assert bpy.ops.neural_atlas.frame_paint(job_id=job.job_id, frame=t0 + f) == {"FINISHED"}
    ob = next(o for o in bpy.data.objects if o.get(fp.KEY) == job.shot)
    me = ob.data
    # each layer's paint slot: its canvas (the edit as seen at this frame), never the edit itself
    slots = [m.node_tree.nodes.active.image for m in me.materials]
    assert all(img.get(fp.KEY) == job.shot and img.name.endswith(f"canvas {i}") for i, img in enumerate(slots))
    assert [tuple(img.size) for img in slots] == [tuple(B.images.find_image(job.shot, i, "edit").size)
                                                   for i in (0, 1)]
    assert me.uv_layers.active.name == "Atlas"
    bake = os.path.join(job.out_dir, "bake")
    alpha = np.stack([np.load(os.path.join(bake, f"layer_{i}_alpha.npy"))[f].astype(np.float32) for i in (0, 1)])
    uv = [np.load(os.path.join(bake, f"layer_{i}_uv.npy"))[f] for i in (0, 1)]
    mi = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("material_index", mi)
    ls = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("loop_start", ls)
    uvs = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers["Atlas"].data.foreach_get("uv", uvs)
    uvs = uvs.reshape(-1, 2)
    H, W = alpha.shape[1:]
    checked = {0: 0, 1: 0}
    for y in range(1, H):
        for x in range(W - 1):
            corners = [(y, x), (y, x + 1), (y - 1, x + 1), (y - 1, x)]  # top-down rows
            owner = int(np.argmax([sum(alpha[i][c] for c in corners) for i in (0, 1)]))  # frontmost
            fi = fp.face_at(me, x, y)
            assert mi[fi] == owner
            s_, t_ = uvs[ls[fi]]  # the face's first corner is pixel (x, y)
            S_ = 64
            u, v = uv[owner][y, x]
            assert (s_ * S_ - 0.5, (1 - t_) * S_ - 0.5) == pytest.approx(((u + 1) * S_ / 2 - 0.5,
                                                                            (v + 1) * S_ / 2 - 0.5), abs=1e-3)
            checked[owner] += 1
    assert sum(checked.values()) == (H - 1) * (W - 1), checked
    # the layer the artist picks: every face goes to it, with its own atlas coordinates
    assert bpy.ops.neural_atlas.frame_paint(job_id=job.job_id, frame=t0 + f, layer=0) == {"FINISHED"}
    me = next(o for o in bpy.data.objects if o.get(fp.KEY) == job.shot).data
    me.polygons.foreach_get("material_index", mi)
    me.polygons.foreach_get("loop_start", ls)
    me.uv_layers["Atlas"].data.foreach_get("uv", uvs.reshape(-1))
    assert (mi == 0).all()
    fi = fp.face_at(me, W // 2, H // 2)
    u, v = uv[0][H // 2, W // 2]
    assert tuple(uvs[ls[fi]]) == pytest.approx(((u + 1) / 2, (1 - v) / 2), abs=1e-5)
    assert bpy.ops.neural_atlas.frame_paint_end(job_id=job.job_id) == {"FINISHED"}
    assert not any(o.get(fp.KEY) for o in bpy.data.objects)


def test_frame_paint_lands_as_paint_frame_does_the_paint_as_seen_over_that_frames_residual(na, shot):
    """The frame mesh's colour rule is the backend's paint_frame's: what the artist paints on a
    frame is the colour as seen there, so the edit stores it divided by that frame's residual.
    Headless stand-in for a brush stroke (Texture Paint segfaults in the bpy module): pixels
    written into the layer's canvas, then ``flush``, what the paint timer and depsgraph handler
    run after strokes."""
    import bpy

    scene, job = shot["scene"], _job(na, shot["scene"])
    B, fp = na.blender, na.blender.frame_paint
    t0 = B.lifetime.first_frame(job)
    bake = os.path.join(job.out_dir, "bake")
    alpha = np.stack([np.load(os.path.join(bake, f"layer_{i}_alpha.npy")).astype(np.float32) for i in (0, 1)])
    res = np.load(os.path.join(bake, "layer_1_residual.npy")).astype(np.float32)
    uv = np.load(os.path.join(bake, "layer_1_uv.npy"))
    # the background pixels whose lighting is furthest from 1 (5 x 5 blocks owned by the background)
    own = (alpha[1] > 0.9) & (alpha[1] >= alpha[0])
    F_, H, W = own.shape
    score = np.where(own, np.abs(res - 1).mean(-1), -1.0)
    blocks = [(score[f, y - 2:y + 3, x - 2:x + 3].min(), f, y, x) for f in range(F_) for y in range(3, H - 3)
              for x in range(3, W - 3)]
    _, f, y, x = max(blocks)
    R = res[f, y - 2:y + 3, x - 2:x + 3]
    assert np.abs(R - 1).mean() > 0.04, R  # lit enough to tell "/ R" from raw paint
    edit = B.images.find_image(job.shot, 1, "edit")
    before = B.images.to_array(edit).copy()
    assert bpy.ops.neural_atlas.frame_paint(job_id=job.job_id, frame=t0 + f) == {"FINISHED"}
    canvas = bpy.data.images[f"NA {job.label} frame paint canvas 1"]
    Sz = int(edit.size[0])
    # the stroke: the texels the 5 x 5 block's pixels map to, and one texel around them
    cols = (uv[f, y - 2:y + 3, x - 2:x + 3, 0] + 1) * Sz / 2
    rows = (uv[f, y - 2:y + 3, x - 2:x + 3, 1] + 1) * Sz / 2
    c0, c1 = int(np.floor(cols.min())) - 1, int(np.floor(cols.max())) + 2
    r0, r1 = int(np.floor(rows.min())) - 1, int(np.floor(rows.max())) + 2
    C = np.float32([0.9, 0.35, 0.1, 1.0])
    a = B.images.to_array(canvas)
    a[r0:r1, c0:c1] = C
    B.images.write_array(canvas, a)
    assert fp.flush() == 1 and fp.flush() == 0
    after = B.images.to_array(edit)
    changed = np.any(after != before, -1)
    assert changed[r0:r1, c0:c1].all() and not changed[:r0].any() and not changed[r1:].any()  # only the stroke
    # the backend's paint_frame with the same colour on the same pixels
    paint = np.zeros((H, W, 4), np.float32)
    paint[y - 2:y + 3, x - 2:x + 3] = C
    ppath, pout = os.path.join(TMP, "fp_paint.png"), os.path.join(TMP, "fp_edits")
    shutil.rmtree(pout, ignore_errors=True)
    img = bpy.data.images.new("fp paint", W, H, alpha=True)
    B.images.write_array(img, paint)
    img.filepath_raw, img.file_format = ppath, "PNG"
    img.save()
    bpy.data.images.remove(img)
    pf = subprocess.run([BACKEND_PY, "-m", "backend", "paint-frame", job.out_dir, "--frame", str(f), "--image", ppath,
                         "--layer", "1", "--out-edits", pout], check=True, cwd=ROOT, capture_output=True, text=True)
    theirs = read_png(os.path.join(pout, "layer_1.png"))
    # (the tiny decomposition's mapping is strongly minified there: the block's 25 pixels land on
    # a texel or two, which average painted and unpainted pixels; compare the stored colour,
    # straight alpha, wherever paint_frame put paint)
    both = (theirs[..., 3] > 0.2) & changed
    assert both.sum() >= 1, (theirs[..., 3].max(), pf.stdout[-300:])
    # (the rendered frame is not compared with the paint: the tiny decomposition's reconstruction
    # error plate - alpha R T is large; the preview and Render Edit of the edit are tested above)
    ours = after[both][:, :3]
    d = np.abs(ours - theirs[both][:, :3])
    raw = np.abs(C[:3] - theirs[both][:, :3])  # what landing the raw paint (the old rule) would differ by
    assert d.mean() <= 0.02 and d.mean() * 2 < raw.mean(), (d.mean(), raw.mean())
    assert bpy.ops.neural_atlas.frame_paint_end(job_id=job.job_id) == {"FINISHED"}
    assert not any(i.get(fp.KEY) for i in bpy.data.images) and not fp._CANVASES
    assert np.array_equal(B.images.to_array(edit), after) and not edit.is_dirty  # saved as it was flushed


def test_project_paint_from_image_lands_in_the_owner_layer_and_shows_in_the_preview(na, shot):
    """The headless stand-in for a brush stroke on a frame (Texture Paint cannot run in the bpy
    module: paint.image_paint segfaults there): an RGBA paint image over frame f, projected by
    the backend's paint_frame job, merged into the edit images in memory."""
    import bpy

    scene, job = shot["scene"], _job(na, shot["scene"])
    B = na.blender
    t0 = B.lifetime.first_frame(job)
    f = 6
    scene.frame_set(t0 + f)
    assert bpy.ops.neural_atlas.paint_image_new(job_id=job.job_id) == {"FINISHED"}
    paint = next(i for i in bpy.data.images if i.get("neural_atlas_paint_frame") == t0 + f)
    assert tuple(paint.size) == (64, 36)
    # bad input first: another size is refused and nothing is sent or changed
    wrong = bpy.data.images.new("wrong size", 32, 18, alpha=True)
    edits = {int(e[B.images.KEY_LAYER]): e for e in B.images.job_images(job.shot, "edit")}
    before = {i: B.images.to_array(e).copy() for i, e in edits.items()}
    n_jobs = len(B.props.settings(scene).jobs)
    with pytest.raises(RuntimeError, match="32x18.*refused"):
        bpy.ops.neural_atlas.project_paint(job_id=job.job_id, image=wrong.name, frame=t0 + f)
    with pytest.raises(RuntimeError, match="outside the shot"):
        bpy.ops.neural_atlas.project_paint(job_id=job.job_id, image=paint.name, frame=t0 + 40)
    assert len(B.props.settings(scene).jobs) == n_jobs
    assert all(np.array_equal(before[i], B.images.to_array(e)) for i, e in edits.items())
    bpy.data.images.remove(wrong)
    # a 5 x 5 mark on the frame, where the background owns the pixels
    alpha = np.load(os.path.join(job.out_dir, "bake", "layer_1_alpha.npy"))[f].astype(np.float32)
    y, x = 18, 32
    assert alpha[y, x] > 0.5
    a = np.zeros((36, 64, 4), np.float32)
    a[y - 2:y + 3, x - 2:x + 3] = (0.05, 0.95, 0.95, 1.0)
    B.images.write_array(paint, a)
    assert bpy.ops.neural_atlas.preview(job_id=job.job_id, action="ON") == {"FINISHED"}
    plain = _render(scene, t0 + f, "unprojected")
    assert bpy.ops.neural_atlas.project_paint(job_id=job.job_id, image=paint.name, wait=True,
                                              timeout=300) == {"FINISHED"}
    pj = _job(na, scene, "paint_frame")
    assert pj.state == "done" and not pj.error, (pj.error, pj.hint)
    after = {i: B.images.to_array(e) for i, e in edits.items()}
    changed = {i: int(np.any(after[i] != before[i], -1).sum()) for i in edits}
    # the background owns the pixels (the object's layer may share its soft edge, the backend's rule)
    assert changed[1] > 0 and changed[1] >= changed[0], changed
    assert edits[1].is_dirty  # in memory; nothing reloaded, Render Edit / save writes it
    # the preview (synced when the job's paint was merged) shows the mark where it was painted
    got = _render(scene, t0 + f, "projected")
    d = np.abs(got - plain).max(-1)
    assert d[y - 2:y + 3, x - 2:x + 3].mean() > 0.1
    far = np.ones_like(d, bool)
    far[y - 5:y + 6, x - 5:x + 6] = False
    # (far pixels may see the same texels where the tiny test decomposition's mapping folds)
    assert d[far].mean() * 20 < d[y - 2:y + 3, x - 2:x + 3].mean()
    assert bpy.ops.neural_atlas.preview(job_id=job.job_id, action="OFF") == {"FINISHED"}


_RESIZE_LAYER = r"""
import json, sys
from pathlib import Path
import cv2, numpy as np
from backend.clip import write_png16_rgba
out, layer, S = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
b = out / "bake"
rgb = cv2.resize(np.load(b / f"atlas_{layer}.npy"), (S, S), interpolation=cv2.INTER_AREA)
seen = cv2.resize(np.load(b / f"atlas_{layer}_seen.npy"), (S, S), interpolation=cv2.INTER_AREA)
np.save(b / f"atlas_{layer}.npy", rgb.astype(np.float32))
np.save(b / f"atlas_{layer}_seen.npy", seen.astype(np.float32))
write_png16_rgba(out / "atlas" / f"layer_{layer}.png", np.concatenate([rgb, seen[..., None]], -1).clip(0, 1))
for meta in [b / "meta.json", out / "report.json"]:
    m = json.loads(meta.read_text())
    n = m["layers"] if isinstance(m["layers"], int) else len(m["layers"])
    sizes = m.get("atlas_sizes") or [m["atlas_size"]] * n
    sizes[layer] = S
    m["atlas_sizes"], m["atlas_size"] = sizes, max(sizes)
    meta.write_text(json.dumps(m))
for folder in ("maps", "maps_source"):
    p = out / folder / "meta.json"
    if p.is_file():
        m = json.loads(p.read_text())
        m["layers"][layer]["atlas_size"] = S
        p.write_text(json.dumps(m))
"""


def test_layers_with_atlases_of_different_sizes(na, shot):
    """Each layer has its own atlas size (export.atlas_size = 0 sizes every layer from its own
    magnification): layer 0's atlas rewritten at another size, as such a decomposition writes
    it. Load Atlases gives each layer an atlas and an edit image of its own size (the earlier
    paint scaled with it), the preview reads the maps' per-layer sizes and matches Render Edit."""
    import bpy

    scene, job = shot["scene"], _job(na, shot["scene"])
    B = na.blender
    if B.preview.is_on(scene, job):
        assert bpy.ops.neural_atlas.preview(job_id=job.job_id, action="OFF") == {"FINISHED"}
    S1 = int(np.load(os.path.join(job.out_dir, "bake", "atlas_1.npy"), mmap_mode="r").shape[0])
    S0 = S1 - 24
    subprocess.run([BACKEND_PY, "-c", _RESIZE_LAYER, job.out_dir, "0", str(S0)], check=True, cwd=ROOT,
                   capture_output=True)
    assert bpy.ops.neural_atlas.load_atlases(job_id=job.job_id) == {"FINISHED"}
    for layer, S_ in ((0, S0), (1, S1)):
        assert tuple(B.images.find_image(job.shot, layer, "atlas").size) == (S_, S_)
        assert tuple(B.images.find_image(job.shot, layer, "edit").size) == (S_, S_)
    # a fresh mark on layer 0's edit (now S0 x S0) where that layer is seen best
    edit0 = B.images.find_image(job.shot, 0, "edit")
    seen = np.load(os.path.join(job.out_dir, "bake", "atlas_0_seen.npy"))
    assert seen.shape == (S0, S0)
    k = 10
    cs = np.pad(seen, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    win = cs[k:, k:] - cs[:-k, k:] - cs[k:, :-k] + cs[:-k, :-k]
    r0, c0 = np.unravel_index(np.argmax(win), win.shape)
    B.images.paint_rect(edit0, int(r0), int(c0), k, k, (1.0, 0.9, 0.0, 1.0))
    assert bpy.ops.neural_atlas.render_edit(job_id=job.job_id, wait=True, timeout=300) == {"FINISHED"}
    rjob = _job(na, scene, "render")
    assert rjob.state == "done" and rjob.placed, (rjob.error, rjob.hint)
    frames_dir = bpy.path.abspath(B.vse.find_strip(scene, rjob.render_strip).directory)
    assert bpy.ops.neural_atlas.preview(job_id=job.job_id, action="ON") == {"FINISHED"}
    maps = B.preview._SHOTS[job.shot].maps
    assert [m.atlas_size for m in maps.layers] == [S0, S1]
    t0 = B.lifetime.first_frame(job)
    for f in (5, 7):  # layer 0's edit is on there (its frame range from the earlier tests)
        got = _render(scene, t0 + f, f"sizes_{f}")
        ref = read_png(os.path.join(frames_dir, f"{f:05d}.png"))[..., :3]
        d = np.abs(got - ref) * 255
        assert d.mean() <= 1.0 and d.max() <= 3.0, (f, d.mean(), d.max())
    assert bpy.ops.neural_atlas.preview(job_id=job.job_id, action="OFF") == {"FINISHED"}
