"""Preferences > Set up backend with the real bpy 5.0.1, as an artist meets it: the
extension installed from the built zip into a clean user folder (conftest), then
Set up Backend makes the environment in the extension's user folder from Blender's own
Python, installs this machine's CPU torch (torch==2.13.0 from local disk: the PyTorch
requirement and source are Preferences settings) and the backend wheel shipped in the
zip, starts the backend from it and checks it with hello. Then the demo shot decomposes
and renders through that backend.

One environment serves the ordered tests here: Cancel mid-install (pip unpacking
torch) leaves it unused and incomplete, the next setup completes it, a second setup
reuses it, Repair mends a broken backend package, Remove deletes it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import tomllib
import zipfile

import pytest

from conftest import ADDON_MODULE, TMP, free_port, tiny_overrides

S: dict = {}  # state shared by the ordered tests of this module
PY313 = "/root/.pyenv/versions/3.13.0/bin/python3.13"


@pytest.fixture(scope="module")
def setup_prefs(na):
    """The add-on's preferences for this machine: CPU torch==2.13.0 from pip's own
    configuration (local disk here), a free port, clips readable under TMP."""
    import bpy

    na.blender.runtime.reset()
    bpy.ops.wm.read_homefile(use_empty=True)
    p = bpy.context.preferences.addons[ADDON_MODULE].preferences
    p.torch_variant, p.torch_source, p.torch_requirement = "cpu", "pip", "torch==2.13.0"
    p.setup_python = ""  # Blender's own Python (the bpy module: its venv's python)
    p.backend_python, p.start_local = "", False
    p.endpoint = f"tcp://127.0.0.1:{free_port()}"
    p.backend_args = f"-m backend serve --allow-root {TMP}"
    p.workspace = os.path.join(TMP, "ws_setup")
    bpy.context.preferences.system.use_online_access = True
    sb = na.blender.setup_backend
    yield p
    na.blender.runtime.shutdown()
    sb.shutdown()
    shutil.rmtree(sb.env_dir(), ignore_errors=True)  # 1.4 GB: never left behind, even after a failure
    p.backend_python, p.start_local = "", False


def op_error(fn, **kw) -> str:
    """Run an operator that must refuse; the bpy module raises its report as RuntimeError."""
    with pytest.raises(RuntimeError) as e:
        fn(**kw)
    return str(e.value)


def tick_setup(sb, cond, timeout: float) -> None:
    """Drive the setup's GUI timer the way Blender would (timers never fire in bpy)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sb.tick()
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not reached within {timeout} s: {sb.status().line()}")


def test_zip_ships_the_backend_wheel_outside_blenders_python(na, zip_path):
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
        manifest = tomllib.loads(z.read("blender_manifest.toml").decode())
    wheels = [n for n in names if n.startswith("backend_dist/")]
    assert wheels == ["backend_dist/neural_atlas-0.1.0-py3-none-any.whl"]
    assert not [w for w in manifest["wheels"] if "neural_atlas" in w]  # not a wheel Blender installs
    assert os.path.getsize(zip_path) < 5e6  # pyzmq + msgpack (two Pythons) + the backend: ~3 MB
    sb = na.blender.setup_backend
    assert os.path.isfile(sb.wheel_path()) and sb.wheel_path().startswith(os.path.dirname(na.__file__))
    # Blender's Python got pyzmq/msgpack from the manifest, never the backend or torch
    local = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "extensions", ".local")
    site = os.path.join(local, "lib", "python3.11", "site-packages")
    top = os.listdir(site)
    assert "zmq" in top and "msgpack" in top
    assert not [x for x in top if x.startswith(("neural_atlas", "backend", "torch"))], top
    assert importlib.util.find_spec("torch") is None  # (the repository's backend/ is on pytest's path)


def test_refusals_say_what_to_do(na, setup_prefs):
    import bpy

    sb = na.blender.setup_backend
    ops = bpy.ops.neural_atlas
    bpy.context.preferences.system.use_online_access = False
    msg = op_error(ops.backend_setup, wait=True)
    assert "online access is off" in msg and "Allow Online Access" in msg
    assert sb.status().code == "offline"
    bpy.context.preferences.system.use_online_access = True
    msg = op_error(ops.backend_setup, wait=True, required_gb=1e6)  # a quota far below what is needed
    assert "Not enough disk space" in msg and "needs about 1000000.0 GB" in msg and "Free at least" in msg
    if os.path.isfile(PY313):
        setup_prefs.setup_python = PY313  # the artist picked an unsupported Python
        msg = op_error(ops.backend_setup, wait=True)
        assert "Python 3.13.0" in msg and "needs Python 3.11 or 3.12" in msg
        setup_prefs.setup_python = ""
    assert not os.path.exists(sb.env_dir())  # nothing was made
    assert sb.environment_text()[0] == "Not set up"
    # what Preferences shows before anything is installed
    choice = sb.torch_choice(setup_prefs)
    assert (choice.variant, choice.requirement, choice.index_url) == ("cpu", "torch==2.13.0", "")
    info = sb.python_info(sb.base_python(setup_prefs))
    assert info.version[:2] == (3, 11)


