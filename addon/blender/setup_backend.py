"""Preferences > Set up backend: the bpy side of the backend's own environment.

The decisions and the subprocess work live in ``core.environment`` / ``core.installer``
(bpy-free). Here: the preference settings (a mixin of the add-on's preferences), the
operators (Set up, Repair, Remove, Cancel, Open Log), the drawing, and the two drivers:
a ``bpy.app.timers`` tick in the GUI and the blocking loop in background mode (timers
never fire in the bpy module or after a ``-b`` script ends). No thread touches bpy:
pip runs as a subprocess writing to the log, and the driver reads the log.

When the setup succeeds the add-on starts its backend from the new environment
(*Start a local backend* on, *Backend Python* = the environment's python) and checks
it with ``hello`` (device and GPU memory shown).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, StringProperty

from ..core import environment as E
from ..core import installer as I

WHEEL_DIR = "backend_dist"  # inside the extension package (scripts/build_extension)
CONNECT_TIMEOUT_S = 90.0
TICK_S = 0.2

VARIANT_ITEMS = [
    ("auto", "Automatic", "NVIDIA GPU: the CUDA build its driver runs; Apple silicon: MPS; else CPU"),
    ("cuda", "NVIDIA CUDA", "The CUDA build of PyTorch for the NVIDIA driver found on this machine"),
    ("mps", "Apple GPU (MPS)", "PyTorch from PyPI, using the Apple silicon GPU"),
    ("cpu", "CPU only", "Small download; decompositions are slow (fine for previews)"),
]
SOURCE_ITEMS = [
    ("pytorch", "PyTorch's index", "download.pytorch.org/whl/<build> (PyPI on macOS)"),
    ("pip", "pip's configuration", "Where pip is configured to look: PyPI, a studio mirror (pip.conf), local disk"),
    ("custom", "Custom index", "A package index URL of your own"),
]


class SetupPreferences:
    """Settings of the setup, mixed into the add-on's AddonPreferences."""

    setup_python: StringProperty(  # type: ignore[valid-type]
        name="Python for the backend", subtype="FILE_PATH", default="",
        description="The Python the backend's environment is made from. Empty: Blender's own Python "
                    "when it is 3.11 or 3.12; otherwise pick the python of a Python 3.11/3.12 installation")
    torch_variant: EnumProperty(  # type: ignore[valid-type]
        name="PyTorch", items=VARIANT_ITEMS, default="auto",
        description="Which PyTorch build the setup installs")
    torch_source: EnumProperty(  # type: ignore[valid-type]
        name="PyTorch from", items=SOURCE_ITEMS, default="pytorch",
        description="Where the setup downloads PyTorch from")
    torch_index: StringProperty(  # type: ignore[valid-type]
        name="Index URL", default="", description="Package index for PyTorch (PyTorch from: Custom index)")
    torch_requirement: StringProperty(  # type: ignore[valid-type]
        name="PyTorch requirement", default="",
        description="Empty: what the backend needs (from its package). E.g. torch==2.7.1 to pin a version")
    setup_advanced: BoolProperty(name="Advanced", default=False)  # type: ignore[valid-type]


@dataclass
class _State:
    job: Optional[I.Job] = None
    status: I.Status = field(default_factory=I.Status)
    machine: Optional[tuple[str, Optional[E.Nvidia]]] = None
    pythons: dict[str, Any] = field(default_factory=dict)   # path -> PythonInfo | SetupError
    requirements: dict[str, str] = field(default_factory=dict)  # wheel -> its torch requirement
    connecting_until: float = 0.0
    ready_text: str = ""
    stamp_cache: tuple[float, dict[str, Any]] = (0.0, {})


_S = _State()


def _prefs(context: Optional[bpy.types.Context] = None) -> Any:
    from .prefs import prefs

    return prefs(context)


def user_dir() -> str:
    from .prefs import user_dir as ud

    return ud()


def env_dir() -> str:
    return os.path.join(user_dir(), E.ENV_DIRNAME)


def log_path() -> str:
    return os.path.join(user_dir(), "logs", "setup.log")


def wheel_path() -> str:
    """The backend wheel shipped in the extension ($NEURAL_ATLAS_BACKEND_WHEEL overrides)."""
    env = os.environ.get("NEURAL_ATLAS_BACKEND_WHEEL")
    if env:
        return env
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(pkg, WHEEL_DIR, "neural_atlas-*.whl")))
    return found[-1] if found else os.path.join(pkg, WHEEL_DIR, "neural_atlas-(missing).whl")


