"""Add-on preferences: backend endpoint, local backend launch, workspace, keys, default preset."""

from __future__ import annotations

import os
import tempfile

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from .. import __package__ as base_package
from . import launcher
from .setup_backend import SetupPreferences

PRESET_ITEMS = [
    ("demo", "Demo", "Small model for a quick CPU preview (minutes on a laptop)"),
    ("fast", "Fast", "Tuned for a GPU: minutes per shot, larger hash tables, learning-rate decay"),
    ("seed", "Reference", "The reference implementation's settings (50k iterations)"),
    ("cpu", "CPU", "Real footage on a computer without a GPU: a small model at 256 px, trained for the shot's size"),
    ("quality", "Quality", "GPU, final renders: atlases fitted to each layer, trained for the shot's size; "
                           "bound the time with a budget"),
]
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"


def prefs(context: bpy.types.Context | None = None) -> "NA_Preferences":
    ctx = context or bpy.context
    addon = ctx.preferences.addons.get(base_package)
    if addon is None:
        raise RuntimeError("the Neural Atlas add-on is not enabled")
    return addon.preferences  # type: ignore[return-value]


def user_dir() -> str:
    """The extension's own writable folder (survives upgrades), with fallbacks when the
    add-on is loaded the legacy way (tests) where extension_path_user raises."""
    try:
        return bpy.utils.extension_path_user(base_package, create=True)
    except (ValueError, AttributeError):
        d = bpy.utils.user_resource("DATAFILES", path="neural_atlas", create=True)
        return d or os.path.join(tempfile.gettempdir(), "neural_atlas")


class NA_Preferences(SetupPreferences, bpy.types.AddonPreferences):
    bl_idname = base_package

    endpoint: StringProperty(  # type: ignore[valid-type]
        name="Backend endpoint", default=DEFAULT_ENDPOINT,
        description="ZeroMQ endpoint of the backend, e.g. tcp://127.0.0.1:5557. "
                    "Non-local endpoints need Blender's online access to be allowed")
    start_local: BoolProperty(  # type: ignore[valid-type]
        name="Start a local backend", default=False,
        description="Start the backend as a child process when connecting; it is stopped "
                    "when the add-on is disabled or Blender quits")
    backend_python: StringProperty(  # type: ignore[valid-type]
        name="Backend Python", subtype="FILE_PATH", default=launcher.python_default(),
        description="The Python interpreter of the environment where the backend is installed")
    backend_args: StringProperty(  # type: ignore[valid-type]
        name="Arguments", default="-m backend serve",
        description="Arguments before --endpoint/--workspace/--parent-pid, which the add-on adds")
    workspace: StringProperty(  # type: ignore[valid-type]
        name="Workspace", subtype="DIR_PATH", default="",
        description="Folder for edit images, rasterised masks and a local backend's jobs "
                    "(empty: the extension's user folder)")
    keys_dir: StringProperty(  # type: ignore[valid-type]
        name="Keys folder", subtype="DIR_PATH", default="",
        description="Folder holding the backend's signing key (signing.key); empty: the "
                    "default per-user folder. Copy it from the backend machine for a remote backend")
    default_preset: EnumProperty(  # type: ignore[valid-type]
        name="Default preset", items=PRESET_ITEMS, default="demo")
    use_curve: BoolProperty(  # type: ignore[valid-type]
        name="Encrypt (CURVE) on this machine too", default=False,
        description="Use the CURVE certificates of the keys folder even for a 127.0.0.1 endpoint: an SSH "
                    "tunnel to a GPU server, or a backend started with --curve")
    files_mode: EnumProperty(  # type: ignore[valid-type]
        name="Backend files", default="AUTO",
        items=[("AUTO", "Detect", "Ask the backend whether it reads a probe file written in the workspace; "
                "upload and download when it does not"),
               ("REMOTE", "Remote", "The backend is on another machine: upload what a job needs, download "
                "what the add-on shows"),
               ("SHARED", "Shared", "The backend reads this machine's files at the same paths")],
        description="Whether the backend sees this machine's files (a remote GPU server does not)")

    def workspace_path(self) -> str:
        ws = bpy.path.abspath(self.workspace) if self.workspace else os.path.join(user_dir(), "workspace")
        os.makedirs(ws, exist_ok=True)
        return os.path.abspath(ws)

    def log_path(self) -> str:
        return os.path.join(user_dir(), "logs", "backend.log")

    def draw(self, context: bpy.types.Context) -> None:
        from . import runtime

        from . import setup_backend

        layout = self.layout
        setup_backend.draw(layout, self)  # Set up backend: the artist's first step
        col = layout.column()
        col.prop(self, "endpoint")
        col.prop(self, "keys_dir")
        col.prop(self, "workspace")
        col.prop(self, "files_mode")
        col.prop(self, "use_curve")
        col.prop(self, "default_preset")
        box = layout.box()
        box.prop(self, "start_local")
        sub = box.column()
        sub.active = self.start_local
        sub.prop(self, "backend_python")
        sub.prop(self, "backend_args")
        row = sub.row()
        row.operator("neural_atlas.backend_start", icon="PLAY")
        row.operator("neural_atlas.backend_stop", icon="X")
        sub.label(text=f"Log: {self.log_path()}")
        rt = runtime.get()
        box = layout.box()
        runtime.draw_connection(box, rt)
