"""Harness for the Blender add-on tests: the real bpy 5.0.1 module (.venv-bpy), the
built extension zip installed into an isolated BLENDER_USER_RESOURCES (so pyzmq and
msgpack come from its bundled wheels), and a real backend process (the backend's
venv, CPU) on a tiny synthetic clip made by backend/synthetic.

Run through scripts/test_blender. Environment: NEURAL_ATLAS_BACKEND_PYTHON (default
.venv/bin/python).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TMP = tempfile.mkdtemp(prefix="na_bpytest_")
# must be set before bpy is imported anywhere in this process
os.environ["BLENDER_USER_RESOURCES"] = os.path.join(TMP, "user")
os.environ["NEURAL_ATLAS_KEYS"] = os.path.join(TMP, "keys")
BACKEND_PY = os.environ.get("NEURAL_ATLAS_BACKEND_PYTHON") or os.path.join(ROOT, ".venv", "bin", "python")
ADDON_MODULE = "bl_ext.user_default.neural_atlas"

# A decomposition small enough for a loaded 2-core CPU (~30-60 s): the demo preset, shrunk.
TINY = {
    "clip": {"long_edge": 64},
    "model": {"mapping_width": 32, "mapping_layers": 2, "texture_width": 16, "texture_layers": 2,
              "residual_width": 16, "residual_layers": 2, "alpha_width": 16, "alpha_layers": 2,
              "texture_grid": {"n_levels": 2, "log2_hashmap_size": 8, "base_resolution": 8},
              "xyt_grid": {"n_levels": 2, "log2_hashmap_size": 8, "base_resolution": 4}},
    "train": {"iterations": 30, "batch_size": 512, "pretrain_iterations": 1, "pretrain_batch_size": 512,
              "checkpoint_every": 5, "log_every": 5},
    "export": {"atlas_size": 64, "write_videos": False},
}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def linux_zip() -> str:
    zips = sorted(glob.glob(os.path.join(ROOT, "dist", "neural_atlas-*-linux_x64.zip")))
    # the zip also ships the backend wheel (backend_dist/): its sources count too
    sources = [p for d in ("addon", "backend") for p in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)]
    newest_src = max(os.path.getmtime(p) for p in sources + [os.path.join(ROOT, "blender_manifest.toml"),
                                                             os.path.join(ROOT, "pyproject.toml")])
    if not zips or os.path.getmtime(zips[-1]) < newest_src:
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_extension"), "--no-universal"],
                       check=True, capture_output=True)
        zips = sorted(glob.glob(os.path.join(ROOT, "dist", "neural_atlas-*-linux_x64.zip")))
    assert zips, "scripts/build_extension produced no linux zip"
    return zips[-1]


@pytest.fixture(scope="session")
def zip_path() -> str:
    return linux_zip()


@pytest.fixture(scope="session")
def na(zip_path: str):
    """The extension, installed from the built zip like an artist would (Install from Disk)."""
    import importlib

    import bpy

    r = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    assert r == {"FINISHED"}
    mod = importlib.import_module(ADDON_MODULE)
    yield mod
    mod.blender.runtime.shutdown()


@pytest.fixture(scope="session")
def clip() -> str:
    """A 64x36, 8-frame synthetic shot with one object (seed layout + ground_truth.npz)."""
    out = os.path.join(TMP, "clip")
    code = ("import sys; from backend.synthetic import make_synthetic_clip; "
            "make_synthetic_clip(width=64, height=36, n_frames=8, seed=3).write(sys.argv[1])")
    subprocess.run([BACKEND_PY, "-c", code, out], check=True, cwd=ROOT)
    assert os.path.isfile(os.path.join(out, "video_frames", "00007.png"))
    return out


@pytest.fixture()
def fresh(na):
    """An empty file with the add-on still enabled and no runtime state."""
    import bpy

    na.blender.runtime.reset()
    bpy.ops.wm.read_homefile(use_empty=True)
    assert ADDON_MODULE in bpy.context.preferences.addons
    yield bpy
    na.blender.runtime.reset()


def use_local_backend(na, workspace: str, port: int | None = None):
    """Preferences for a backend started by the add-on from the backend's venv."""
    import bpy

    p = bpy.context.preferences.addons[ADDON_MODULE].preferences
    p.endpoint = f"tcp://127.0.0.1:{port or free_port()}"
    p.start_local = True
    p.backend_python = BACKEND_PY
    p.backend_args = f"-m backend serve --allow-root {TMP}"
    p.workspace = workspace
    return p


def tick_until(na, cond, timeout: float, step: float = 0.05) -> None:
    """Drive the GUI poller the way Blender's timer would (timers never fire in bpy)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        na.blender.runtime.tick()
        if cond():
            return
        time.sleep(step)
    raise AssertionError(f"condition not reached within {timeout} s")


def tiny_overrides(**train) -> str:
    d = json.loads(json.dumps(TINY))
    d["train"].update(train)
    return json.dumps(d)


def read_png(path: str):
    """Decode an 8/16-bit RGB(A)/grey PNG without bpy (independent orientation check):
    (H, W, C) float32 in [0, 1], row 0 = top of the file."""
    import struct
    import zlib

    import numpy as np

    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _c, _f, interlace = hdr
    assert interlace == 0 and depth in (8, 16)
    ch = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    bpp = ch * depth // 8
    raw = zlib.decompress(idat)
    stride = w * bpp
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        cur = np.zeros(stride, np.int32)
        for x in range(stride):
            a = cur[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 0:
                v = line[x]
            elif f == 1:
                v = line[x] + a
            elif f == 2:
                v = line[x] + b
            elif f == 3:
                v = line[x] + (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                v = line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)
            cur[x] = v & 0xFF
        out[y] = cur
        prev = cur
    if depth == 16:
        arr = out.reshape(h, w * ch, 2).astype(np.uint16)
        vals = (arr[..., 0] << 8 | arr[..., 1]).astype(np.float32) / 65535.0
    else:
        vals = out.astype(np.float32) / 255.0
    return vals.reshape(h, w, ch)