def base_python(p: Any) -> str:
    """The artist's pick, else Blender's own interpreter."""
    if p.setup_python:
        return os.path.abspath(bpy.path.abspath(p.setup_python))
    return E.own_python(sys.executable, sys.prefix)


def python_info(path: str) -> Any:
    """PythonInfo or SetupError for ``path`` (runs it once per path and session)."""
    if path not in _S.pythons:
        try:
            _S.pythons[path] = E.inspect_python(path)
        except E.SetupError as e:
            _S.pythons[path] = e
    return _S.pythons[path]


def machine(refresh: bool = False) -> tuple[str, Optional[E.Nvidia]]:
    if _S.machine is None or refresh:
        _S.machine = (E.platform_key(), E.detect_nvidia())
    return _S.machine


def torch_choice(p: Any, refresh: bool = False) -> E.TorchChoice:
    plat, nv = machine(refresh)
    w = wheel_path()
    if w not in _S.requirements:  # read once: draw() calls this on every redraw
        _S.requirements[w] = (E.wheel_requirement(w, "torch") if os.path.isfile(w) else "") or "torch"
    default = _S.requirements[w]
    return E.choose_torch(plat, nv, variant=p.torch_variant, requirement=p.torch_requirement,
                          source=p.torch_source, custom_index=p.torch_index, default_requirement=default)


def stamp() -> dict[str, Any]:
    path = E.stamp_path(env_dir())
    try:
        m = os.path.getmtime(path)
    except OSError:
        return {}
    if m != _S.stamp_cache[0]:
        _S.stamp_cache = (m, E.read_stamp(env_dir()))
    return _S.stamp_cache[1]


def ready_python() -> str:
    """The environment's python when a setup completed there, else ''."""
    py = E.env_python(env_dir())
    return py if E.ready(stamp()) and os.path.isfile(py) else ""


def status() -> I.Status:
    return _S.status


def active() -> bool:
    return _S.job is not None and _S.job.status.active


def current_job() -> Optional[I.Job]:
    return _S.job


def connecting() -> bool:
    """After a setup: the backend is being started and asked for its device."""
    return bool(_S.connecting_until)


def note(text: str) -> None:
    from . import runtime

    runtime.note(text)


# ------------------------------------------------------------------ actions
def start(context: Optional[bpy.types.Context] = None, *, repair: bool = False,
          required_bytes: Optional[int] = None) -> I.Job:
    """Begin a setup (or repair) without blocking. Raises SetupError for what is known
    before anything runs (a bad setting, an unsupported machine)."""
    from . import runtime

    if active():
        raise E.SetupError("busy", "A setup is already running", "Wait for it or cancel it")
    p = _prefs(context)
    plat = machine(refresh=True)[0]
    rosetta = plat == "macos-x64" and E.running_under_rosetta()
    E.check_platform(plat, rosetta)
    choice = torch_choice(p)
    rt = runtime.get()
    if repair and rt.backend is not None and _inside(rt.backend.command[0], env_dir()):
        runtime.stop_backend()  # its files are about to be reinstalled
    _S.pythons.clear()
    cfg = I.SetupConfig(user_dir=user_dir(), base_python=base_python(p), wheel=wheel_path(), torch=choice,
                        platform_name=plat, repair=repair, online=bool(getattr(bpy.app, "online_access", True)),
                        nvidia=machine()[1], required_bytes=required_bytes,
                        helper_python=E.own_python(sys.executable, sys.prefix))
    _S.job = I.start_setup(cfg)
    _S.status, _S.connecting_until, _S.ready_text = _S.job.status, 0.0, ""
    note(f"{'repair' if repair else 'setup'} of the backend environment started; log: {cfg.log_path}")
    _ensure_timer()
    return _S.job


def start_removal(context: Optional[bpy.types.Context] = None) -> I.Job:
    from . import runtime

    if active():
        raise E.SetupError("busy", "A setup is running", "Cancel it first")
    p = _prefs(context)
    rt = runtime.get()
    if rt.backend is not None and _inside(rt.backend.command[0], env_dir()):
        runtime.stop_backend()
    if p.backend_python and _inside(bpy.path.abspath(p.backend_python), env_dir()):
        p.backend_python = ""  # the add-on no longer starts a backend that is gone
        p.start_local = False
    _S.job = I.start_removal(user_dir(), E.own_python(sys.executable, sys.prefix))
    _S.status, _S.ready_text = _S.job.status, ""
    _ensure_timer()
    return _S.job


