#!/usr/bin/env python3
"""How long after a stroke the live preview shows it: the numpy engine against the Cycles engine
(the implementation before it) and the Render Edit round trip, in one run.

    .venv-bpy/bin/python scripts/bench/preview_update.py --decomposition OUT [--json FILE]
    .venv-bpy/bin/python scripts/bench/preview_update.py --make DIR [--size 1920x1080 --frames 4]

Runs with the bpy module (headless) against a finished decomposition with EXR maps (``--make``
decomposes a synthetic clip first with the backend's CLI: tiny training, atlas 3200, the map
sizes are what matter here). For each engine (``cycles``: the preview scene rendered by Cycles
on the CPU, one sample, as a scene strip; ``numpy``: the frame computed in numpy from its maps,
shown by an image strip):

* the preview is turned on and the frame looked at is shown once (``enable_s``,
  ``first_view_s``: the first view of a frame reads its maps);
* a stroke (a 48 x 48 texel block) goes into the background layer's edit image (unsaved, as in
  the UI), then ``preview.sync`` (what the add-on's depsgraph handler and paint timer run) and
  the VSE's render of that frame (``bpy.ops.render.render``, not written to a file): the time
  from the stroke to the edited frame, median of ``--repeats`` strokes, with the two parts.
  Afterwards one written render checks that the last stroke is in the frame (not timed);
* another frame of the shot shown after the strokes (``other_frame_s``: the numpy engine
  recomputes it from its maps).

Baseline: the backend's render of the same edits (``python -m backend edit``, the engine's part
of Render Edit: every frame of the shot at the working resolution, PNG), one run, wall time
including its start; the ZMQ hop and placing the strip come on top.

Prints one JSON object (device, sizes, seconds per engine, ratios).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
BACKEND_PY = os.environ.get("NEURAL_ATLAS_BACKEND_PYTHON") or str(ROOT / ".venv" / "bin" / "python")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def make(dest: Path, size: str, frames: int) -> Path:
    """A synthetic clip decomposed with a tiny schedule (the maps' sizes are what is timed)."""
    W, H = (int(v) for v in size.split("x"))
    clip, out = dest / "clip", dest / "out"
    if (out / "maps" / "meta.json").is_file():
        return out
    code = ("import sys; from backend.synthetic import make_synthetic_clip; "
            "make_synthetic_clip(width=int(sys.argv[2]), height=int(sys.argv[3]), n_frames=int(sys.argv[4]), "
            "seed=3).write(sys.argv[1])")
    subprocess.run([BACKEND_PY, "-c", code, str(clip), str(W), str(H), str(frames)], check=True, cwd=ROOT)
    cfg = dest / "tiny.toml"
    cfg.write_text(f'preset = "demo"\n[clip]\nlong_edge = {max(W, H)}\n[train]\niterations = 30\n'
                   'pretrain_iterations = 1\n[export]\natlas_size = 3200\nwrite_videos = false\n', encoding="utf-8")
    masks = sorted(str(p) for p in (clip / "masks").iterdir())
    subprocess.run([BACKEND_PY, "-m", "backend", "decompose", str(clip), "--out", str(out), "--config", str(cfg),
                    "--masks", *masks, "--quiet"], check=True, cwd=ROOT)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decomposition", type=Path)
    ap.add_argument("--make", type=Path, help="decompose a synthetic clip into this folder first")
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--engines", default="cycles,numpy", help="comma-separated, in this order")
    a = ap.parse_args()
    if a.decomposition is None and a.make is None:
        ap.error("give --decomposition OUT or --make DIR")
    out = (a.decomposition or make(a.make.resolve(), a.size, a.frames)).resolve()
    load0 = list(os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="na_preview_bench_"))
    os.environ["BLENDER_USER_RESOURCES"] = str(tmp / "user")
    import bpy
    import numpy as np

    sys.path.insert(0, str(ROOT / "scripts"))
    import batch

    zips = sorted(glob.glob(str(ROOT / "dist" / "neural_atlas-*-linux_x64.zip")))
    if not zips:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_extension"), "--no-universal"], check=True)
        zips = sorted(glob.glob(str(ROOT / "dist" / "neural_atlas-*-linux_x64.zip")))
    na = batch.load_addon(zips[-1])
    B = na.blender
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.context.preferences.addons[na.__name__].preferences.workspace = str(tmp / "ws")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    info = report["clip"]
    src = Path(info["source"])
    frames_dir = src / "video_frames" if (src / "video_frames").is_dir() else src
    scene = bpy.context.scene
    strip = B.vse.add_source_strip(scene, str(frames_dir), channel=1, frame_start=1)
    W, H = int(info["width"]), int(info["height"])
    B.vse.fit_scene_to_strip(scene, strip, (W, H))
    n = int(info["frames"])
    job = B.props.settings(scene).jobs.add()
    job.kind, job.state, job.label, job.job_id = "decompose", "done", "bench", "bench"
    job.strip_name, job.source, job.range_start, job.range_stop = strip.name, str(frames_dir), 0, n
    job.src_channel, job.src_frame_start = 1, 1
    job.shot = B.actions.shot_key(strip.name, str(frames_dir), (0, n))
    B.actions.load_results(scene, job, {"out_dir": str(out)})
    scene.view_settings.view_transform = "Standard"
    scene.render.dither_intensity = 0.0
    scene.render.image_settings.file_format = "PNG"
    layer = job.n_layers - 1
    edit = B.images.find_image(job.shot, layer, "edit")
    S = int(edit.size[0])
    frame = 1 + n // 2
    other = 1 + (n // 2 + 1) % n

    def render(path: Optional[Path] = None) -> None:
        scene.render.filepath = str(path or (tmp / "unused.png"))
        bpy.ops.render.render(write_still=path is not None)

    engines: dict = {}
    for e_i, engine in enumerate(a.engines.split(",")):
        scene.frame_set(frame)
        t = time.perf_counter()
        B.preview.enable(scene, job, engine=engine)
        enable_s = time.perf_counter() - t
        t = time.perf_counter()
        scene.frame_set(frame)
        render()  # the first render loads the maps / builds the shader
        first_s = time.perf_counter() - t
        render(tmp / f"{engine}_before.png")  # not timed: the frame before the strokes
        syncs, renders, totals = [], [], []
        for j in range(a.repeats):
            r0 = S // 2 - 200 + 100 * j  # the same places for every engine, another colour
            B.images.paint_rect(edit, r0, S // 2 - 24, 48, 48, (1.0 - 0.4 * e_i, 0.1 * j, 0.5, 1.0))  # the stroke
            t1 = time.perf_counter()
            B.preview.sync()
            t2 = time.perf_counter()
            render()
            t3 = time.perf_counter()
            syncs.append(t2 - t1)
            renders.append(t3 - t2)
            totals.append(t3 - t1)
        # not timed: the strokes are in the frame
        render(tmp / f"{engine}_with.png")
        changed = int((np.abs(B.images.file_pixels(str(tmp / f"{engine}_with.png"))[..., :3] -
                              B.images.file_pixels(str(tmp / f"{engine}_before.png"))[..., :3]).max(-1) > 0.02).sum())
        t = time.perf_counter()
        scene.frame_set(other)
        render()
        other_s = time.perf_counter() - t
        B.preview.disable(scene, job)
        engines[engine] = {
            "enable_s": round(enable_s, 3), "first_view_s": round(first_s, 3),
            "stroke_to_frame_s": round(float(np.median(totals)), 3),
            "sync_s": round(float(np.median(syncs)), 3), "render_s": round(float(np.median(renders)), 3),
            "other_frame_s": round(other_s, 3), "pixels_changed_by_the_strokes": changed,
        }
        print(json.dumps({engine: engines[engine]}), flush=True)
    B.images.save_dirty([edit])
    # the baseline: the backend's render of the same edit (all frames of the shot)
    edit_out = tmp / "render_edit"
    t = time.perf_counter()
    subprocess.run([BACKEND_PY, "-m", "backend", "edit", str(out), "--layer",
                    f"{layer}={bpy.path.abspath(edit.filepath)}", "--out", str(edit_out), "--format", "png",
                    "--quiet", "--device", "cpu"], check=True, cwd=ROOT, capture_output=True)
    render_edit_s = time.perf_counter() - t
    # the last numpy frame against the backend's render of the same edits (8-bit)
    ref = B.images.file_pixels(str(edit_out / "frames" / f"{frame - 1:05d}.png"))[..., :3]
    agree = None
    if "numpy" in engines:
        got = B.images.file_pixels(str(tmp / "numpy_with.png"))[..., :3]
        d = np.abs(np.round(got * 255) - np.round(ref * 255))
        agree = {"mean": round(float(d.mean()), 4), "max": float(d.max())}
    B.runtime.shutdown()
    res = {
        "bench": "preview_update", "device": f"cpu: {cpu_name()}", "bpy": bpy.app.version_string,
        "load_average_at_start": load0, "load_average_at_end": list(os.getloadavg()),
        "frame_size": [W, H], "frames": n, "layers": int(job.n_layers), "atlas_size": S,
        "engines": engines, "numpy_vs_render_edit_8bit": agree,
        "render_edit_s": round(render_edit_s, 3), "render_edit_per_frame_s": round(render_edit_s / n, 3),
        "repeats": a.repeats,
    }
    if "numpy" in engines and "cycles" in engines:
        res["ratio_cycles_over_numpy"] = round(engines["cycles"]["stroke_to_frame_s"] /
                                               engines["numpy"]["stroke_to_frame_s"], 2)
    if "numpy" in engines:
        res["ratio_render_edit_over_numpy"] = round(render_edit_s / engines["numpy"]["stroke_to_frame_s"], 2)
    print(json.dumps(res), flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
