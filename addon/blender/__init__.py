"""The bpy shell of the add-on: preferences, properties, operators, panels, the
timer poller and the blocking driver. Imported only from ``register()``."""

from __future__ import annotations

import atexit

import bpy

from . import (frame_paint, lifetime, masks, operators, paint, panels, prefs, preview, props,  # noqa: F401
               runtime, setup_backend)

_CLASSES = (prefs.NA_Preferences, *props.CLASSES, *operators.CLASSES, *panels.CLASSES, *setup_backend.CLASSES)


@bpy.app.handlers.persistent
def _save_edits_pre(*_args: object) -> None:
    """Saving the .blend also saves modified edit images: paint is never lost."""
    from . import images

    try:
        images.save_dirty([i for i in bpy.data.images if i.get(images.KEY_ROLE) == "edit" and i.is_dirty])
    except (RuntimeError, OSError) as e:
        print(f"[neural_atlas] could not save an edit image: {e}")


def _runs_an_engine(scene: object) -> bool:
    """Whether rendering ``scene`` runs a render engine (its 3D scene, or a scene strip in its
    VSE), rather than only the sequencer's image and movie strips."""
    from . import vse

    if not isinstance(scene, bpy.types.Scene):
        return True
    strips = vse.all_strips(scene)
    if not scene.render.use_sequencer or not strips:
        return True
    return any(s.type == "SCENE" and not s.mute for s in strips)


@bpy.app.handlers.persistent
def _save_edits_before_render(scene: object = None, *_args: object) -> None:
    """In background mode a render engine's render (the Cycles preview's, or any) frees the
    pixel buffers of every file-backed image that is not packed, unsaved paint included (seen
    with bpy 5.0.1: ``is_dirty`` drops and the image reloads from disk). Save modified edit
    images first. A sequencer-only render (image strips, the numpy preview) frees nothing: no
    save. The numpy preview's frame is made current first."""
    if bpy.app.background and isinstance(scene, bpy.types.Scene):  # (a UI render runs in its own thread)
        preview.show_frame(scene)
    if bpy.app.background and _runs_an_engine(scene):
        _save_edits_pre()


@bpy.app.handlers.persistent
def _load_post(*_args: object) -> None:
    """A newly opened .blend may hold running jobs: re-attach to them on the next tick."""
    runtime.get().attached = False
    if any(len(props.settings(sc).jobs) for sc in bpy.data.scenes):
        try:
            runtime.session()
        except RuntimeError:
            return
        runtime.ensure_timer()


def register() -> None:
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    props.register()
    if _save_edits_pre not in bpy.app.handlers.save_pre:
        bpy.app.handlers.save_pre.append(_save_edits_pre)
    if _load_post not in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.append(_load_post)
    if _save_edits_before_render not in bpy.app.handlers.render_pre:
        bpy.app.handlers.render_pre.append(_save_edits_before_render)
    if preview.on_depsgraph_update not in bpy.app.handlers.depsgraph_update_post:
        bpy.app.handlers.depsgraph_update_post.append(preview.on_depsgraph_update)
    if preview.on_frame_change not in bpy.app.handlers.frame_change_pre:
        bpy.app.handlers.frame_change_pre.append(preview.on_frame_change)
    atexit.register(runtime.shutdown)
    atexit.register(setup_backend.shutdown)


def unregister() -> None:
    setup_backend.shutdown()  # interrupts a running pip
    runtime.reset()  # stops the timer, closes the socket, stops a local backend
    atexit.unregister(runtime.shutdown)
    atexit.unregister(setup_backend.shutdown)
    for lst, fn in ((bpy.app.handlers.save_pre, _save_edits_pre), (bpy.app.handlers.load_post, _load_post),
                    (bpy.app.handlers.depsgraph_update_post, preview.on_depsgraph_update),
                    (bpy.app.handlers.render_pre, _save_edits_before_render),
                    (bpy.app.handlers.frame_change_pre, preview.on_frame_change)):
        if fn in lst:
            lst.remove(fn)
    props.unregister()
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
