"""Operators. They never block the UI: submissions return at once and the timer
poller applies results. ``wait=True`` (batch scripts, tests) drives the job to the
end with the blocking loop instead, only allowed in background mode."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import bpy
from bpy.props import BoolProperty, FloatProperty, IntProperty, StringProperty

from ..core import jobs as J
from ..core import strips as S
from ..core import lifetime as L
from . import actions, frame_paint, images, launcher, paint, preview, runtime, vse
from .props import NA_JobItem, find_job, settings


def _job(context: bpy.types.Context, job_id: str) -> Optional[NA_JobItem]:
    scene = vse.sequencer_scene(context)
    if job_id:
        return find_job(scene, job_id)
    st = settings(scene)
    if 0 <= st.active_job < len(st.jobs):
        return st.jobs[st.active_job]  # type: ignore[no-any-return]
    return None


def _fail(op: bpy.types.Operator, message: str, hint: str = "") -> set[str]:
    op.report({"ERROR"}, message + (f". {hint}" if hint else ""))
    rt = runtime.get()
    rt.last_error, rt.last_hint = message, hint
    return {"CANCELLED"}


def _wait(op: bpy.types.Operator, job: NA_JobItem, timeout: float) -> set[str]:
    if not bpy.app.background:
        return _fail(op, "waiting blocks the interface; it is only for background mode")
    try:
        if not job.job_id:
            job.job_id = runtime.wait_submitted(job.token, timeout=60.0)
        runtime.wait(job.job_id, timeout=timeout or None)
    except J.SessionError as e:
        return _fail(op, e.message, e.hint)
    if job.state != "done" or job.error:
        return _fail(op, f"{job.label}: {job.state}: {job.error}", job.hint)
    return {"FINISHED"}


class NA_OT_connect(bpy.types.Operator):
    """Connect to the backend (starting the local one when enabled) and show its device"""

    bl_idname = "neural_atlas.connect"
    bl_label = "Connect to Backend"

    wait: BoolProperty(default=False, options={"SKIP_SAVE"})  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        rt = runtime.get()
        rt.last_error = rt.last_hint = ""
        try:
            s = runtime.connect(context, force=True)
        except (J.SessionError, launcher.LaunchError) as e:
            return _fail(self, getattr(e, "message", str(e)), getattr(e, "hint", ""))
        if self.wait:  # background only: block until hello answered (and the device probed)
            import time

            end = time.monotonic() + 15.0
            while time.monotonic() < end:
                req = s._hello_req
                for e in s.client.poll(0.1):
                    s._on_event(e)
                for ch in s.pump(0):
                    actions.apply(ch)
                if req is not None and req.done:
                    dev = s.conn.server.get("device") or {}
                    if s.conn.state != "connected" or dev.get("name") != "probing":
                        break
                    s.connect(force=True)
            if s.conn.state != "connected":
                return _fail(self, s.conn.message, s.conn.hint)
        return {"FINISHED"}


class NA_OT_backend_start(bpy.types.Operator):
    """Start the local backend with the interpreter and arguments from the preferences"""

    bl_idname = "neural_atlas.backend_start"
    bl_label = "Start Backend"

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            b = runtime.start_backend(context)
        except launcher.LaunchError as e:
            return _fail(self, str(e))
        runtime.session(context).connect()
        self.report({"INFO"}, f"Backend started (pid {b.pid}); log: {b.log_path}")
        return {"FINISHED"}


class NA_OT_backend_stop(bpy.types.Operator):
    """Stop the local backend started by this Blender (its jobs resume on the next start)"""

    bl_idname = "neural_atlas.backend_stop"
    bl_label = "Stop Backend"

    def execute(self, context: bpy.types.Context) -> set[str]:
        code = runtime.stop_backend()
        self.report({"INFO"}, "No local backend running" if code is None else f"Backend stopped ({code})")
        return {"FINISHED"}


class _SubmitOptions:
    """What Decompose and Decompose Selected Strips take (empty: the panel's settings)."""

    preset: StringProperty(name="Preset", options={"SKIP_SAVE"})  # type: ignore[valid-type]
    overrides: StringProperty(name="Overrides", options={"SKIP_SAVE"})  # type: ignore[valid-type]
    wait: BoolProperty(default=False, options={"SKIP_SAVE"})  # type: ignore[valid-type]
    timeout: FloatProperty(default=0.0, options={"SKIP_SAVE"})  # type: ignore[valid-type]

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return vse.sequencer_scene(context).sequence_editor is not None


class NA_OT_decompose(_SubmitOptions, bpy.types.Operator):
    """Decompose the active movie or image strip into layered atlases on the backend"""

    bl_idname = "neural_atlas.decompose"
    bl_label = "Decompose"

    strip: StringProperty(name="Strip", description="Strip name (default: the active strip)",  # type: ignore[valid-type]
                          options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = vse.sequencer_scene(context)
        strip = vse.find_strip(scene, self.strip) if self.strip else vse.active_strip(scene)
        if strip is None:
            return _fail(self, "No movie or image strip selected",
                         "Click a movie or image-sequence strip in the sequencer")
        try:
            ov = actions.parse_overrides(self.overrides or settings(scene).overrides)
            job = actions.decompose(scene, strip, preset=self.preset or None, overrides=ov)
        except actions.ActionError as e:
            return _fail(self, e.message, e.hint)
        except S.StripError as e:
            return _fail(self, str(e))
        except (J.SessionError, launcher.LaunchError) as e:
            return _fail(self, getattr(e, "message", str(e)), getattr(e, "hint", ""))
        if self.wait:
            return _wait(self, job, self.timeout)
        self.report({"INFO"}, f"Decomposing {strip.name}")
        return {"FINISHED"}


class NA_OT_decompose_selected(_SubmitOptions, bpy.types.Operator):
    """Decompose every selected movie or image strip: one backend job each, all queued at once
    (the backend runs as many together as its executor allows); the Jobs panel shows them all"""

    bl_idname = "neural_atlas.decompose_selected"
    bl_label = "Decompose Selected Strips"

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = vse.sequencer_scene(context)
        strips = [s for s in vse.all_strips(scene) if s.select and s.type in ("MOVIE", "IMAGE")]
        if not strips:
            return _fail(self, "No movie or image strips selected",
                         "Select the strips to decompose in the sequencer (Shift-click or box select)")
        st = settings(scene)
        # the panel's masks belong to one shot; with several strips each uses its own clip's masks/
        beside = len(strips) > 1 and st.mask_mode != "NONE"
        try:
            ov = actions.parse_overrides(self.overrides or st.overrides)
        except actions.ActionError as e:
            return _fail(self, e.message, e.hint)
        jobs, failed = [], []
        for strip in sorted(strips, key=lambda s: (s.channel, s.frame_final_start)):
            try:
                jobs.append(actions.decompose(scene, strip, preset=self.preset or None, overrides=ov,
                                              masks_beside_clip=beside))
            except (actions.ActionError, S.StripError) as e:  # this strip only: the others go on
                failed.append(f"{strip.name}: {getattr(e, 'message', str(e))}")
            except (J.SessionError, launcher.LaunchError) as e:
                return _fail(self, getattr(e, "message", str(e)), getattr(e, "hint", ""))
        if failed:  # kept in the panel's error line too: a report vanishes quickly
            rt = runtime.get()
            rt.last_error, rt.last_hint = f"Not submitted: {'; '.join(failed)}", "the other strips were submitted"
            self.report({"WARNING"}, rt.last_error)
        if not jobs:
            return _fail(self, "No strip could be submitted", "; ".join(failed))
        if self.wait:
            for job in jobs:
                if _wait(self, job, self.timeout) != {"FINISHED"}:
                    return {"CANCELLED"}
            return {"FINISHED"}
        note = " (masks: each clip's own masks/ folder)" if beside else ""
        self.report({"INFO"}, f"Decomposing {len(jobs)} strip(s){note}")
        return {"FINISHED"}


class NA_OT_wait(bpy.types.Operator):
    """Block until a job finishes (background mode only: batch scripts)"""

    bl_idname = "neural_atlas.wait"
    bl_label = "Wait for Job"

    job_id: StringProperty(options={"SKIP_SAVE"})  # type: ignore[valid-type]
    timeout: FloatProperty(default=0.0, options={"SKIP_SAVE"})  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        job = _job(context, self.job_id)
        if job is None:
            return _fail(self, "no such job")
        return _wait(self, job, self.timeout)


class NA_OT_cancel(bpy.types.Operator):
    """Cancel the job on the backend (stops the GPU work; a checkpoint is kept)"""

    bl_idname = "neural_atlas.cancel"
    bl_label = "Cancel"

    job_id: StringProperty()  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        job = _job(context, self.job_id)
        if job is None or not job.job_id:
            return _fail(self, "the job has no id yet; try again in a moment")
        try:
            runtime.session(context).cancel(job.job_id)
        except J.SessionError as e:
            return _fail(self, e.message, e.hint)
        job.state = "cancelling"
        runtime.ensure_timer()
        return {"FINISHED"}


class NA_OT_remove_job(bpy.types.Operator):
    """Remove the job from this list (and its files on the backend when asked)"""

    bl_idname = "neural_atlas.remove_job"
    bl_label = "Remove Job"

    job_id: StringProperty()  # type: ignore[valid-type]
    delete_on_backend: BoolProperty(name="Delete its files on the backend", default=False)  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = vse.sequencer_scene(context)
        st = settings(scene)
        for i, j in enumerate(st.jobs):
            if j.job_id == self.job_id or (not self.job_id and i == st.active_job):
                if self.delete_on_backend and j.job_id:
                    try:
                        runtime.session(context).delete(j.job_id)
                    except J.SessionError as e:
                        self.report({"WARNING"}, e.message)
                st.jobs.remove(i)
                st.active_job = min(st.active_job, len(st.jobs) - 1)
                return {"FINISHED"}
        return {"CANCELLED"}


class NA_OT_load_atlases(bpy.types.Operator):
    """(Re)load the atlases of a finished decomposition and create its edit images"""

    bl_idname = "neural_atlas.load_atlases"
    bl_label = "Load Atlases"

    job_id: StringProperty()  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        job = _job(context, self.job_id)
        if job is None or job.state != "done":
            return _fail(self, "the decomposition is not finished")
        try:
            if job.out_dir and os.path.isdir(job.out_dir):
                actions.load_results(vse.sequencer_scene(context), job, {"out_dir": job.out_dir})
            elif job.remote:  # a backend on another machine: download (again; what arrived is kept)
                runtime.connect(context)
                actions.download_results(job)
            else:
                job.atlases_loaded = False
                runtime.session(context).attach([job.job_id])
                runtime.ensure_timer()
        except (actions.ActionError, J.SessionError) as e:
            return _fail(self, e.message, e.hint)
        return {"FINISHED"}


class NA_OT_paint_setup(bpy.types.Operator):
    """Paint on this layer: the Image Editor in Paint mode on the edit image, the atlas under it"""

    bl_idname = "neural_atlas.paint_setup"
    bl_label = "Paint Layer"

    job_id: StringProperty()  # type: ignore[valid-type]
    layer: IntProperty(default=0, min=0)  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        job = _job(context, self.job_id)
        if job is None or not job.atlases_loaded:
            return _fail(self, "load the atlases of a finished decomposition first")
        atl = images.job_images(job.shot, "atlas")
        eds = images.job_images(job.shot, "edit")
        if self.layer >= min(len(atl), len(eds)):
            return _fail(self, f"layer {self.layer} does not exist (the job has {len(eds)} layers)")
        done = paint.setup(context, vse.sequencer_scene(context), job.label, atl, eds, self.layer)
        if not done["image_editor"] and not bpy.app.background:
            self.report({"INFO"}, "Open an Image Editor (or the Texture Paint workspace) to paint "
                                  f"'{eds[self.layer].name}'")
        return {"FINISHED"}


class NA_OT_save_edits(bpy.types.Operator):
    """Save every modified edit image to its file"""

    bl_idname = "neural_atlas.save_edits"
    bl_label = "Save Edits"

    def execute(self, context: bpy.types.Context) -> set[str]:
        eds = [i for i in bpy.data.images if i.get(images.KEY_ROLE) == "edit"]
        saved = images.save_dirty(eds)
        self.report({"INFO"}, f"Saved {len(saved)} edit image(s)")
        return {"FINISHED"}


class NA_OT_render_edit(bpy.types.Operator):
    """Save the edit images, re-render the shot with them and place it in the VSE above the source"""

    bl_idname = "neural_atlas.render_edit"
    bl_label = "Render Edit"

    job_id: StringProperty()  # type: ignore[valid-type]
    movie: BoolProperty(name="Also write a movie", default=False)  # type: ignore[valid-type]
    wait: BoolProperty(default=False, options={"SKIP_SAVE"})  # type: ignore[valid-type]
    timeout: FloatProperty(default=0.0, options={"SKIP_SAVE"})  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        job = _job(context, self.job_id)
        if job is not None and job.kind == "render":
            _sc, parent = (None, find_job(vse.sequencer_scene(context), job.parent))
            job = parent
        if job is None:
            return _fail(self, "no decomposition selected")
        try:
            r = actions.render_edit(vse.sequencer_scene(context), job,
                                    formats=("png", "mp4") if self.movie else ("png",))
        except actions.ActionError as e:
            return _fail(self, e.message, e.hint)
        except J.SessionError as e:
            return _fail(self, e.message, e.hint)
        if self.wait:
            return _wait(self, r, self.timeout)
        return {"FINISHED"}


def _decomposition(context: bpy.types.Context, job_id: str) -> Optional[NA_JobItem]:
    """The decomposition a button acts on (a render job's parent stands for it)."""
    job = _job(context, job_id)
    if job is not None and job.kind == "render":
        job = find_job(vse.sequencer_scene(context), job.parent)
    return job


class NA_OT_preview(bpy.types.Operator):
    """Live preview of the edited shot in the VSE, computed by Blender from the maps (no backend):
    a scene strip above the source that shows paint as you make it. Off removes it completely"""

    bl_idname = "neural_atlas.preview"
    bl_label = "Live Preview"

    job_id: StringProperty()  # type: ignore[valid-type]
    action: StringProperty(default="TOGGLE", options={"SKIP_SAVE"})  # type: ignore[valid-type]  # ON OFF TOGGLE REFRESH

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = vse.sequencer_scene(context)
        job = _decomposition(context, self.job_id)
        if job is None or not job.atlases_loaded:
            return _fail(self, "load the atlases of a finished decomposition first")
        on = preview.is_on(scene, job)
        try:
            if self.action == "REFRESH":
                if on:
                    preview.refresh_opacity(scene, job)
            elif self.action == "OFF" or (self.action == "TOGGLE" and on):
                preview.disable(scene, job)
            else:
                strip = preview.enable(scene, job)
                self.report({"INFO"}, f"Preview of {job.label} on channel {strip.channel}")
        except preview.PreviewError as e:
            return _fail(self, e.message, e.hint)
        except L.LifetimeError as e:
            return _fail(self, str(e), "Fix the edit's frame range or fades")
        return {"FINISHED"}


class NA_OT_frame_paint(bpy.types.Operator):
    """Paint on the current frame as seen: Texture Paint on a mesh of this frame whose UVs are the
    atlas coordinates, so every stroke lands in the layer's edit image (and shows on all frames)"""

    bl_idname = "neural_atlas.frame_paint"
    bl_label = "Paint on Frame"

    job_id: StringProperty()  # type: ignore[valid-type]
    frame: IntProperty(default=-1, options={"SKIP_SAVE"},  # type: ignore[valid-type]
                       description="Timeline frame to paint on (-1: the current frame)")
    layer: IntProperty(default=-2, min=-2, options={"SKIP_SAVE"},  # type: ignore[valid-type]
                       description="Layer to paint into (-1: the owner of each pixel; -2: the shot's setting)")
    step: IntProperty(name="Mesh step", default=1, min=1, max=16,  # type: ignore[valid-type]
                      description="One mesh vertex every this many pixels (1: every pixel)")

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = vse.sequencer_scene(context)
        job = _decomposition(context, self.job_id)
        if job is None or not job.atlases_loaded:
            return _fail(self, "load the atlases of a finished decomposition first")
        frame = scene.frame_current if self.frame < 0 else self.frame
        layer = self.layer
        if layer == -2:
            rec = settings(scene).shots.get(job.shot)
            layer = int(rec.paint_layer) if rec is not None else -1
        active = context.active_object
        if active is not None and active.get(frame_paint.KEY) and active.mode != "OBJECT" \
                and not bpy.app.background:
            bpy.ops.object.mode_set(mode="OBJECT")  # the old frame's mesh is about to go
        try:
            ob = frame_paint.setup(scene, job, frame, layer, self.step, link_to=context.scene or scene)
        except frame_paint.FramePaintError as e:
            return _fail(self, e.message, e.hint)
        except preview.PreviewError as e:
            return _fail(self, e.message, e.hint)
        frame_paint.enter_paint_mode(context, context.scene or scene, ob)
        rec = settings(scene).shots.get(job.shot)
        if rec is not None:
            rec.paint_frame = frame
        self.report({"INFO"}, f"Painting on frame {frame} of {job.label}: strokes go into the edit images")
        return {"FINISHED"}


class NA_OT_frame_paint_end(bpy.types.Operator):
    """Stop painting on the frame: save the edit images and remove the frame's painting mesh"""

    bl_idname = "neural_atlas.frame_paint_end"
    bl_label = "Done Painting"

    job_id: StringProperty()  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        job = _decomposition(context, self.job_id)
        if job is None:
            return _fail(self, "no decomposition selected")
        ob = context.active_object
        if ob is not None and ob.get(frame_paint.KEY) == job.shot and ob.mode != "OBJECT" \
                and not bpy.app.background:
            bpy.ops.object.mode_set(mode="OBJECT")
        images.save_dirty([i for i in images.job_images(job.shot, "edit") if i.is_dirty])
        frame_paint.remove(job.shot)
        return {"FINISHED"}


class NA_OT_paint_image_new(bpy.types.Operator):
    """A transparent image of the shot's working size for painting over the current frame in the
    Image Editor (the frame is its clone/stencil reference); then Project Paint from Image"""

    bl_idname = "neural_atlas.paint_image_new"
    bl_label = "New Paint Image for Frame"

    job_id: StringProperty()  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = vse.sequencer_scene(context)
        job = _decomposition(context, self.job_id)
        if job is None or not job.atlases_loaded:
            return _fail(self, "load the atlases of a finished decomposition first")
        try:
            plate = preview.plate_of(job.out_dir)
            maps = preview.read_maps(job.out_dir)
        except preview.PreviewError as e:
            return _fail(self, e.message, e.hint)
        frame = scene.frame_current
        img = bpy.data.images.new(f"NA {job.label} paint frame {frame}", maps.width, maps.height, alpha=True)
        images._pixels(img).foreach_set([0.0] * (maps.width * maps.height * 4))
        img.update()
        img["neural_atlas_paint_frame"] = frame
        ref = None
        if not plate.movie:
            ref = frame_paint.plate_image(job, job.shot, frame - frame_paint.first_frame(job))
        ip = scene.tool_settings.image_paint
        if ref is not None:
            ip.clone_image = ref
        for _win, area in vse.iter_areas("IMAGE_EDITOR"):
            sp = area.spaces.active
            if isinstance(sp, bpy.types.SpaceImageEditor):
                sp.image = img
                sp.ui_mode = "PAINT"
                break
        self.report({"INFO"}, f"Paint on '{img.name}' (transparent = no paint), then Project Paint from Image")
        return {"FINISHED"}


class NA_OT_project_paint(bpy.types.Operator):
    """Send an RGBA image painted over a frame to the backend: each stroke lands in the edit image
    of the layer that owns the pixel (or the chosen layer), colour divided by the plate's lighting"""

    bl_idname = "neural_atlas.project_paint"
    bl_label = "Project Paint from Image"

    job_id: StringProperty()  # type: ignore[valid-type]
    image: StringProperty(name="Image", options={"SKIP_SAVE"})  # type: ignore[valid-type]
    frame: IntProperty(default=-1, options={"SKIP_SAVE"})  # type: ignore[valid-type]
    layer: IntProperty(default=-2, min=-2, options={"SKIP_SAVE"})  # type: ignore[valid-type]
    wait: BoolProperty(default=False, options={"SKIP_SAVE"})  # type: ignore[valid-type]
    timeout: FloatProperty(default=0.0, options={"SKIP_SAVE"})  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = vse.sequencer_scene(context)
        job = _decomposition(context, self.job_id)
        if job is None:
            return _fail(self, "no decomposition selected")
        img = bpy.data.images.get(self.image) if self.image else getattr(context.space_data, "image", None)
        if img is None:  # from the VSE: the newest paint image made for this shot's frames
            made = [i for i in bpy.data.images if i.get("neural_atlas_paint_frame") is not None
                    and i.name.startswith(f"NA {job.label} paint frame")]
            img = made[-1] if made else None
        if img is None:
            return _fail(self, "no paint image", "Open the painted image in the Image Editor or name it")
        frame = self.frame
        if frame < 0:
            frame = int(img.get("neural_atlas_paint_frame", scene.frame_current))
        layer = self.layer
        if layer == -2:
            rec = settings(scene).shots.get(job.shot)
            layer = int(rec.paint_layer) if rec is not None else -1
        try:
            r = actions.project_paint(scene, job, img, frame, layer)
        except actions.ActionError as e:
            return _fail(self, e.message, e.hint)
        except J.SessionError as e:
            return _fail(self, e.message, e.hint)
        if self.wait:
            return _wait(self, r, self.timeout)
        return {"FINISHED"}


class NA_OT_transfer_cancel(bpy.types.Operator):
    """Stop an upload or download to a backend on another machine (what arrived is kept: it resumes)"""

    bl_idname = "neural_atlas.transfer_cancel"
    bl_label = "Cancel Transfer"

    key: StringProperty()  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        from . import transfers

        if not transfers.cancel(self.key):
            return _fail(self, "no such transfer")
        return {"FINISHED"}


class NA_OT_open_log(bpy.types.Operator):
    """Open the backend's log file"""

    bl_idname = "neural_atlas.open_log"
    bl_label = "Open Backend Log"

    def execute(self, context: bpy.types.Context) -> set[str]:
        from .prefs import prefs

        path = prefs(context).log_path()
        if not os.path.isfile(path):
            return _fail(self, f"no log yet at {path}")
        if sys.platform == "win32":
            os.startfile(path)  # type: ignore[attr-defined]
        else:
            subprocess.Popen(["open" if sys.platform == "darwin" else "xdg-open", path])
        return {"FINISHED"}


class NA_OT_mask_add(bpy.types.Operator):
    """Add a Mask datablock slot (one per object, in layer order)"""

    bl_idname = "neural_atlas.mask_add"
    bl_label = "Add Mask"

    def execute(self, context: bpy.types.Context) -> set[str]:
        st = settings(vse.sequencer_scene(context))
        item = st.masks.add()
        if bpy.data.masks and len(st.masks) <= len(bpy.data.masks):
            item.mask = bpy.data.masks[len(st.masks) - 1]
        return {"FINISHED"}


class NA_OT_mask_remove(bpy.types.Operator):
    """Remove the last Mask slot"""

    bl_idname = "neural_atlas.mask_remove"
    bl_label = "Remove Mask"

    def execute(self, context: bpy.types.Context) -> set[str]:
        st = settings(vse.sequencer_scene(context))
        if len(st.masks):
            st.masks.remove(len(st.masks) - 1)
        return {"FINISHED"}


CLASSES = (NA_OT_connect, NA_OT_backend_start, NA_OT_backend_stop, NA_OT_decompose, NA_OT_decompose_selected,
           NA_OT_wait,
           NA_OT_cancel, NA_OT_remove_job, NA_OT_load_atlases, NA_OT_paint_setup, NA_OT_save_edits,
           NA_OT_render_edit, NA_OT_transfer_cancel, NA_OT_open_log, NA_OT_mask_add, NA_OT_mask_remove, NA_OT_preview,
           NA_OT_frame_paint, NA_OT_frame_paint_end, NA_OT_paint_image_new, NA_OT_project_paint)
