"""scripts/batch.py as a subprocess under the bpy module: decompose, render with an edit
PNG, the exit codes and the final JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import BACKEND_PY, ROOT, TMP, free_port, read_png, tiny_overrides

BATCH = os.path.join(ROOT, "scripts", "batch.py")


def run(args, tmp, timeout=300):
    env = dict(os.environ, BLENDER_USER_RESOURCES=os.path.join(tmp, "user"),
               NEURAL_ATLAS_KEYS=os.path.join(tmp, "keys"))
    r = subprocess.run([sys.executable, BATCH, *args], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=ROOT)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "{}"
    return r.returncode, json.loads(last), r


def test_bad_arguments_and_unreachable_backend(tmp_path, zip_path, clip):
    code, out, _ = run(["explode"], str(tmp_path))
    assert code == 2 and out["status"] == "bad_arguments"
    code, out, _ = run(["decompose", "/nonexistent/clip.mp4", "--addon-zip", zip_path], str(tmp_path))
    assert code == 2 and "does not exist" in out["error"]
    keys = tmp_path / "keys"  # a key exists, but nothing listens on the endpoint
    keys.mkdir(mode=0o700)
    (keys / "signing.key").write_text("ab" * 32 + "\n")
    os.chmod(keys / "signing.key", 0o600)
    code, out, r = run(["decompose", os.path.join(clip, "video_frames"), "--addon-zip", zip_path,
                        "--endpoint", "tcp://127.0.0.1:9", "--workspace", str(tmp_path / "ws")], str(tmp_path))
    assert code == 3 and out["status"] == "unreachable", r.stderr[-2000:]
    assert "tcp://127.0.0.1:9" in out["error"] and "firewall" in out["hint"].lower()


def test_decompose_then_render_headless(tmp_path, zip_path, clip):
    ws, blend = str(tmp_path / "ws"), str(tmp_path / "shot.blend")
    backend = ["--start-backend", BACKEND_PY, "--backend-args", f"-m backend serve --allow-root {TMP}",
               "--workspace", ws, "--addon-zip", zip_path]
    code, out, r = run(["decompose", os.path.join(clip, "video_frames"), "--masks", os.path.join(clip, "masks"),
                        "--preset", "demo", "--overrides", tiny_overrides(iterations=5),
                        "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--save", blend, *backend],
                       str(tmp_path))
    assert code == 0, r.stderr[-3000:]
    assert out["status"] == "ok" and out["command"] == "decompose" and out["job_id"]
    assert len(out["outputs"]["atlases"]) == 2 and all(os.path.isfile(f) for f in out["outputs"]["atlases"])
    assert os.path.isfile(out["outputs"]["blend"])
    # an edit PNG made outside Blender (as a compositor would), layer 1
    mark = np.zeros((64, 64, 4), np.uint8)
    mark[8:24, 8:24] = (255, 0, 255, 255)
    png = str(tmp_path / "mark.png")
    write_png(png, mark)
    code, out2, r = run(["render", "--blend", blend, "--edit", f"1={png}", "--endpoint",
                         f"tcp://127.0.0.1:{free_port()}", "--save", str(tmp_path / "edited.blend"), *backend],
                        str(tmp_path))
    assert code == 0, r.stderr[-3000:]
    o = out2["outputs"]
    assert out2["status"] == "ok" and o["parent"] == out["job_id"] and o["channel"] == 2 and o["frames"] == 8
    assert (o["frame_start"], o["frame_end"]) == (1, 8)
    # the edit image was saved with the mark before rendering
    edit = [e for e in out["outputs"]["edits"] if e.endswith("layer_1.png")][0]
    assert read_png(edit)[8:24, 8:24, 3].min() == 1.0
    code, out3, _ = run(["render", "--blend", blend, "--job", "nope", "--addon-zip", zip_path], str(tmp_path))
    assert code == 2 and "no finished decomposition" in out3["error"]


def write_png(path, rgba):
    import struct
    import zlib

    h, w, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[y].tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_decompose_headless_with_files_remote(tmp_path, zip_path, clip):
    """--files remote: the clip and masks are uploaded, the atlases land in the workspace."""
    ws = str(tmp_path / "ws")
    backend = ["--start-backend", BACKEND_PY, "--backend-args", f"-m backend serve --allow-root {TMP}",
               "--workspace", ws, "--addon-zip", zip_path, "--files", "remote"]
    code, out, r = run(["decompose", os.path.join(clip, "video_frames"), "--masks", os.path.join(clip, "masks"),
                        "--preset", "demo", "--overrides", tiny_overrides(iterations=5),
                        "--endpoint", f"tcp://127.0.0.1:{free_port()}", *backend], str(tmp_path))
    assert code == 0, r.stderr[-3000:]
    atlases = out["outputs"]["atlases"]
    assert len(atlases) == 2 and all(a.startswith(os.path.join(ws, "downloads")) and os.path.isfile(a)
                                     for a in atlases)
    assert "upload done" in r.stdout and "download done" in r.stdout
