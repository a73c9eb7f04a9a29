"""The whole loop against a real backend process (CPU, tiny synthetic clip), driven the
way the GUI drives it: operators submit, the timer poller (called directly: timers
never fire in the bpy module) applies progress and results.

One decomposition (a module fixture, so any test here also runs alone) serves every test:
it is killed and restarted mid-job and must be re-attached; then atlases and edit images, a
programmatic "brush stroke", Render Edit (saving the dirty edit) and the VSE result checked
against the ground truth computed from the engine's baked maps.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from conftest import TMP, read_png, tick_until, tiny_overrides, use_local_backend

@pytest.fixture(scope="module")
def shot(na, clip):
    import bpy

    na.blender.runtime.reset()
    bpy.ops.wm.read_homefile(use_empty=True)
    p = use_local_backend(na, os.path.join(TMP, "ws_e2e"))
    scene = bpy.context.scene
    vse, props = na.blender.vse, na.blender.props
    strip = vse.add_source_strip(scene, os.path.join(clip, "video_frames"), channel=1, frame_start=1)
    scene.sequence_editor.active_strip = strip
    vse.fit_scene_to_strip(scene, strip, (64, 36))
    st = props.settings(scene)
    st.mask_mode, st.mask_folder = "FOLDER", os.path.join(clip, "masks")
    yield {"scene": scene, "strip": strip, "prefs": p, "clip": clip}
    na.blender.runtime.shutdown()


def _job(na, scene, kind="decompose"):
    jobs = [j for j in na.blender.props.settings(scene).jobs if j.kind == kind]
    return jobs[-1]


@pytest.fixture(scope="module")
def decomposed(na, shot):
    """The module's one decomposition, killed and restarted mid-job: any test of this module
    may run alone (``-k``), it gets the job all the same. Returns what was seen on the way."""
    import bpy

    rt = na.blender.runtime
    scene = shot["scene"]
    seen = {}
    r = bpy.ops.neural_atlas.decompose(preset="demo", overrides=tiny_overrides(iterations=40))
    assert r == {"FINISHED"}
    job = _job(na, scene)
    seen["submitted"] = (job.state, bool(job.token), rt.get().backend is not None,
                         bpy.app.timers.is_registered(rt.tick))  # the GUI driver is armed
    # progress flows into the job record through the poller
    tick_until(na, lambda: _job(na, scene).phase == "train" and _job(na, scene).iteration >= 10, 240)
    job = _job(na, scene)
    seen["running"] = (bool(job.job_id), job.state, job.fraction, job.iterations)
    job_id, first_iter = job.job_id, job.iteration
    # the backend dies mid-job (crash, OOM kill, ...)
    backend = rt.get().backend
    os.killpg(backend.pid, signal.SIGKILL)
    backend.proc.wait(10)
    tick_until(na, lambda: rt.get().backend is None, 60)
    seen["died"] = (rt.get().last_error, rt.get().last_hint, backend.log_path)
    # the artist restarts it: the same job resumes and is re-attached, not lost
    seen["restart"] = bpy.ops.neural_atlas.backend_start()
    tick_until(na, lambda: _job(na, scene).state in ("done", "failed", "cancelled"), 300)
    job = _job(na, scene)
    info = rt.get().session.jobs.get(job.job_id, {})
    seen["final"] = (job.job_id == job_id, job.state, job.error, job.hint, job.iteration, first_iter,
                     info.get("attempts", 0), info.get("resumed_from"))
    return seen


def test_decompose_survives_backend_kill_and_restart(na, shot, decomposed):
    state, has_token, has_backend, timer_armed = decomposed["submitted"]
    assert state == "submitting" and has_token and has_backend and timer_armed
    has_id, state, fraction, iterations = decomposed["running"]
    assert has_id and state == "running" and 0 < fraction < 1 and iterations == 40
    last_error, last_hint, log_path = decomposed["died"]
    assert "exited" in last_error and log_path in last_hint
    assert decomposed["restart"] == {"FINISHED"}
    same_id, state, error, hint, iteration, first_iter, attempts, resumed_from = decomposed["final"]
    assert same_id and state == "done", (error, hint)
    assert attempts >= 2 or resumed_from is not None
    assert iteration == 40 and first_iter < 40


def test_atlases_and_edit_images(na, shot, decomposed):
    job = _job(na, shot["scene"])
    assert job.atlases_loaded and job.n_layers == 2  # one object + background
    images = na.blender.images
    atlases, edits = images.job_images(job.shot, "atlas"), images.job_images(job.shot, "edit")
    assert [a.get(images.KEY_LAYER) for a in atlases] == [0, 1] == [e.get(images.KEY_LAYER) for e in edits]
    for a, e in zip(atlases, edits):
        assert tuple(a.size) == (64, 64) and a.is_float  # 16-bit RGBA PNG
        assert a.colorspace_settings.name == "sRGB" and a.alpha_mode == "STRAIGHT"
        assert os.path.dirname(a.filepath).endswith(os.path.join("out", "atlas"))
        assert tuple(e.size) == (64, 64) and e.channels == 4 and not e.is_float
        assert e.colorspace_settings.name == "sRGB"
        assert images.to_array(e).max() == 0.0 and os.path.isfile(e.filepath)
    assert bpy_ops_paint(na, job) == {"FINISHED"}


def bpy_ops_paint(na, job):
    import bpy

    return bpy.ops.neural_atlas.paint_setup(job_id=job.job_id, layer=1)


def _bilinear(tex, col, row):
    S_ = tex.shape[0]
    c0 = np.clip(np.floor(col).astype(int), 0, S_ - 1)
    r0 = np.clip(np.floor(row).astype(int), 0, S_ - 1)
    c1, r1 = np.clip(c0 + 1, 0, S_ - 1), np.clip(r0 + 1, 0, S_ - 1)
    fc = np.clip(col - np.floor(col), 0, 1)[..., None]
    fr = np.clip(row - np.floor(row), 0, 1)[..., None]
    top = tex[r0, c0] * (1 - fc) + tex[r0, c1] * fc
    bot = tex[r1, c0] * (1 - fc) + tex[r1, c1] * fc
    return top * (1 - fr) + bot * fr


def test_render_edit_saves_paint_and_lands_where_ground_truth_says(na, shot, decomposed):
    import bpy

    scene = shot["scene"]
    job = _job(na, scene)
    images, vse = na.blender.images, na.blender.vse
    bake = os.path.join(job.out_dir, "bake")
    layer = 1  # the background
    seen = np.load(os.path.join(bake, f"atlas_{layer}_seen.npy"))
    T = np.load(os.path.join(bake, f"atlas_{layer}.npy"))
    # a 10x10 texel mark where the background is seen best
    k = 10
    cs = np.pad(seen, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    win = cs[k:, k:] - cs[:-k, k:] - cs[k:, :-k] + cs[:-k, :-k]
    r0, c0 = np.unravel_index(np.argmax(win), win.shape)
    color = (1.0 - np.round(T[r0:r0 + k, c0:c0 + k].mean((0, 1)))).astype(np.float32)
    edit = images.find_image(job.shot, layer, "edit")
    images.paint_rect(edit, int(r0), int(c0), k, k, (*color.tolist(), 1.0))
    assert edit.is_dirty
    # Render Edit: saves the dirty edit first, submits, the poller places the result
    assert bpy.ops.neural_atlas.render_edit(job_id=job.job_id) == {"FINISHED"}
    assert not edit.is_dirty
    png = read_png(bpy.path.abspath(edit.filepath))
    assert np.all(png[r0:r0 + k, c0:c0 + k, 3] == 1.0) and png[..., 3].sum() == k * k
    assert images.to_array(edit)[r0, c0, 3] == 1.0  # still in memory: never reloaded
    tick_until(na, lambda: _job(na, scene, "render").placed or _job(na, scene, "render").state
               in ("failed", "cancelled"), 180)
    rjob = _job(na, scene, "render")
    assert rjob.state == "done" and rjob.placed, (rjob.error, rjob.hint)
    src, out = shot["strip"], vse.find_strip(scene, rjob.render_strip)
    assert out.channel > src.channel and out.type == "IMAGE"
    assert (out.frame_final_start, out.frame_final_end) == (src.frame_final_start, src.frame_final_end)
    # render the VSE itself at one timeline frame and compare with the ground truth
    scene.view_settings.view_transform = "Standard"
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    t = 5
    f = int(t - src.frame_start)
    scene.frame_set(t)
    scene.render.filepath = os.path.join(TMP, "vse_frame.png")
    bpy.ops.render.render(write_still=True)
    got = read_png(scene.render.filepath)[..., :3]
    plate = read_png(os.path.join(shot["clip"], "video_frames", f"{f:05d}.png"))[..., :3]
    uv = np.load(os.path.join(bake, f"layer_{layer}_uv.npy"))[f]
    alpha = np.load(os.path.join(bake, f"layer_{layer}_alpha.npy"))[f].astype(np.float32)
    resid = np.load(os.path.join(bake, f"layer_{layer}_residual.npy"))[f].astype(np.float32)
    Sz = T.shape[0]
    col, row = (uv[..., 0] + 1) * Sz / 2 - 0.5, (uv[..., 1] + 1) * Sz / 2 - 0.5
    fc, fr = np.floor(col), np.floor(row)
    weight = alpha * resid.mean(-1)
    touched = (fc + 1 >= c0) & (fc <= c0 + k - 1) & (fr + 1 >= r0) & (fr <= r0 + k - 1) & (weight > 1e-3)
    core = (fc >= c0) & (fc + 1 <= c0 + k - 1) & (fr >= r0) & (fr + 1 <= r0 + k - 1)
    # nowhere else: every pixel whose footprint misses the mark is the plate, exactly
    assert np.abs(got - plate)[~touched].max() <= 2.5 / 255
    # exactly where: inside, out = plate + alpha * R * (C - T(uv))
    expected = np.clip(plate + alpha[..., None] * resid * (color - _bilinear(T, col, row)), 0, 1)
    assert core.sum() >= 5
    assert np.abs(got - expected)[core].max() <= 4 / 255
    assert np.abs(got - plate)[core].max() > 0.1  # and the mark is visible
    # the strip shows the backend's frame for this timeline frame
    shown = read_png(os.path.join(bpy.path.abspath(out.directory), out.strip_elem_from_frame(t).filename))
    assert np.abs(shown[..., :3] - got).max() <= 2.5 / 255


def test_second_render_replaces_the_first(na, shot, decomposed):
    import bpy

    scene = shot["scene"]
    job = _job(na, scene)
    n_jobs = len(na.blender.props.settings(scene).jobs)
    assert bpy.ops.neural_atlas.render_edit(job_id=job.job_id) == {"FINISHED"}
    assert len(na.blender.props.settings(scene).jobs) == n_jobs + 1
    tick_until(na, lambda: _job(na, scene, "render").placed or _job(na, scene, "render").state
               in ("failed", "cancelled"), 180)
    renders = na.blender.vse.previous_renders(scene, job.shot)
    assert len(renders) == 1 and renders[0].get(na.blender.vse.KEY_RENDER_JOB) == _job(na, scene, "render").job_id
    strips = [s for s in na.blender.vse.all_strips(scene)]
    assert len(strips) == 2  # source + one render, no duplicates