def test_cancel_mid_install_leaves_no_broken_environment(na, setup_prefs):
    import bpy

    sb = na.blender.setup_backend
    t0 = time.monotonic()
    assert bpy.ops.neural_atlas.backend_setup() == {"FINISHED"}  # returns at once; the timer drives it
    assert sb.active() and bpy.app.timers.is_registered(sb.tick)
    # wait until pip unpacks torch into the environment: the worst moment to stop
    tick_setup(sb, lambda: not sb.active() or (sb.status().step == "torch"
                                               and sb.status().detail.startswith("Installing")), 600)
    st = sb.status()
    assert st.active, (st.message, st.hint)
    assert 0 < st.fraction < 1 and st.label == "Installing PyTorch (CPU only)"
    pid = sb.current_job().pid
    assert bpy.ops.neural_atlas.backend_setup_cancel() == {"FINISHED"}
    tick_setup(sb, lambda: not sb.active(), 60)
    st = sb.status()
    assert st.state == "cancelled" and "is not used" in st.hint and "continues where it stopped" in st.hint
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # pip is gone
    # not used: the add-on is not pointed at it, and it reads as incomplete
    assert sb.ready_python() == "" and setup_prefs.backend_python == "" and not setup_prefs.start_local
    assert sb.environment_text()[0].startswith("Incomplete")
    stamp = na.core.environment.read_stamp(sb.env_dir())
    assert stamp["running"] == "torch" and not stamp["complete"] and set(stamp["steps"]) == {"venv", "pip"}
    S["cancel_s"] = time.monotonic() - t0


def test_setup_completes_starts_the_backend_and_says_hello(na, setup_prefs, capfd):
    import bpy

    sb = na.blender.setup_backend
    E = na.core.environment
    capfd.readouterr()
    assert bpy.ops.neural_atlas.backend_setup(wait=True) == {"FINISHED"}
    out = capfd.readouterr().out
    st = sb.status()
    assert st.state == "done" and st.message.startswith("Backend ready: ") and "cpu" in st.message
    # headless progress lines, in order, with a rising percentage
    lines = [ln for ln in out.splitlines() if ln.startswith("[neural_atlas] setup: ") and "%" in ln]
    steps = [ln.split("% ", 1)[1].split(":")[0] for ln in lines]
    for want in ("Checking the existing environment", "Installing PyTorch (CPU only)", "Installing the backend",
                 "Checking the backend loads"):
        assert want in steps, steps
    pct = [int(ln.split("setup: ", 1)[1].split("%")[0]) for ln in lines]
    assert pct == sorted(pct) and pct[-1] >= 85  # the bar only moves forward
    assert "[neural_atlas] setup: done: Installed PyTorch 2.13.0+cpu (CPU only)" in out
    # the interrupted torch step was redone from scratch, from this machine's disk
    log = open(sb.log_path(), encoding="utf-8").read()
    last = log[log.rindex(" setup started"):]
    assert "torch==2.13.0 --force-reinstall" in last and "--index-url" not in last
    stamp = E.read_stamp(sb.env_dir())
    assert E.ready(stamp) and stamp["verified"]["torch"] == "2.13.0+cpu" and stamp["verified"]["backend"] == "0.1.0"
    S["size"] = stamp["verified"]["size"]
    # the add-on now starts its backend from that environment, and it answered hello
    py = E.env_python(sb.env_dir())
    assert setup_prefs.backend_python == py and setup_prefs.start_local and sb.ready_python() == py
    rt = na.blender.runtime.get()
    assert rt.backend is not None and rt.backend.running() and rt.backend.command[0] == py
    conn = rt.session.conn
    assert conn.state == "connected" and (conn.server.get("device") or {}).get("type") == "cpu"
    # pip's downloads and temporary files are gone; nothing else in the user folder changed
    user = sb.user_dir()
    assert not os.path.exists(os.path.join(user, "cache")) and not os.path.exists(os.path.join(user, "tmp"))
    S["setup_s"] = st.seconds


