"""The add-on's runtime: one backend session, the local backend process, and the
two drivers that feed job changes into the .blend.

* GUI: ``tick`` is a persistent ``bpy.app.timers`` callback. It drains the socket
  with ``poll(0)``, caps the messages handled per tick, applies the changes on
  the main thread and redraws our panels. No threads touch bpy; nothing blocks.
* Headless (``bpy.app.background``, batch scripts, tests): ``wait`` blocks in
  short polling slices and hands every change to the same ``apply``.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import bpy

from ..core import jobs as J
from . import launcher

MAX_MESSAGES_PER_TICK = 64
TICK_BUSY_S = 0.1
TICK_IDLE_S = 1.0


@dataclass
class Runtime:
    session: Optional[J.Session] = None
    backend: Optional[launcher.LocalBackend] = None
    log_path: str = ""
    last_error: str = ""
    last_hint: str = ""
    ticks: int = 0
    applied: int = 0
    notes: list[str] = field(default_factory=list)  # recent messages for the panel
    attached: bool = False  # jobs of the open .blend re-attached


_RT = Runtime()


def get() -> Runtime:
    return _RT


def reset() -> None:
    global _RT
    from . import transfers

    transfers.reset()
    shutdown()
    _RT = Runtime()


def note(text: str) -> None:
    _RT.notes.append(time.strftime("%H:%M:%S ") + text)
    del _RT.notes[:-8]
    if bpy.app.background:
        print(f"[neural_atlas] {text}", flush=True)


# ------------------------------------------------------------------- session
def session(context: Optional[bpy.types.Context] = None) -> J.Session:
    from .prefs import prefs

    p = prefs(context)
    keys = bpy.path.abspath(p.keys_dir) if p.keys_dir else None
    log_path = p.log_path()
    if _RT.session is None:
        _RT.session = J.Session(p.endpoint, keys_dir=keys, log_path=log_path)
        _RT.session.force_curve = bool(getattr(p, "use_curve", False))
    else:
        _RT.session.reconfigure(p.endpoint, keys, bool(getattr(p, "use_curve", False)))
        _RT.session.log_path = log_path
    _RT.log_path = log_path
    return _RT.session


def endpoint_allowed(endpoint: str) -> bool:
    """Loopback endpoints are always allowed; others need Blender's online access."""
    from ..core.protocol import is_loopback_endpoint

    return is_loopback_endpoint(endpoint) or bool(getattr(bpy.app, "online_access", True))


def connect(context: Optional[bpy.types.Context] = None, force: bool = False) -> J.Session:
    from .prefs import prefs

    p = prefs(context)
    if not endpoint_allowed(p.endpoint):
        raise J.SessionError("offline", f"{p.endpoint} is not on this machine and Blender's online "
                             "access is off", "Allow online access (Preferences > System > Network) "
                             "or use a tcp://127.0.0.1 endpoint")
    if p.start_local and (_RT.backend is None or not _RT.backend.running()):
        start_backend(context)
    s = session(context)
    s.connect(force=force)
    ensure_timer()
    return s


# ------------------------------------------------------------- local backend
def start_backend(context: Optional[bpy.types.Context] = None) -> launcher.LocalBackend:
    from .prefs import prefs

    p = prefs(context)
    if _RT.backend is not None and _RT.backend.running():
        return _RT.backend
    try:
        from ..core.signing import KeyFileError, ensure_key

        try:  # the add-on and the backend it starts share the key; make it before either reads it
            ensure_key(bpy.path.abspath(p.keys_dir) if p.keys_dir else None)
        except (OSError, KeyFileError) as e:
            raise launcher.LaunchError(f"cannot create the signing key: {e}") from None
        ws = p.workspace_path()
        from . import setup_backend

        python = bpy.path.abspath(p.backend_python) if p.backend_python else setup_backend.ready_python()
        if not python:
            raise launcher.LaunchError("no backend is set up: Preferences > Add-ons > Neural Atlas > Set up "
                                       "Backend (or set Backend Python to an environment with the backend)")
        _RT.backend = launcher.start(python, p.backend_args, p.endpoint,
                                     os.path.join(ws, "backend"), p.log_path(),
                                     keys_dir=bpy.path.abspath(p.keys_dir) if p.keys_dir else "",
                                     allow_roots=[ws, os.path.expanduser("~")])
    except launcher.LaunchError as e:
        msg, hint = J.explain("launch_failed", str(e), log_path=p.log_path())
        _RT.last_error, _RT.last_hint = msg, hint
        raise
    _RT.log_path = p.log_path()
    note(f"started the local backend (pid {_RT.backend.pid}); log: {_RT.backend.log_path}")
    ensure_timer()
    return _RT.backend


def stop_backend() -> Optional[int]:
    b, _RT.backend = _RT.backend, None
    if b is None:
        return None
    code = launcher.stop(b)
    note(f"stopped the local backend (exit code {code})")
    return code