def cancel() -> bool:
    if not active():
        return False
    assert _S.job is not None
    _S.job.cancel()
    return True


def _inside(path: str, folder: str) -> bool:
    a, b = os.path.normcase(os.path.abspath(path)), os.path.normcase(os.path.abspath(folder))
    return a.startswith(b + os.sep)


def _configure(p: Any) -> str:
    """Point the add-on at the new environment: it starts its backend from there."""
    py = E.env_python(env_dir())
    p.backend_python = py
    p.start_local = True
    return py


def _connect(context: Optional[bpy.types.Context]) -> None:
    from ..core import jobs as J
    from . import launcher, runtime

    try:
        runtime.connect(context, force=True)
    except (J.SessionError, launcher.LaunchError) as e:
        _fail_status(getattr(e, "message", str(e)), getattr(e, "hint", ""), "backend_start")
        return
    _S.connecting_until = time.monotonic() + CONNECT_TIMEOUT_S


def _fail_status(message: str, hint: str, code: str) -> None:
    st = _S.status
    st.state, st.message, st.hint, st.code = "failed", message, hint, code
    note(f"setup: {message}" + (f" ({hint})" if hint else ""))


def _connection_result() -> Optional[bool]:
    """True once hello answered with a probed device, False when it failed, None while waiting."""
    from . import runtime

    s = runtime.get().session
    if s is None:
        return False
    conn = s.conn
    if conn.state == "connected":
        dev = conn.server.get("device") or {}
        return None if dev.get("name") == "probing" else True
    if conn.state in ("unreachable", "error") and runtime.get().backend is None:
        return False
    return None


def _ready_text() -> str:
    from ..core import jobs as J
    from . import runtime

    s = runtime.get().session
    dev = (s.conn.server.get("device") or {}) if s is not None else {}
    return f"Backend ready: {J.device_text(dev)}"


# ------------------------------------------------------------------ drivers
def _ensure_timer() -> None:
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=0.0, persistent=True)


def tick() -> Optional[float]:
    """The GUI driver (tests call it directly: timers never fire in the bpy module)."""
    try:
        job = _S.job
        if job is not None and job.status.active:
            job.poll()
            if not job.status.active:
                _after_job(bpy.context)
            _redraw()
            return TICK_S
        if _S.connecting_until:
            from . import runtime

            runtime.tick()
            res = _connection_result()
            if res is None and time.monotonic() < _S.connecting_until:
                return TICK_S
            _S.connecting_until = 0.0
            if res:
                _S.ready_text = _ready_text()
                _S.status.message = _S.ready_text
                note(_S.ready_text)
            else:
                rt = runtime.get()
                msg = rt.last_error or (rt.session.conn.message if rt.session else "") or "no answer"
                _fail_status(f"The backend was installed but did not answer: {msg}",
                             f"See the backend log: {_prefs().log_path()}", "backend_start")
            _redraw()
        return None
    except Exception:  # noqa: BLE001 - a raising timer is dropped by Blender; say why instead
        import traceback

        traceback.print_exc()
        _fail_status("internal error in the setup's poller (see the system console)", "", "internal")
        return None


def _after_job(context: Optional[bpy.types.Context]) -> None:
    st = _S.status
    note(f"{st.kind}: {st.state}: {st.message}" + (f" ({st.hint})" if st.hint else ""))
    if st.kind == "remove" or st.state != "done":
        return
    _configure(_prefs(context))
    _connect(context)


def run_blocking(context: Optional[bpy.types.Context], timeout: Optional[float] = None) -> I.Status:
    """Background mode: drive the running job to its end with progress lines, then
    start the backend and wait for its hello."""
    job = _S.job
    if job is None:
        return _S.status

    def show(st: I.Status) -> None:
        print(f"[neural_atlas] {st.kind}: {st.line()}", flush=True)

    job.run(on_progress=show, timeout=timeout)
    note(f"{_S.status.kind}: {_S.status.state}: {_S.status.message}")
    if _S.status.kind == "remove" or _S.status.state != "done":
        return _S.status
    _configure(_prefs(context))
    # the Connect operator's blocking wait: starts the local backend, waits for hello
    connect_op: Any = getattr(bpy.ops, "neural_atlas").connect  # registered by this add-on (no stub)
    if connect_op(wait=True) == {"FINISHED"}:
        from . import runtime

        end = time.monotonic() + CONNECT_TIMEOUT_S  # the device probe may take a while on a busy machine
        while _connection_result() is None and time.monotonic() < end:
            runtime.tick()
            time.sleep(TICK_S)
        _S.ready_text = _ready_text()
        _S.status.message = _S.ready_text
        note(_S.ready_text)
    else:
        from . import runtime

        rt = runtime.get()
        _fail_status(f"The backend was installed but did not answer: {rt.last_error or 'no answer'}",
                     rt.last_hint or f"See the backend log: {_prefs(context).log_path()}", "backend_start")
    return _S.status