def test_second_setup_reuses_the_environment(na, setup_prefs):
    import bpy

    sb = na.blender.setup_backend
    before = os.path.getsize(sb.log_path())
    # this time through the GUI driver (the timer's tick): check, reuse, connect, hello
    assert bpy.ops.neural_atlas.backend_setup() == {"FINISHED"}
    tick_setup(sb, lambda: not sb.active() and not sb.connecting(), 120)
    st = sb.status()
    assert st.reused and st.state == "done" and st.steps == [], (st.message, st.hint)
    assert st.message.startswith("Backend ready: ") and "cpu" in st.message
    with open(sb.log_path(), encoding="utf-8") as f:
        f.seek(before)
        new = f.read()
    assert "nothing to install" in new and "pip install" not in new and "-m venv" not in new
    S["reuse_s"] = st.seconds


def test_demo_shot_decomposes_and_renders_through_it(na, setup_prefs, clip):
    import bpy

    vse, props = na.blender.vse, na.blender.props
    scene = bpy.context.scene
    strip = vse.add_source_strip(scene, os.path.join(clip, "video_frames"), channel=1, frame_start=1)
    scene.sequence_editor.active_strip = strip
    vse.fit_scene_to_strip(scene, strip, (64, 36))
    st = props.settings(scene)
    st.mask_mode, st.mask_folder = "FOLDER", os.path.join(clip, "masks")
    t0 = time.monotonic()
    assert bpy.ops.neural_atlas.decompose(preset="demo", overrides=tiny_overrides(), wait=True,
                                          timeout=600) == {"FINISHED"}
    job = [j for j in st.jobs if j.kind == "decompose"][-1]
    assert job.state == "done" and job.atlases_loaded and job.n_layers == 2
    info = na.blender.runtime.get().session.jobs[job.job_id]
    assert info.get("device", {}).get("type", "cpu") == "cpu"
    assert bpy.ops.neural_atlas.render_edit(job_id=job.job_id, wait=True, timeout=300) == {"FINISHED"}
    rjob = [j for j in st.jobs if j.kind == "render"][-1]
    assert rjob.state == "done" and rjob.placed
    out = vse.find_strip(scene, rjob.render_strip)
    assert out.channel > strip.channel and len(out.elements) == 8
    # it ran on the backend the add-on started from the set-up environment
    rt = na.blender.runtime.get()
    assert rt.backend.command[0] == na.core.environment.env_python(na.blender.setup_backend.env_dir())
    S["decompose_s"] = time.monotonic() - t0


def test_repair_mends_a_broken_backend_then_remove_deletes_only_the_environment(na, setup_prefs):
    import bpy

    sb = na.blender.setup_backend
    E = na.core.environment
    na.blender.runtime.stop_backend()
    # break the installed backend package (a half-synced folder, an antivirus quarantine, ...)
    site = [d for d, dirs, _ in os.walk(sb.env_dir()) if d.endswith("site-packages")][0]
    shutil.rmtree(os.path.join(site, "backend", "service"))
    assert bpy.ops.neural_atlas.backend_setup(repair=True, wait=True) == {"FINISHED"}
    st = sb.status()
    assert st.state == "done" and st.steps == ["backend", "verify"] and not st.reused
    assert os.path.isfile(os.path.join(site, "backend", "service", "server.py"))
    log = open(sb.log_path(), encoding="utf-8").read()
    last = log[log.rindex(" repair started"):]
    pips = [ln for ln in last.splitlines() if ln.startswith("$ ") and " -m pip install " in ln]
    assert any("--force-reinstall --no-deps" in ln for ln in pips), pips
    assert not [ln for ln in pips if "torch==" in ln], pips  # a working torch is kept
    assert E.ready(E.read_stamp(sb.env_dir()))
    # Remove: the environment goes, the add-on stops using it; workspace and logs stay
    user = sb.user_dir()
    assert bpy.ops.neural_atlas.backend_remove(wait=True) == {"FINISHED"}
    assert not os.path.exists(sb.env_dir()) and sb.status().state == "done"
    assert setup_prefs.backend_python == "" and not setup_prefs.start_local and sb.ready_python() == ""
    assert na.blender.runtime.get().backend is None
    assert os.path.isdir(os.path.join(TMP, "ws_setup")) and os.path.isfile(sb.log_path())
    assert set(os.listdir(user)) <= {"logs", "workspace"}  # no environment, cache or temporary files
    assert sb.environment_text()[0] == "Not set up"
    print(f"\n[test_setup] cancel {S.get('cancel_s', 0):.0f} s, setup {S.get('setup_s', 0):.0f} s, reuse "
          f"{S.get('reuse_s', 0):.1f} s, decompose+render {S.get('decompose_s', 0):.0f} s, environment "
          f"{S.get('size', 0) / 1e9:.2f} GB")
