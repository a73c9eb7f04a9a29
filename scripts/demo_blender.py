"""The whole Neural Atlas loop, headless, on the built-in synthetic demo clip:

start a backend -> put the clip in a VSE -> decompose -> paint on a frame (the frame's
Texture Paint mesh is built; the stroke itself, which brushes cannot make headless, is an
RGBA image over the frame projected by the backend's paint_frame job) and a mark on an
atlas -> an edit lifetime (fade-in) -> Render Edit into the VSE -> the live preview on, its
frames compared with Render Edit's -> save the .blend and the edited movie -> print both
drifts against the ground truth and the preview/render agreement.

    python scripts/demo_blender.py [--out demo_out/blender] [--iterations N]      (bpy module, .venv-bpy)
    blender -b --python-exit-code 1 --python scripts/demo_blender.py -- [--out ...]

The backend runs from the backend's environment (--backend-python, default .venv/bin/python
or $NEURAL_ATLAS_BACKEND_PYTHON). Under the bpy module the extension is installed from
dist/ into an isolated user folder inside --out (built first when missing). The last line
printed is JSON: {"status", "blend", "movie", "frames_dir", "job_id", "render_job_id", ...}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def args_after_dashes(argv: list[str]) -> list[str]:
    return argv[argv.index("--") + 1:] if "--" in argv else argv[1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "demo_out", "blender"))
    ap.add_argument("--backend-python", default=os.environ.get("NEURAL_ATLAS_BACKEND_PYTHON")
                    or os.path.join(ROOT, ".venv", "bin", "python"))
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--height", type=int, default=72)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--iterations", type=int, default=None, help="training iterations (preset default)")
    ap.add_argument("--addon-zip", default=None)
    a = ap.parse_args(args_after_dashes(sys.argv))
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()

    def step(msg: str) -> None:
        print(f"[demo {time.time() - t0:6.1f}s] {msg}", flush=True)

    in_blender = "bpy" in sys.modules
    if not in_blender:  # the bpy module: isolate config and extensions before importing bpy
        os.environ.setdefault("BLENDER_USER_RESOURCES", os.path.join(out, "blender_user"))
        os.environ.setdefault("NEURAL_ATLAS_KEYS", os.path.join(out, "keys"))
    zip_path = a.addon_zip
    if zip_path is None:
        zips = sorted(glob.glob(os.path.join(ROOT, "dist", "neural_atlas-*-linux_x64.zip")))
        if not zips:
            step("building the extension (scripts/build_extension)")
            subprocess.run([sys.executable, os.path.join(HERE, "build_extension"), "--no-universal"], check=True)
            zips = sorted(glob.glob(os.path.join(ROOT, "dist", "neural_atlas-*-linux_x64.zip")))
        zip_path = zips[-1] if zips else None

    # 1. the demo clip, made by the backend's synthetic generator (outside Blender)
    clip = os.path.join(out, "clip")
    if not os.path.isfile(os.path.join(clip, "ground_truth.npz")):
        step(f"writing the synthetic demo clip ({a.width}x{a.height}, {a.frames} frames)")
        code = ("import sys; from backend.synthetic import make_synthetic_clip; "
                "make_synthetic_clip(width=int(sys.argv[2]), height=int(sys.argv[3]), "
                "n_frames=int(sys.argv[4]), seed=0).write(sys.argv[1])")
        subprocess.run([a.backend_python, "-c", code, clip, str(a.width), str(a.height), str(a.frames)],
                       check=True, cwd=ROOT)

    import bpy
    import numpy as np

    sys.path.insert(0, HERE)
    import batch  # the add-on loading helpers of scripts/batch.py

    na = batch.load_addon(zip_path)
    rt = na.blender.runtime
    bpy.ops.wm.read_homefile(use_empty=True)  # an empty file; the add-on stays enabled
    try:
        p = bpy.context.preferences.addons[na.__name__].preferences
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p.endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        s.close()
        p.start_local, p.backend_python = True, os.path.abspath(a.backend_python)
        p.backend_args = f"-m backend serve --allow-root {out}"
        p.workspace = os.path.join(out, "workspace")

        # 2. a VSE with the clip
        scene = bpy.context.scene
        vse, props, images = na.blender.vse, na.blender.props, na.blender.images
        strip = vse.add_source_strip(scene, os.path.join(clip, "video_frames"), channel=1, frame_start=1,
                                     name="demo shot")
        scene.sequence_editor.active_strip = strip
        vse.fit_scene_to_strip(scene, strip, (a.width, a.height))
        st = props.settings(scene)
        st.mask_mode, st.mask_folder = "FOLDER", os.path.join(clip, "masks")
        step(f"starting the backend ({p.backend_python} {p.backend_args}); log: {p.log_path()}")
        batch.connect(na)

        # 3. decompose (blocking driver: background mode)
        ov = {"train": {"iterations": a.iterations}} if a.iterations else {}
        step(f"decomposing '{strip.name}' (preset {a.preset})")
        last: list = [0.0, ""]

        def progress(ch) -> None:  # at most one line every 5 s, and only when it says something new
            if ch.kind != "job" or time.monotonic() - last[0] <= 5:
                return
            text = na.core.jobs.progress_text(ch.info)
            if text != last[1]:
                last[0], last[1] = time.monotonic(), text
                step(f"  {text}")

        bpy.ops.neural_atlas.decompose(preset=a.preset, overrides=json.dumps(ov) if ov else "")
        job = st.jobs[len(st.jobs) - 1]
        job_id = rt.wait_submitted(job.token)
        rt.wait(job_id, on_progress=progress)
        job = st.jobs[len(st.jobs) - 1]
        if job.state != "done" or not job.atlases_loaded:
            raise RuntimeError(f"decomposition {job.state}: {job.error} {job.hint}")
        step(f"decomposed: {job.n_layers} layers, PSNR {job.psnr:.1f} dB, atlases in {job.out_dir}/atlas")

        # 4a. paint on a frame: the Texture Paint surface of the middle frame, then a stroke on that
        # frame (an RGBA image over it) projected into the layer that owns the pixels
        first = na.blender.lifetime.first_frame(job)
        n = job.range_stop - job.range_start
        t_ref = first + n // 2
        scene.frame_set(t_ref)
        bpy.ops.neural_atlas.frame_paint(job_id=job_id, frame=t_ref)
        mesh = next(o for o in bpy.data.objects if o.get(na.blender.frame_paint.KEY) == job.shot).data
        step(f"frame {t_ref}: Texture Paint mesh of {len(mesh.polygons)} faces, one material per layer")
        bpy.ops.neural_atlas.frame_paint_end(job_id=job_id)
        bpy.ops.neural_atlas.paint_image_new(job_id=job_id)
        paint = next(i for i in bpy.data.images if i.get("neural_atlas_paint_frame") == t_ref)
        pw, ph = paint.size
        fa = np.load(os.path.join(job.out_dir, "bake", f"layer_{job.n_layers - 1}_alpha.npy"))[n // 2]
        yy, xx = np.nonzero(fa.astype(np.float32) > 0.9)
        py, px = int(yy[len(yy) // 3]), int(xx[len(xx) // 3])
        stroke = np.zeros((ph, pw, 4), np.float32)
        rr = max(2, pw // 40)
        stroke[max(0, py - rr):py + rr + 1, max(0, px - rr):px + rr + 1] = (0.1, 0.9, 0.9, 1.0)
        images.write_array(paint, stroke)
        bpy.ops.neural_atlas.project_paint(job_id=job_id, image=paint.name, frame=t_ref, wait=True, timeout=600)
        step(f"painted a {2 * rr + 1} px square on frame {t_ref} at pixel ({px}, {py}): projected into the edits")

        # 4b. paint a mark into the background layer's edit image where it is seen best
        layer = job.n_layers - 1
        seen = np.load(os.path.join(job.out_dir, "bake", f"atlas_{layer}_seen.npy"))
        k = max(4, seen.shape[0] // 12)
        cs = np.pad(seen, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        win = cs[k:, k:] - cs[:-k, k:] - cs[k:, :-k] + cs[:-k, :-k]
        r0, c0 = (int(v) for v in np.unravel_index(np.argmax(win), win.shape))
        edit = images.find_image(job.shot, layer, "edit")
        images.paint_rect(edit, r0, c0, k, k, (1.0, 0.1, 0.6, 1.0))
        bpy.ops.neural_atlas.paint_setup(job_id=job_id, layer=layer)
        step(f"painted a {k}x{k} texel mark at row {r0}, col {c0} of '{edit.name}' (unsaved)")

        # 4c. an edit lifetime: the background's edit fades in over the first quarter of the shot
        rec = props.settings(scene).shots[job.shot].layers[str(layer)]
        rec.fade_in = max(1, n // 4)
        step(f"layer {layer}'s edit fades in over {rec.fade_in} frames")

        # 5. Render Edit: saves the edit image, re-renders, places the result above the source
        bpy.ops.neural_atlas.render_edit(job_id=job_id, movie=True)
        r = st.jobs[len(st.jobs) - 1]
        render_id = rt.wait_submitted(r.token)
        rt.wait(render_id, on_progress=progress)
        r = st.jobs[len(st.jobs) - 1]
        if r.state != "done" or not r.placed:
            raise RuntimeError(f"render {r.state}: {r.error} {r.hint}")
        placed = vse.find_strip(scene, r.render_strip)
        step(f"edited shot placed on VSE channel {placed.channel}, frames "
             f"{placed.frame_final_start}-{placed.frame_final_end - 1}")

        # 5b. the live preview (no backend): on above the render, its frames against Render Edit's
        bpy.ops.neural_atlas.preview(job_id=job_id, action="ON")
        scene.view_settings.view_transform = "Standard"
        scene.render.dither_intensity = 0.0
        scene.render.image_settings.file_format, scene.render.image_settings.color_mode = "PNG", "RGB"
        frames_out = bpy.path.abspath(placed.directory)
        diffs = []
        for f in (0, n // 2, n - 1):
            scene.frame_set(first + f)
            scene.render.filepath = os.path.join(out, f"preview_{f:05d}.png")
            bpy.ops.render.render(write_still=True)
            got = images.file_pixels(scene.render.filepath)[..., :3]
            ref = images.file_pixels(os.path.join(frames_out, f"{f:05d}.png"))[..., :3]
            diffs.append(np.abs(np.round(got * 255) - np.round(ref * 255)))
        agreement = {"mean": round(float(np.mean(diffs)), 4), "max": float(np.max(diffs)),
                     "frames": [0, n // 2, n - 1]}
        step(f"live preview vs Render Edit (8-bit): mean {agreement['mean']:.3f}, max {agreement['max']:.0f}")

        # 6. save the .blend and the edited movie
        movies = glob.glob(os.path.join(r.out_dir, "**", "*.mp4"), recursive=True)
        movie = os.path.join(out, "edited.mp4")
        if movies:
            shutil.copyfile(movies[0], movie)
        else:
            movie = ""
        blend = os.path.join(out, "demo.blend")
        bpy.ops.wm.save_as_mainfile(filepath=blend)
        frames_dir = bpy.path.abspath(placed.directory)
        # 7. how well did the decomposition do? (the clip's ground truth, measured by the backend)
        m = subprocess.run([a.backend_python, "-m", "backend", "measure", job.out_dir, "--ground-truth", clip],
                           capture_output=True, text=True, cwd=ROOT)
        measured = json.loads(m.stdout.strip().splitlines()[-1]) if m.returncode == 0 else {"error": m.stderr}
        if m.returncode == 0:
            step(f"ground truth: edit drift mean {measured['edit_drift_px']['mean']:.2f} px, "
                 f"max {measured['edit_drift_px']['max']:.2f} px; alpha IoU {measured['alpha_iou']:.3f}")
        # painting on a frame, measured by the backend (a mark per layer through paint_frame)
        code = ("import json, sys; from backend.demo import measure_frame_paint; "
                "r = measure_frame_paint(sys.argv[1], sys.argv[2], sys.argv[3]); "
                "print(json.dumps({k: r[k] for k in ('mean', 'max', 'owner_ok')}))")
        m = subprocess.run([a.backend_python, "-c", code, job.out_dir, clip, os.path.join(out, "frame_paint")],
                           capture_output=True, text=True, cwd=ROOT)
        frame_drift = json.loads(m.stdout.strip().splitlines()[-1]) if m.returncode == 0 else {"error": m.stderr[-500:]}
        if m.returncode == 0:
            step(f"ground truth: frame_paint_drift_px mean {frame_drift['mean']:.2f} px, max "
                 f"{frame_drift['max']:.2f} px, each mark in its own layer: {frame_drift['owner_ok']}")
        step(f"saved {blend}")
        step(f"edited movie: {movie or '(no mp4 encoder in the backend environment)'}")
        step(f"edited frames: {frames_dir}")
        print(json.dumps({"status": "ok", "blend": blend, "movie": movie, "frames_dir": frames_dir,
                          "edit_image": bpy.path.abspath(edit.filepath), "job_id": job_id,
                          "render_job_id": render_id, "channel": placed.channel, "psnr": job.psnr,
                          "edit_drift_px": measured.get("edit_drift_px"), "alpha_iou": measured.get("alpha_iou"),
                          "frame_paint_drift_px": frame_drift, "preview_vs_render_8bit": agreement,
                          "seconds": round(time.time() - t0, 1)}), flush=True)
        return 0
    finally:
        rt.shutdown()


if __name__ == "__main__":
    sys.exit(main())
