"""Neural Atlas: the Blender extension package (`neural_atlas`).

Decompose a VSE strip into layered neural atlases on a backend process, paint
on per-layer edit images in Texture Paint, and re-render the edited shot into
the VSE. Metadata lives in blender_manifest.toml.

`neural_atlas.core` is bpy-free and is also installed next to the backend, so
this module must import without bpy: the bpy shell (`.blender`) is imported
only inside register()/unregister().
"""

from __future__ import annotations

_shell = None


def register() -> None:
    global _shell
    from . import blender as shell  # bpy is needed from here on

    shell.register()
    _shell = shell


def unregister() -> None:
    global _shell
    if _shell is None:
        from . import blender as shell
    else:
        shell = _shell
    shell.unregister()
    _shell = None
