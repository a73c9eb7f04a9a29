"""Headless Neural Atlas: decompose a clip in the VSE, or re-render a shot's edits.

    blender --background --factory-startup --python-exit-code 1 --python scripts/batch.py -- decompose CLIP [...]
    python scripts/batch.py decompose CLIP [...]          (where the bpy module is installed)

    ... decompose CLIP [--masks DIR ...] [--frames A:B] [--preset demo] [--set SECTION.FIELD=VALUE ...]
                       [--channel 1] [--frame-start 1] [--save OUT.blend]
    ... render --blend IN.blend [--job JOB_ID] [--edit LAYER=PNG ...] [--movie] [--save OUT.blend]

Backend: ``--endpoint`` (default the add-on preference), or ``--start-backend PYTHON`` to
start one (``--backend-args``, default ``-m backend serve``) in ``--workspace``. A backend on
another machine: ``--files remote`` (or ``auto``: ask it) uploads what a job needs and
downloads what the .blend shows into ``--workspace``; ``--curve`` for an SSH tunnel.
Add-on: the installed ``neural_atlas`` extension, or ``--addon-zip ZIP`` installed first.

Exit codes: 0 done (outputs verified), 1 uncaught Python error (with --python-exit-code 1),
2 bad arguments, 3 backend unreachable, 4 job failed, 5 cancelled or timed out.
The last line printed is one JSON object: {"status", "command", "job_id", "outputs", ...}.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
import time
from typing import Any, NoReturn, Optional

EXIT_OK, EXIT_ERROR, EXIT_ARGS, EXIT_UNREACHABLE, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 2, 3, 4, 5
STATUS = {EXIT_OK: "ok", EXIT_ARGS: "bad_arguments", EXIT_UNREACHABLE: "unreachable",
          EXIT_FAILED: "failed", EXIT_CANCELLED: "cancelled", EXIT_ERROR: "error"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Exit(Exception):
    def __init__(self, code: int, message: str = "", hint: str = "", **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.hint, self.extra = code, message, hint, extra


def script_argv(argv: list[str]) -> list[str]:
    """Arguments after ``--`` under Blender; everything after the script name under python."""
    if "--" in argv:
        return argv[argv.index("--") + 1:]
    if os.path.basename(sys.executable).lower().startswith("blender") or "--background" in argv:
        return []
    return argv[1:]


def parse(args: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="batch.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p) -> None:
        """Options before or after the command: the top parser holds them with their defaults,
        each command a copy defaulting to SUPPRESS (as backend/cli_options.py does), so a value
        given before the command is kept."""
        p.add_argument("--endpoint", help="backend endpoint (default: the add-on preference)")
        p.add_argument("--keys", help="keys folder holding signing.key")
        p.add_argument("--start-backend", metavar="PYTHON", help="start a backend with this interpreter")
        p.add_argument("--backend-args", default="-m backend serve")
        p.add_argument("--workspace", help="workspace folder (edits, masks, a started backend's jobs)")
        p.add_argument("--addon-zip", help="install this extension zip first")
        p.add_argument("--timeout", type=float, default=0.0, help="seconds to wait for the job (0: no limit)")
        p.add_argument("--save", metavar="OUT.blend", help="save the .blend here at the end")
        p.add_argument("--keep-backend", action="store_true", help="leave a started backend running")
        p.add_argument("--files", choices=("auto", "remote", "shared"), default=None,
                       help="does the backend see this machine's files? remote: upload the clip, masks and "
                            "edits, download atlases, maps and the render (auto: ask the backend; "
                            "default: the add-on preference)")
        p.add_argument("--curve", action="store_true",
                       help="CURVE on a 127.0.0.1 endpoint too (an SSH tunnel; server.key and "
                            "client.key_secret in --keys)")

    class _Suppressing:
        def __init__(self, p: argparse.ArgumentParser) -> None:
            self.p = p

        def add_argument(self, *flags, **kw):
            return self.p.add_argument(*flags, **{**kw, "default": argparse.SUPPRESS})

    common(ap)
    shared = argparse.ArgumentParser(add_help=False)
    common(_Suppressing(shared))

    d = sub.add_parser("decompose", help="put CLIP in the VSE and decompose it", parents=[shared])
    d.add_argument("clip", help="movie file, or folder of frames (a seed layout's video_frames/)")
    d.add_argument("--masks", nargs="+", default=[], help="mask folders (one per object) or one masks/ folder")
    d.add_argument("--frames", metavar="A:B", help="source frames A..B-1 (default: all)")
    d.add_argument("--preset", default=None)
    d.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="configuration override (repeatable); VALUE is JSON or a string")
    d.add_argument("--overrides", default="", help="overrides as JSON or TOML text")
    d.add_argument("--channel", type=int, default=1)
    d.add_argument("--frame-start", type=int, default=1)
    d.add_argument("--open", metavar="IN.blend", help="open this .blend first (default: an empty scene)")

    r = sub.add_parser("render", help="re-render a decomposed shot with its edit images", parents=[shared])
    r.add_argument("--blend", required=True, help="a .blend holding the decomposition job")
    r.add_argument("--job", default="", help="decomposition job id (default: the last finished one)")
    r.add_argument("--edit", action="append", default=[], metavar="LAYER=PNG",
                   help="use this PNG (RGBA, atlas size) as layer LAYER's edit image")
    r.add_argument("--movie", action="store_true", help="also write an mp4")
    try:
        return ap.parse_args(args)
    except SystemExit as e:
        raise Exit(EXIT_ARGS if e.code else EXIT_OK, "bad arguments (see the usage above)") from None


def set_overrides(items: list[str], text: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if text:
        from_text = json.loads(text) if text.strip().startswith("{") else None
        if from_text is None:
            import tomllib
            from_text = tomllib.loads(text)
        out.update(from_text)
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise Exit(EXIT_ARGS, f"--set {item!r}: expected SECTION.FIELD=VALUE")
        key, val = item.split("=", 1)
        section, fieldname = key.split(".", 1)
        try:
            v: Any = json.loads(val)
        except ValueError:
            v = val
        node = out.setdefault(section, {})
        parts = fieldname.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


# ------------------------------------------------------------------ add-on
def load_addon(zip_path: Optional[str]) -> Any:
    import addon_utils
    import bpy

    def find() -> Optional[str]:
        for m in addon_utils.modules(refresh=True) or ():
            if m.__name__.endswith(".neural_atlas") or m.__name__ == "neural_atlas":
                return m.__name__
        return None

    if zip_path is None and find() is None:
        plat = {"linux": "linux_x64", "darwin": "macos_arm64", "win32": "windows_x64"}.get(sys.platform, "")
        cands = sorted(glob.glob(os.path.join(ROOT, "dist", f"neural_atlas-*-{plat}.zip")))
        if cands:
            zip_path = cands[-1]
    if zip_path:
        if not os.path.isfile(zip_path):
            raise Exit(EXIT_ARGS, f"--addon-zip {zip_path}: no such file")
        r = bpy.ops.extensions.package_install_files(filepath=os.path.abspath(zip_path), repo="user_default",
                                                     enable_on_install=True)
        if "FINISHED" not in r:
            raise Exit(EXIT_ERROR, f"could not install {zip_path}")
    name = find()
    if name is None:
        raise Exit(EXIT_ARGS, "the Neural Atlas add-on is not installed",
                   "pass --addon-zip dist/neural_atlas-<version>-<platform>.zip (scripts/build_extension)")
    if name not in bpy.context.preferences.addons:
        addon_utils.enable(name, default_set=True)
    return importlib.import_module(name)


def configure(na: Any, a: argparse.Namespace) -> Any:
    import bpy

    p = bpy.context.preferences.addons[na.__name__].preferences
    if a.endpoint:
        p.endpoint = a.endpoint
    if a.keys:
        p.keys_dir = os.path.abspath(a.keys)
    if a.workspace:
        p.workspace = os.path.abspath(a.workspace)
    if getattr(a, "files", None):
        p.files_mode = a.files.upper()
    if getattr(a, "curve", False):
        p.use_curve = True
    if a.start_backend:
        p.start_local, p.backend_python, p.backend_args = True, os.path.abspath(a.start_backend), a.backend_args
    else:
        p.start_local = False
    return p


def connect(na: Any) -> dict:
    import bpy

    rt = na.blender.runtime
    try:
        r = ops().connect(wait=True)
    except RuntimeError as e:
        s = rt.get().session
        msg = (s.conn.message if s is not None and s.conn.message else rt.get().last_error) or \
            str(e).replace("Error: ", "").strip()
        hint = s.conn.hint if s is not None else rt.get().last_hint
        raise Exit(EXIT_UNREACHABLE, msg, hint) from None
    if "FINISHED" not in r:
        raise Exit(EXIT_UNREACHABLE, "could not connect to the backend")
    conn = rt.get().session.conn
    print(f"[batch] {conn.message}", flush=True)
    return dict(conn.server)


def ops() -> Any:
    """``bpy.ops.neural_atlas`` (registered at run time, so unknown to the type stubs)."""
    import bpy

    return getattr(bpy.ops, "neural_atlas")


def run_op(op: Any, **kw: Any) -> None:
    try:
        r = op(**kw)
    except RuntimeError as e:
        msg = str(e).replace("Error: ", "").strip()
        code = EXIT_CANCELLED if ("cancelled" in msg or "did not finish" in msg) else EXIT_FAILED
        if "Cannot reach" in msg or "unreachable" in msg:
            code = EXIT_UNREACHABLE
        raise Exit(code, msg) from None
    if "FINISHED" not in r:
        raise Exit(EXIT_FAILED, f"{op.idname_py()} returned {r}")


def on_progress_printer() -> Any:
    last = [0.0]

    def show(ch: Any) -> None:
        now = time.monotonic()
        if ch.kind == "job" and now - last[0] < 2.0:
            return
        last[0] = now
        info = ch.info
        print(f"[batch] {ch.kind} {ch.job_id} {info.get('state', '')} {info.get('phase', '')} "
              f"{float(info.get('fraction') or 0) * 100:.0f}%", flush=True)
    return show


# ------------------------------------------------------------------ commands
def cmd_decompose(na: Any, a: argparse.Namespace) -> dict:
    import bpy

    if a.open:
        bpy.ops.wm.open_mainfile(filepath=os.path.abspath(a.open))
    vse, props = na.blender.vse, na.blender.props
    if not os.path.exists(a.clip):
        raise Exit(EXIT_ARGS, f"clip {a.clip!r} does not exist")
    overrides = set_overrides(a.set, a.overrides)
    scene = vse.sequencer_scene()
    st = props.settings(scene)
    try:
        strip = vse.add_source_strip(scene, os.path.abspath(a.clip), channel=a.channel, frame_start=a.frame_start)
    except Exception as e:  # noqa: BLE001 - an unreadable clip is a bad argument
        raise Exit(EXIT_ARGS, f"cannot put {a.clip!r} in the VSE: {e}") from None
    scene.sequence_editor.active_strip = strip
    vse.fit_scene_to_strip(scene, strip)
    if a.frames:
        try:
            fa, fb = (int(x) for x in a.frames.split(":"))
        except ValueError:
            raise Exit(EXIT_ARGS, f"--frames {a.frames!r}: expected A:B") from None
        scene.frame_start, scene.frame_end = strip.frame_start + fa, strip.frame_start + fb - 1
        st.use_scene_range = True
    if a.masks:
        st.mask_mode = "FOLDER"
        if len(a.masks) == 1:
            st.mask_folder = os.path.abspath(a.masks[0])
        else:  # several object folders: gather them under one folder of links, in the given order
            root = os.path.join(os.path.abspath(a.workspace or "."), "batch_masks", str(os.getpid()))
            os.makedirs(root, exist_ok=True)
            for k, m in enumerate(a.masks):
                os.symlink(os.path.abspath(m), os.path.join(root, f"{k:02d}_{os.path.basename(m.rstrip('/'))}"))
            st.mask_folder = root
    connect(na)
    run_op(ops().decompose, strip=strip.name, preset=a.preset or "",
           overrides=json.dumps(overrides) if overrides else "", wait=True, timeout=a.timeout)
    job = st.jobs[len(st.jobs) - 1]
    atlases = [bpy.path.abspath(i.filepath) for i in na.blender.images.job_images(job.shot, "atlas")]
    edits = [bpy.path.abspath(i.filepath) for i in na.blender.images.job_images(job.shot, "edit")]
    for f in atlases + edits:
        if not os.path.isfile(f):
            raise Exit(EXIT_FAILED, f"expected output {f} is missing")
    return {"job_id": job.job_id, "outputs": {"out_dir": job.out_dir, "atlases": atlases, "edits": edits,
                                              "psnr": job.psnr, "strip": strip.name}}


def cmd_render(na: Any, a: argparse.Namespace) -> dict:
    import bpy

    if not os.path.isfile(a.blend):
        raise Exit(EXIT_ARGS, f"--blend {a.blend!r} does not exist")
    bpy.ops.wm.open_mainfile(filepath=os.path.abspath(a.blend))
    vse, props, images = na.blender.vse, na.blender.props, na.blender.images
    scene = vse.sequencer_scene()
    st = props.settings(scene)
    jobs = [j for j in st.jobs if j.kind == "decompose" and j.state == "done" and (not a.job or j.job_id == a.job)]
    if not jobs:
        raise Exit(EXIT_ARGS, f"no finished decomposition{' ' + a.job if a.job else ''} in {a.blend}")
    job = jobs[-1]
    if not job.atlases_loaded:
        run_op(ops().load_atlases, job_id=job.job_id)
    for item in a.edit:
        try:
            layer_s, path = item.split("=", 1)
            layer = int(layer_s)
        except ValueError:
            raise Exit(EXIT_ARGS, f"--edit {item!r}: expected LAYER=PNG") from None
        img = images.find_image(job.shot, layer, "edit")
        if img is None or not os.path.isfile(path):
            raise Exit(EXIT_ARGS, f"--edit {item!r}: no edit image for layer {layer} or no such file")
        src = bpy.data.images.load(os.path.abspath(path), check_existing=False)
        if tuple(src.size) != tuple(img.size):
            raise Exit(EXIT_ARGS, f"--edit {item!r}: {tuple(src.size)} is not the atlas size {tuple(img.size)}")
        images.write_array(img, images.to_array(src))  # becomes dirty: Render Edit saves it
        bpy.data.images.remove(src)
    parent_id = job.job_id  # `job` may be invalidated when the render record is added
    connect(na)
    run_op(ops().render_edit, job_id=parent_id, movie=a.movie, wait=True, timeout=a.timeout)
    r = st.jobs[len(st.jobs) - 1]
    strip = vse.find_strip(scene, r.render_strip)
    if strip is None:
        raise Exit(EXIT_FAILED, "the render finished but no strip was placed in the VSE")
    frames = [os.path.join(bpy.path.abspath(strip.directory), e.filename) for e in strip.elements] \
        if strip.type == "IMAGE" else []
    movie = None
    if a.movie:
        found = glob.glob(os.path.join(r.out_dir, "**", "*.mp4"), recursive=True)
        movie = found[0] if found else None
        if movie is None:
            raise Exit(EXIT_FAILED, "--movie asked for an mp4 but the render wrote none")
    return {"job_id": r.job_id, "outputs": {"parent": parent_id, "strip": strip.name, "channel": strip.channel,
                                            "frame_start": strip.frame_final_start,
                                            "frame_end": strip.frame_final_end - 1,
                                            "frames": len(frames), "frames_dir": os.path.dirname(frames[0]) if frames else "",
                                            "movie": movie, "out_dir": r.out_dir}}


def main(argv: list[str]) -> int:
    result: dict[str, Any] = {"status": "error", "command": None, "job_id": None, "outputs": {}}
    na = None
    a = None
    code = EXIT_ERROR
    try:
        a = parse(script_argv(argv))
        result["command"] = a.command
        import bpy  # noqa: F401 - Blender, or the bpy module

        na = load_addon(a.addon_zip)
        configure(na, a)
        out = cmd_decompose(na, a) if a.command == "decompose" else cmd_render(na, a)
        result.update(out)
        if a.save:
            path = os.path.abspath(a.save)
            bpy.ops.wm.save_as_mainfile(filepath=path)
            if not os.path.isfile(path):
                raise Exit(EXIT_FAILED, f"could not save {path}")
            result["outputs"]["blend"] = path
        code = EXIT_OK
    except Exit as e:
        code = e.code
        if e.message:
            result["error"] = e.message
            print(f"[batch] error: {e.message}", file=sys.stderr, flush=True)
        if e.hint:
            result["hint"] = e.hint
            print(f"[batch] {e.hint}", file=sys.stderr, flush=True)
    finally:
        if na is not None and not (a is not None and a.keep_backend):
            try:
                na.blender.runtime.shutdown()
            except Exception:  # noqa: BLE001 - never mask the real outcome
                pass
    result["status"] = STATUS.get(code, "error")
    print(json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    rc = main(sys.argv)
    sys.stdout.flush()
    sys.exit(rc)