def shutdown() -> None:
    """Unregister / quit: interrupt a running pip (it rolls back what it was installing)."""
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    if _S.job is not None and _S.job.status.active:
        _S.job.cancel()


def _redraw() -> None:
    from . import runtime

    runtime._redraw()  # the Preferences and the Sequencer (the same areas the job poller redraws)


# ---------------------------------------------------------------- operators
def _report_error(op: bpy.types.Operator, e: E.SetupError) -> set[str]:
    _S.status = I.Status(state="failed", message=e.message, hint=e.hint, code=e.code, log_path=log_path())
    op.report({"ERROR"}, e.message + (f". {e.hint}" if e.hint else ""))
    return {"CANCELLED"}


class NA_OT_backend_setup(bpy.types.Operator):
    """Make the backend's own Python environment in the extension's folder, install the PyTorch \
build for this machine and the backend, then start it"""

    bl_idname = "neural_atlas.backend_setup"
    bl_label = "Set up Backend"

    repair: BoolProperty(  # type: ignore[valid-type]
        name="Repair", default=False, options={"SKIP_SAVE"},
        description="Reinstall the backend and whatever is missing or broken")
    wait: BoolProperty(default=False, options={"SKIP_SAVE"})  # type: ignore[valid-type]
    timeout: FloatProperty(default=0.0, options={"SKIP_SAVE"})  # type: ignore[valid-type]
    required_gb: FloatProperty(default=0.0, options={"SKIP_SAVE", "HIDDEN"})  # type: ignore[valid-type]

    @classmethod
    def description(cls, context: bpy.types.Context, props: Any) -> str:
        if getattr(props, "repair", False):
            return "Re-run the missing steps and reinstall the backend (keeps a working PyTorch)"
        return str(cls.__doc__ or "")

    def execute(self, context: bpy.types.Context) -> set[str]:
        if self.wait and not bpy.app.background:
            self.report({"ERROR"}, "waiting blocks the interface; it is only for background mode")
            return {"CANCELLED"}
        try:
            start(context, repair=self.repair,
                  required_bytes=int(self.required_gb * 1e9) if self.required_gb > 0 else None)
        except E.SetupError as e:
            return _report_error(self, e)
        if not self.wait:
            self.report({"INFO"}, f"Setting up the backend; log: {log_path()}")
            return {"FINISHED"}
        st = run_blocking(context, self.timeout or None)
        if st.state != "done":
            self.report({"ERROR"}, f"{st.message}" + (f". {st.hint}" if st.hint else ""))
            return {"CANCELLED"}
        self.report({"INFO"}, st.message)
        return {"FINISHED"}


class NA_OT_backend_setup_cancel(bpy.types.Operator):
    """Stop the running setup (what finished installing is kept; the environment is not used until a setup completes)"""

    bl_idname = "neural_atlas.backend_setup_cancel"
    bl_label = "Cancel Setup"

    def execute(self, context: bpy.types.Context) -> set[str]:
        if not cancel():
            self.report({"INFO"}, "No setup is running")
        return {"FINISHED"}


class NA_OT_backend_remove(bpy.types.Operator):
    """Delete the backend's environment (and the setup's downloads); nothing else is touched"""

    bl_idname = "neural_atlas.backend_remove"
    bl_label = "Remove Backend Environment"

    wait: BoolProperty(default=False, options={"SKIP_SAVE"})  # type: ignore[valid-type]

    def invoke(self, context: bpy.types.Context, event: Any) -> set[str]:
        return context.window_manager.invoke_confirm(self, event)  # type: ignore[no-any-return]

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            job = start_removal(context)
        except E.SetupError as e:
            return _report_error(self, e)
        if self.wait and bpy.app.background:
            job.run()
            _after_job(context)
            if job.status.state != "done":
                self.report({"ERROR"}, job.status.message)
                return {"CANCELLED"}
        return {"FINISHED"}


