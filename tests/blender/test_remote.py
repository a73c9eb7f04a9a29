"""A backend on "another machine": started apart from Blender (its own process, workspace and
keys, CURVE on a loopback endpoint), and the add-on told its files are remote. Decompose,
paint, the live preview and Render Edit work through uploads and downloads only; the
result equals the same steps on a shared filesystem bit for bit; a re-render after a small
edit sends only that edit (bytes counted).

One backend serves both runs (its allowed roots let it read the clip for the shared run);
in the remote run the add-on never reads the backend's folders: everything it shows lies
in its own workspace.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from conftest import ADDON_MODULE, BACKEND_PY, ROOT, TMP, free_port, tick_until, tiny_overrides

BACKEND_WS = os.path.join(TMP, "remote_backend_ws")
S: dict = {}


def _keys() -> tuple[str, str]:
    server, client = os.path.join(TMP, "remote_keys_server"), os.path.join(TMP, "remote_keys_client")
    for args in (["init"], ["add-client", "blender"]):
        subprocess.run([BACKEND_PY, "-m", "backend", "keys", *args, "--keys", server], check=True, cwd=ROOT,
                       capture_output=True)
    os.makedirs(client, mode=0o700, exist_ok=True)
    for src, dst in (("signing.key", "signing.key"), ("server.key", "server.key"),
                     (os.path.join("issued", "blender.key_secret"), "client.key_secret")):
        shutil.copyfile(os.path.join(server, src), os.path.join(client, dst))
        os.chmod(os.path.join(client, dst), 0o600)
    return server, client


@pytest.fixture(scope="module")
def backend(na, clip):
    import bpy

    # the preferences this module changes go back as they were: later modules (test_setup,
    # test_shell) expect a plain local backend, not CURVE on loopback with REMOTE files
    prefs = bpy.context.preferences.addons[ADDON_MODULE].preferences
    saved = {k: getattr(prefs, k) for k in ("endpoint", "start_local", "keys_dir", "use_curve",
                                            "workspace", "files_mode")}
    server_keys, client_keys = _keys()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = open(os.path.join(TMP, "remote_backend.log"), "ab")
    proc = subprocess.Popen([BACKEND_PY, "-m", "backend", "serve", "--endpoint", endpoint, "--workspace", BACKEND_WS,
                             "--keys", server_keys, "--curve", "--no-device-probe", "--allow-root", BACKEND_WS,
                             "--allow-root", clip, "--allow-root", os.path.join(TMP, "ws_shared")],
                            cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
    end = time.monotonic() + 120
    while not os.path.isfile(os.path.join(BACKEND_WS, "server.json")):
        assert proc.poll() is None and time.monotonic() < end, open(log.name).read()[-3000:]
        time.sleep(0.1)
    yield {"endpoint": endpoint, "keys": client_keys, "clip": clip}
    na.blender.runtime.reset()
    os.killpg(proc.pid, 9)
    proc.wait(10)
    for k, v in saved.items():
        setattr(prefs, k, v)


def _open(na, backend, workspace: str, mode: str):
    """An empty file with a strip of the clip, the add-on pointed at the backend."""
    import bpy

    na.blender.runtime.reset()
    bpy.ops.wm.read_homefile(use_empty=True)
    p = bpy.context.preferences.addons[ADDON_MODULE].preferences
    p.endpoint, p.start_local, p.keys_dir, p.use_curve = backend["endpoint"], False, backend["keys"], True
    p.workspace, p.files_mode = workspace, mode
    scene = bpy.context.scene
    B = na.blender
    strip = B.vse.add_source_strip(scene, os.path.join(backend["clip"], "video_frames"), channel=1, frame_start=1)
    scene.sequence_editor.active_strip = strip
    B.vse.fit_scene_to_strip(scene, strip, (64, 36))
    st = B.props.settings(scene)
    st.mask_mode, st.mask_folder = "FOLDER", os.path.join(backend["clip"], "masks")
    # a shot cut from the sequence: source frames 1-7 of 0-7 (a remote backend gets only these)
    scene.frame_start, st.use_scene_range = 2, True
    return scene


def _job(na, scene, kind="decompose"):
    return [j for j in na.blender.props.settings(scene).jobs if j.kind == kind][-1]


def _files(folder: str) -> dict[str, bytes]:
    return {os.path.relpath(p, folder): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)) if os.path.isfile(p)}


def _run(na, scene, workspace: str) -> dict:
    """Decompose, paint both layers, Render Edit; then a small stroke on layer 1 and again."""
    import bpy

    B = na.blender
    T = B.transfers
    n0 = len(T.HISTORY)
    r = bpy.ops.neural_atlas.decompose(preset="demo", overrides=tiny_overrides(iterations=10), wait=True,
                                       timeout=300)
    job = _job(na, scene)
    assert r == {"FINISHED"} and job.atlases_loaded, (job.error, job.hint)
    out = {"job": job, "atlases": _files(os.path.join(job.out_dir, "atlas")), "moved": T.HISTORY[n0:]}
    for layer, color in ((0, (1.0, 0.0, 1.0, 1.0)), (1, (0.0, 1.0, 0.0, 1.0))):
        B.images.paint_rect(B.images.find_image(job.shot, layer, "edit"), 20, 20, 12, 12, color)
    # paint on a frame: the backend's paint_frame job projects it into the edit images
    t0, f = B.lifetime.first_frame(job), 6
    scene.frame_set(t0 + f)
    assert bpy.ops.neural_atlas.paint_image_new(job_id=job.job_id) == {"FINISHED"}
    paint = next(i for i in bpy.data.images if i.get("neural_atlas_paint_frame") == t0 + f)
    mark = np.zeros((36, 64, 4), np.float32)
    mark[16:21, 30:35] = (0.05, 0.95, 0.95, 1.0)
    B.images.write_array(paint, mark)
    before = {i: B.images.to_array(B.images.find_image(job.shot, i, "edit")).copy() for i in (0, 1)}
    n_fp = len(T.HISTORY)
    assert bpy.ops.neural_atlas.project_paint(job_id=job.job_id, image=paint.name, wait=True,
                                              timeout=300) == {"FINISHED"}
    pj = _job(na, scene, "paint_frame")
    assert pj.state == "done" and not pj.error, (pj.error, pj.hint)
    after = {i: B.images.to_array(B.images.find_image(job.shot, i, "edit")).copy() for i in (0, 1)}
    assert any(np.any(after[i] != before[i]) for i in (0, 1))  # the paint landed
    out["frame_paint"] = after
    out["frame_paint_moved"] = T.HISTORY[n_fp:]
    n1 = len(T.HISTORY)
    assert bpy.ops.neural_atlas.render_edit(job_id=job.job_id, wait=True, timeout=300) == {"FINISHED"}
    rjob = _job(na, scene, "render")
    assert rjob.placed, (rjob.error, rjob.hint)
    out["render"] = _files(bpy.path.abspath(B.vse.find_strip(scene, rjob.render_strip).directory))
    out["render_moved"] = T.HISTORY[n1:]
    # a few strokes on layer 1 only
    B.images.paint_rect(B.images.find_image(job.shot, 1, "edit"), 40, 40, 3, 3, (1.0, 1.0, 0.0, 1.0))
    n2 = len(T.HISTORY)
    assert bpy.ops.neural_atlas.render_edit(job_id=job.job_id, wait=True, timeout=300) == {"FINISHED"}
    rjob = _job(na, scene, "render")
    assert rjob.placed, (rjob.error, rjob.hint)
    out["render2"] = _files(bpy.path.abspath(B.vse.find_strip(scene, rjob.render_strip).directory))
    out["render2_moved"] = T.HISTORY[n2:]
    out["edits"] = {i: bpy.path.abspath(B.images.find_image(job.shot, i, "edit").filepath) for i in (0, 1)}
    # the live preview builds from the maps and the plate, as this machine has them
    assert bpy.ops.neural_atlas.preview(job_id=job.job_id, action="ON") == {"FINISHED"}
    assert B.preview.preview_strip(scene, job.shot) is not None
    out["plate"] = B.preview.plate_of(job.out_dir).path
    out["out_dir"] = job.out_dir
    return out


def test_remote_backend_equals_shared_filesystem_bit_for_bit(na, backend):
    scene = _open(na, backend, os.path.join(TMP, "ws_shared"), "SHARED")
    shared = _run(na, scene, os.path.join(TMP, "ws_shared"))
    assert shared["moved"] == shared["frame_paint_moved"] == shared["render_moved"] == []  # read in place
    assert shared["out_dir"].startswith(BACKEND_WS)

    ws = os.path.join(TMP, "ws_remote")
    scene = _open(na, backend, ws, "REMOTE")
    remote = _run(na, scene, ws)
    # everything the add-on shows lies in its own workspace, downloaded
    assert remote["out_dir"].startswith(ws) and not remote["out_dir"].startswith(BACKEND_WS)
    assert remote["plate"].startswith(backend["clip"])  # the preview's plate: this machine's frames
    for img in __import__("bpy").data.images:
        if img.filepath:
            assert not os.path.realpath(img.filepath).startswith(os.path.realpath(BACKEND_WS)), img.filepath
    up, down = remote["moved"]
    in_range = sorted(glob.glob(os.path.join(backend["clip"], "video_frames", "*.png")))[1:]
    mask_frames = sorted(glob.glob(os.path.join(backend["clip"], "masks", "*", "*.png")))[1:]
    assert len(in_range) == len(mask_frames) == 7
    # only the shot's frames and mask frames travel, not the whole sequence
    assert up.what == "upload" and up.files == 14 and up.sent_bytes <= up.total_bytes
    assert up.total_bytes == sum(os.path.getsize(p) for p in in_range + mask_frames)
    assert down.what == "download" and down.sent_bytes > 0 and os.path.isfile(
        os.path.join(remote["out_dir"], "maps", "meta.json"))
    # bit for bit: atlases and both renders
    assert remote["atlases"] == shared["atlases"]
    assert remote["render"] == shared["render"] and remote["render2"] == shared["render2"]
    assert remote["render"] != remote["render2"]
    assert all(np.array_equal(remote["frame_paint"][i], shared["frame_paint"][i]) for i in (0, 1))
    fp_up, fp_down = remote["frame_paint_moved"]
    assert fp_up.what == "upload" and fp_down.what == "download" and fp_down.files > 0
    # the re-render after a few strokes on layer 1 sends only layer 1's edit image
    (up1, _d1), (up2, _d2) = remote["render_moved"], remote["render2_moved"]
    sizes = {i: os.path.getsize(p) for i, p in remote["edits"].items()}
    assert up1.total_bytes > 0 and up1.files == 2
    assert up2.sent_bytes == sizes[1] and up2.skipped_bytes == sizes[0]
    # the GUI's way: the transfer on a thread, the timer applies it; all files already here
    import bpy

    T = na.blender.transfers
    job = _job(na, scene)
    job.atlases_loaded, job.out_dir = False, ""
    T.THREADED = True
    try:
        assert bpy.ops.neural_atlas.load_atlases(job_id=job.job_id) == {"FINISHED"}
        assert job.job_id in T.TASKS and T.TASKS[job.job_id].thread is not None
        tick_until(na, lambda: _job(na, scene).atlases_loaded, 120)
    finally:
        T.THREADED = None
    again = T.HISTORY[-1]
    assert again.state == "done" and again.sent_bytes == 0 and again.skipped_bytes == again.total_bytes > 0
    assert _job(na, scene).out_dir == remote["out_dir"]
    # Detect (AUTO): the backend reads the shared run's workspace, not this one's
    p = __import__("bpy").context.preferences.addons[ADDON_MODULE].preferences
    p.files_mode = "AUTO"
    assert na.blender.transfers.is_remote() is True
    p.workspace = os.path.join(TMP, "ws_shared")
    assert na.blender.transfers.is_remote() is False
    S["measured"] = {"clip_up": up.sent_bytes, "down": down.sent_bytes, "edit_up": up2.sent_bytes}
    print(json.dumps(S["measured"]))