def _check_backend() -> None:
    b = _RT.backend
    if b is not None and not b.running():
        tail = b.log_tail(6)
        code = b.exit_code()
        _RT.backend = None
        blocked = any(s in tail for s in ("Address already in use", "Permission denied", "EADDRINUSE",
                                          "WinError 10013"))
        if blocked:
            _RT.last_error = "The local backend could not open its port"
            _RT.last_hint = ("Another program uses the port, or a firewall/antivirus blocks it: choose "
                             f"another port in the endpoint. Log: {b.log_path}")
        else:
            _RT.last_error = f"The local backend exited (code {code})"
            _RT.last_hint = f"See the log: {b.log_path}"
        note(_RT.last_error)


# -------------------------------------------------------------------- timer
def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=0.0, persistent=True)


def stop_timer() -> None:
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)


def tick() -> Optional[float]:
    """The GUI driver (also called directly by tests): never blocks, bounded work."""
    _RT.ticks += 1
    try:
        _check_backend()
        s = _RT.session
        if s is None:
            return TICK_IDLE_S
        if not _RT.attached:
            _attach_saved_jobs(s)
        s.refresh_device()
        from . import transfers

        moving = transfers.tick()  # finished uploads submit, finished downloads apply
        changes = s.pump(MAX_MESSAGES_PER_TICK)
        if changes:
            from . import actions

            for ch in changes:
                actions.apply(ch)
                _RT.applied += 1
            _redraw()
        return TICK_BUSY_S if s.busy() or moving else TICK_IDLE_S
    except Exception:  # noqa: BLE001 - a timer that raises is unregistered by Blender
        traceback.print_exc()
        _RT.last_error = "internal error in the Neural Atlas poller (see the system console)"
        return TICK_IDLE_S


def _attach_saved_jobs(s: J.Session) -> None:
    from .props import settings

    from . import transfers

    ids = []
    for sc in bpy.data.scenes:
        st = settings(sc)
        for j in st.jobs:
            if j.state == "uploading" and not j.job_id and j.token not in transfers.TASKS:
                j.state = "failed"  # saved mid-upload: nothing reached the backend's queue
                j.error, j.hint = "the upload was interrupted", "Submit again: what arrived is not sent twice"
            if j.job_id and j.state in J.ACTIVE_STATES + ("done",) and not (
                    j.state == "done" and (j.atlases_loaded or j.placed)):
                ids.append(j.job_id)
    _RT.attached = True
    if ids:
        s.attach(ids)


def wait(job_id: str, timeout: Optional[float] = None,
         on_progress: Optional[Callable[[J.Change], None]] = None) -> dict[str, Any]:
    """The headless driver: block until the job finished and its results are applied."""
    from . import actions

    s = _RT.session
    if s is None:
        raise J.SessionError("not_connected", "not connected to a backend")

    def handle(ch: J.Change) -> None:
        actions.apply(ch)
        _RT.applied += 1
        if on_progress is not None:
            on_progress(ch)

    return s.wait(job_id, timeout=timeout, on_change=handle)


def wait_submitted(token: str, timeout: float = 60.0) -> str:
    from . import actions

    s = _RT.session
    if s is None:
        raise J.SessionError("not_connected", "not connected to a backend")
    return s.wait_submitted(token, timeout=timeout, on_change=actions.apply)


def _redraw() -> None:
    wm = bpy.context.window_manager
    if wm is None:
        return
    for win in wm.windows:
        for area in win.screen.areas:
            if area.type in ("SEQUENCE_EDITOR", "IMAGE_EDITOR", "PREFERENCES", "VIEW_3D"):
                area.tag_redraw()


# ------------------------------------------------------------------ drawing
def draw_connection(layout: bpy.types.UILayout, rt: Runtime) -> None:
    s = rt.session
    conn = s.conn if s is not None else J.Connection()
    icon = {"connected": "CHECKMARK", "connecting": "SORTTIME", "unreachable": "ERROR",
            "error": "ERROR"}.get(conn.state, "UNLINKED")
    row = layout.row()
    row.label(text=conn.message or "Not connected", icon=icon)
    row.operator("neural_atlas.connect", text="", icon="FILE_REFRESH")
    if conn.state == "connected":
        dev = conn.server.get("device") or {}
        layout.label(text=J.device_text(dev), icon="MEMORY")
        if conn.server.get("backend_version"):
            layout.label(text=f"Backend {conn.server.get('backend_version')}, "
                              f"{conn.server.get('queued', 0)} queued")
    if conn.hint:
        _wrap(layout, conn.hint, icon="INFO")
    if rt.backend is not None:
        layout.label(text=f"Local backend pid {rt.backend.pid}", icon="CONSOLE")
    if rt.last_error:
        _wrap(layout, rt.last_error, icon="ERROR")
        if rt.last_hint:
            _wrap(layout, rt.last_hint, icon="INFO")


def _wrap(layout: bpy.types.UILayout, text: str, icon: str = "NONE", width: int = 48) -> None:
    col = layout.column(align=True)
    words, line, first = text.split(), "", True
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            col.label(text=line, icon=icon if first else "BLANK1")
            line, first = w, False
        else:
            line = f"{line} {w}".strip()
    if line:
        col.label(text=line, icon=icon if first else "BLANK1")


def shutdown() -> None:
    stop_timer()
    if _RT.session is not None:
        _RT.session.close()
        _RT.session = None
    stop_backend()