class NA_OT_backend_setup_log(bpy.types.Operator):
    """Open the setup's log file"""

    bl_idname = "neural_atlas.backend_setup_log"
    bl_label = "Open Setup Log"

    def execute(self, context: bpy.types.Context) -> set[str]:
        path = log_path()
        if not os.path.isfile(path):
            self.report({"ERROR"}, f"no setup log yet at {path}")
            return {"CANCELLED"}
        if sys.platform == "win32":
            os.startfile(path)  # type: ignore[attr-defined]
        else:
            subprocess.Popen(["open" if sys.platform == "darwin" else "xdg-open", path])
        return {"FINISHED"}


CLASSES = (NA_OT_backend_setup, NA_OT_backend_setup_cancel, NA_OT_backend_remove, NA_OT_backend_setup_log)


# ------------------------------------------------------------------ drawing
def _wrap(layout: bpy.types.UILayout, text: str, icon: str = "NONE") -> None:
    from . import runtime

    runtime._wrap(layout, text, icon=icon, width=70)


def environment_text() -> tuple[str, str]:
    """(text, icon) saying what the environment holds."""
    st = stamp()
    if E.ready(st):
        v = st.get("verified") or {}
        dev = (v.get("device") or {}).get("type", "?").upper()
        return (f"Ready: PyTorch {v.get('torch')} ({dev}), backend {v.get('backend')}, Python "
                f"{v.get('python')}, {E.gb(v.get('size') or 0)}", "CHECKMARK")
    if st or os.path.isdir(env_dir()):
        return "Incomplete: Set up Backend finishes it", "ERROR"
    return "Not set up", "INFO"


def draw(layout: bpy.types.UILayout, p: Any) -> None:
    """The Preferences box: status, progress, choices, Set up / Repair / Remove, log."""
    box = layout.box()
    box.label(text="Backend environment (in the extension's folder)", icon="CONSOLE")
    job = _S.job
    st = _S.status
    if job is not None and st.active:
        box.progress(factor=st.fraction, type="BAR", text=f"{st.label} ({st.fraction * 100:.0f}%)")
        if st.detail:
            box.label(text=st.detail)
        box.operator("neural_atlas.backend_setup_cancel", icon="CANCEL")
    else:
        text, icon = environment_text()
        box.label(text=text, icon=icon)
        if _S.connecting_until:
            box.label(text="Starting the backend and asking for its device...", icon="SORTTIME")
        elif st.state in ("done", "failed", "cancelled") and st.message:
            _wrap(box, st.message, icon={"done": "CHECKMARK", "failed": "ERROR", "cancelled": "X"}[st.state])
            if st.hint:
                _wrap(box, st.hint, icon="INFO")
    col = box.column()
    col.enabled = not st.active
    info = python_info(base_python(p))
    if isinstance(info, E.SetupError):
        _wrap(col, info.message, icon="ERROR")
        _wrap(col, info.hint, icon="INFO")
    else:
        who = "picked" if p.setup_python else "Blender's own"
        col.label(text=f"Python {info.text} ({who}): {info.path}")
    col.prop(p, "setup_python")
    try:
        choice = torch_choice(p)
        col.label(text=f"PyTorch: {choice.label}: {choice.reason}", icon="MEMORY")
    except E.SetupError as e:
        _wrap(col, e.message, icon="ERROR")
        _wrap(col, e.hint, icon="INFO")
    col.prop(p, "torch_variant")
    col.prop(p, "setup_advanced")
    if p.setup_advanced:
        sub = col.column()
        sub.prop(p, "torch_source")
        if p.torch_source == "custom":
            sub.prop(p, "torch_index")
        sub.prop(p, "torch_requirement")
    row = col.row()
    row.scale_y = 1.4
    row.operator("neural_atlas.backend_setup", text="Set up Backend", icon="IMPORT")
    op = row.operator("neural_atlas.backend_setup", text="Repair", icon="TOOL_SETTINGS")
    op.repair = True
    row.operator("neural_atlas.backend_remove", text="Remove", icon="TRASH")
    row = box.row()
    row.label(text=f"Setup log: {log_path()}")
    row.operator("neural_atlas.backend_setup_log", text="", icon="TEXT")


def draw_hint(layout: bpy.types.UILayout, p: Any) -> None:
    """One line for the VSE Backend panel while nothing is set up."""
    st = _S.status
    if st.active:
        layout.progress(factor=st.fraction, type="BAR", text=f"Setting up: {st.label} ({st.fraction * 100:.0f}%)")
    elif not p.backend_python and not ready_python():
        layout.operator("neural_atlas.backend_setup", text="Set up Backend", icon="IMPORT")
