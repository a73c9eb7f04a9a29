"""The built extension: zip contents per platform, install from disk into an isolated
user folder, bundled wheels importable, registration, and a bpy-free core."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile

from conftest import ADDON_MODULE, BACKEND_PY, ROOT


def test_split_zips_carry_only_their_platform_wheels(zip_path):
    manifest = tomllib.loads(open(os.path.join(ROOT, "blender_manifest.toml"), encoding="utf-8").read())
    assert manifest["id"] == "neural_atlas" and manifest["schema_version"] == "1.0.0"
    assert set(manifest["permissions"]) == {"files", "network"}
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
        inner = tomllib.loads(z.read("blender_manifest.toml").decode())
    wheels = [n for n in names if n.endswith(".whl") and n.startswith("wheels/")]  # backend_dist/: test_setup
    # cp311 (Blender 4.2-5.0) and cp312-abi3/cp313 (5.1+) wheels for linux x64 only
    assert sorted(w.split("-")[0].split("/")[-1] for w in wheels) == ["msgpack", "msgpack", "pyzmq", "pyzmq"]
    assert all("x86_64" in w for w in wheels)
    assert any("cp311-cp311" in w for w in wheels) and any("abi3" in w or "cp313" in w for w in wheels)
    assert inner["build"]["generated"]["platforms"] == ["linux-x64"]
    assert "__init__.py" in names and "core/jobs.py" in names and "blender/runtime.py" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]
    win = zip_path.replace("linux_x64", "windows_x64")
    with zipfile.ZipFile(win) as z:
        assert all("win_amd64" in n for n in z.namelist() if n.endswith(".whl") and n.startswith("wheels/"))


def test_installed_extension_uses_its_bundled_wheels(na):
    import bpy
    import msgpack
    import zmq

    user = os.environ["BLENDER_USER_RESOURCES"]
    # .venv-bpy has no pyzmq/msgpack: these come from the zip's wheels
    assert zmq.__file__.startswith(os.path.join(user, "extensions", ".local"))
    assert msgpack.__file__.startswith(os.path.join(user, "extensions", ".local"))
    assert na.__name__ == ADDON_MODULE and na.__file__.startswith(os.path.join(user, "extensions", "user_default"))
    assert ADDON_MODULE in bpy.context.preferences.addons
    prefs = bpy.context.preferences.addons[ADDON_MODULE].preferences
    assert prefs.bl_rna.identifier == "NA_Preferences" and prefs.endpoint.startswith("tcp://127.0.0.1:")
    for op in ("decompose", "render_edit", "cancel", "paint_setup", "connect", "backend_start", "wait"):
        assert hasattr(bpy.ops.neural_atlas, op)
    for panel in ("NA_PT_decompose", "NA_PT_jobs", "NA_PT_backend", "NA_PT_image"):
        assert hasattr(bpy.types, panel)
    assert bpy.types.NA_PT_decompose.bl_space_type == "SEQUENCE_EDITOR"
    assert bpy.types.NA_PT_image.bl_space_type == "IMAGE_EDITOR"
    assert bpy.types.NA_PT_jobs.bl_category == "Atlas"
    # the extension's user folder (not the add-on folder) holds logs and the workspace
    assert prefs.log_path().startswith(os.path.join(user, "extensions", ".user"))


def test_disable_and_enable_cleans_up(na):
    import addon_utils
    import bpy

    rt = na.blender.runtime
    rt.ensure_timer()
    assert bpy.app.timers.is_registered(rt.tick)
    addon_utils.disable(ADDON_MODULE, default_set=True)
    assert not hasattr(bpy.types, "NA_PT_decompose")
    assert not hasattr(bpy.types.Scene, "neural_atlas")
    assert not bpy.app.timers.is_registered(rt.tick)
    addon_utils.enable(ADDON_MODULE, default_set=True)
    assert hasattr(bpy.types, "NA_PT_decompose") and hasattr(bpy.context.scene, "neural_atlas")


def test_core_imports_without_bpy():
    """The backend's venv imports neural_atlas.core (the same files) with no bpy at all."""
    code = ("import sys, neural_atlas, neural_atlas.core.jobs, neural_atlas.core.strips; "
            "assert 'bpy' not in sys.modules; print(neural_atlas.core.jobs.__file__)")
    r = subprocess.run([BACKEND_PY, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(os.path.join(ROOT, "addon"))


def test_no_absolute_self_imports():
    bad = []
    for d, _dirs, files in os.walk(os.path.join(ROOT, "addon")):
        for f in files:
            if f.endswith(".py"):
                for line in open(os.path.join(d, f), encoding="utf-8"):
                    s = line.strip()
                    if s.startswith(("import neural_atlas", "from neural_atlas")) or s.startswith("bl_info"):
                        bad.append(f"{f}: {s}")
    assert not bad
