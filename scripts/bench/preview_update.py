#!/usr/bin/env python3
"""How long after a stroke the live preview shows it, against today's Render Edit round trip.

    .venv-bpy/bin/python scripts/bench/preview_update.py --decomposition OUT [--json FILE]
    .venv-bpy/bin/python scripts/bench/preview_update.py --make DIR [--size 1920x1080 --frames 4]

Runs with the bpy module (headless, Cycles on the CPU) against a finished decomposition with
EXR maps (``--make`` decomposes a synthetic clip first with the backend's CLI: tiny training,
atlas 3200, the map sizes are what matter here). In one run:

* ``preview``: a stroke (a 48 x 48 texel block) goes into the background layer's edit image,
  then ``preview.sync`` (the delta image from the edit's pixels) and a render of that frame
  through the VSE (the scene strip, one Cycles sample per pixel): the time from the stroke to
  the edited frame, median of ``--repeats`` strokes, with the two parts;
* ``render_edit``: the baseline, the backend's render of the same edits (``python -m backend
  edit``, the engine's part of Render Edit: every frame of the shot at the working resolution,
  PNG), one run, wall time including its start; the ZMQ hop and placing the strip come on top.

Prints one JSON object (device, sizes, seconds, ratio render_edit / preview).
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
    a = ap.parse_args()
    if a.decomposition is None and a.make is None:
        ap.error("give --decomposition OUT or --make DIR")
    out = (a.decomposition or make(a.make.resolve(), a.size, a.frames)).resolve()
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
    t = time.perf_counter()
    B.preview.enable(scene, job)
    enable_s = time.perf_counter() - t
    frame = 1 + n // 2

    def render(path: Path) -> None:
        scene.frame_set(frame)
        scene.render.filepath = str(path)
        bpy.ops.render.render(write_still=True)

    render(tmp / "first.png")  # the first render loads the maps and builds the shader
    syncs, renders, totals = [], [], []
    for k in range(a.repeats):
        r0 = S // 2 - 200 + 100 * k
        t0 = time.perf_counter()
        B.images.paint_rect(edit, r0, S // 2 - 24, 48, 48, (1.0, 0.1 * k, 0.5, 1.0))  # the stroke
        t1 = time.perf_counter()
        B.preview.sync()
        t2 = time.perf_counter()
        render(tmp / f"stroke_{k}.png")
        t3 = time.perf_counter()
        syncs.append(t2 - t1)
        renders.append(t3 - t2)
        totals.append(t3 - t1)
    B.images.save_dirty([edit])
    # the baseline: the backend's render of the same edit (all frames of the shot)
    edit_out = tmp / "render_edit"
    t = time.perf_counter()
    subprocess.run([BACKEND_PY, "-m", "backend", "edit", str(out), "--layer",
                    f"{layer}={bpy.path.abspath(edit.filepath)}", "--out", str(edit_out), "--format", "png",
                    "--quiet", "--device", "cpu"], check=True, cwd=ROOT, capture_output=True)
    render_edit_s = time.perf_counter() - t
    B.runtime.shutdown()
    res = {
        "bench": "preview_update", "device": f"cpu: {cpu_name()}", "engine": "Cycles (bpy 5.0.1, CPU, 1 sample)",
        "frame_size": [W, H], "frames": n, "layers": int(job.n_layers), "atlas_size": S,
        "enable_s": round(enable_s, 3),
        "preview_stroke_to_frame_s": round(float(np.median(totals)), 3),
        "preview_sync_s": round(float(np.median(syncs)), 3),
        "preview_render_s": round(float(np.median(renders)), 3),
        "render_edit_s": round(render_edit_s, 3), "render_edit_per_frame_s": round(render_edit_s / n, 3),
        "ratio_render_edit_over_preview": round(render_edit_s / float(np.median(totals)), 2),
        "repeats": a.repeats,
    }
    print(json.dumps(res), flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
