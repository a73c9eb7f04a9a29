"""Sidebar panels: the VSE "Atlas" tab and the Image Editor "Atlas" tab."""

from __future__ import annotations

import os

import bpy

from ..core import jobs as J
from ..core import strips as S
from . import frame_paint, images, preview, runtime, vse
from .props import NA_JobItem, settings

STATE_ICONS = {"queued": "SORTTIME", "submitting": "SORTTIME", "uploading": "EXPORT", "running": "PLAY", "cancelling": "CANCEL",
               "done": "CHECKMARK", "failed": "ERROR", "cancelled": "X", "lost": "QUESTION"}


def _scene(context: bpy.types.Context) -> bpy.types.Scene:
    return vse.sequencer_scene(context)


class _AtlasPanel:
    bl_region_type = "UI"
    bl_category = "Atlas"


class NA_PT_backend(_AtlasPanel, bpy.types.Panel):
    bl_space_type = "SEQUENCE_EDITOR"
    bl_label = "Backend"
    bl_idname = "NA_PT_backend"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        runtime.draw_connection(layout, runtime.get())
        from . import setup_backend
        from .prefs import prefs

        setup_backend.draw_hint(layout, prefs(context))
        row = layout.row(align=True)
        row.operator("neural_atlas.backend_start", text="Start", icon="PLAY")
        row.operator("neural_atlas.backend_stop", text="Stop", icon="X")
        row.operator("neural_atlas.open_log", text="Log", icon="TEXT")


class NA_PT_decompose(_AtlasPanel, bpy.types.Panel):
    bl_space_type = "SEQUENCE_EDITOR"
    bl_label = "Decompose"
    bl_idname = "NA_PT_decompose"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        scene = _scene(context)
        st = settings(scene)
        strip = vse.active_strip(scene)
        box = layout.box()
        ok = False
        if strip is None:
            box.label(text="Select a movie or image strip", icon="INFO")
        else:
            try:
                info = vse.strip_info(strip)
                a, b = S.source_range(info, (scene.frame_start, scene.frame_end) if st.use_scene_range
                                      else None, st.max_frames or None)
                box.label(text=strip.name, icon="FILE_MOVIE" if info.kind == "MOVIE" else "IMAGE_DATA")
                box.label(text=f"Frames {info.source_to_timeline(a)}-{info.source_to_timeline(b) - 1} "
                               f"({b - a} frames, source {a}-{b - 1})")
                if not os.path.exists(info.source):
                    box.label(text="Source file is missing: relink it", icon="ERROR")
                else:
                    ok = True
            except S.StripError as e:
                box.label(text=str(e)[:80], icon="ERROR")
        col = layout.column()
        col.prop(st, "mask_mode")
        if st.mask_mode == "FOLDER":
            col.prop(st, "mask_folder", text="")
            if st.mask_folder:
                try:
                    n = len(S.mask_folders(bpy.path.abspath(st.mask_folder)))
                    col.label(text=f"{n} object(s) + background = {n + 1} layers")
                except S.StripError as e:
                    col.label(text=str(e)[:80], icon="ERROR")
        elif st.mask_mode == "MASK":
            for i, item in enumerate(st.masks):
                col.prop(item, "mask", text=f"Object {i}")
            row = col.row(align=True)
            row.operator("neural_atlas.mask_add", text="", icon="ADD")
            row.operator("neural_atlas.mask_remove", text="", icon="REMOVE")
            col.label(text=f"{len(st.masks)} object(s) + background = {len(st.masks) + 1} layers")
        else:
            col.label(text="No masks: background layer only (add masks for objects)", icon="INFO")
        col.prop(st, "preset")
        row = col.row()
        row.prop(st, "use_scene_range")
        row.prop(st, "max_frames")
        col.prop(st, "overrides")
        row = layout.row()
        row.scale_y = 1.4
        row.enabled = ok
        row.operator("neural_atlas.decompose", icon="RENDER_RESULT")
        n_selected = sum(1 for s in vse.all_strips(scene) if s.select and s.type in ("MOVIE", "IMAGE"))
        if n_selected > 1:
            layout.operator("neural_atlas.decompose_selected", icon="SEQ_STRIP_DUPLICATE",
                            text=f"Decompose {n_selected} Selected Strips")


def draw_job(layout: bpy.types.UILayout, job: NA_JobItem, active: bool) -> None:
    box = layout.box()
    head = box.row()
    head.label(text=f"{job.label or job.strip_name}  [{job.kind}]", icon=STATE_ICONS.get(job.state, "DOT"))
    op = head.operator("neural_atlas.remove_job", text="", icon="TRASH", emboss=False)
    op.job_id = job.job_id
    info = {k: getattr(job, k) for k in ("state", "phase", "iteration", "iterations", "psnr")}
    info["eta_s"] = job.eta_s if job.eta_s >= 0 else None
    from . import transfers

    moving = transfers.TASKS.get(job.token) or (transfers.TASKS.get(job.job_id) if job.job_id else None)
    if moving is not None:  # uploading its inputs / downloading its results (remote backend)
        row = box.row(align=True)
        row.progress(factor=moving.progress.fraction, type="BAR", text=moving.progress.text())
        row.operator("neural_atlas.transfer_cancel", text="", icon="X").key = moving.key
    elif job.state in J.ACTIVE_STATES or job.state == "submitting":
        box.progress(factor=float(job.fraction), type="BAR", text=J.progress_text(info) or job.state)
        op = box.operator("neural_atlas.cancel", icon="CANCEL")
        op.job_id = job.job_id
    else:
        text = J.STATE_LABELS.get(job.state, job.state)
        if job.psnr > 0 and job.kind == "decompose":
            text += f", {job.psnr:.1f} dB"
        box.label(text=text)
    if job.error:
        runtime._wrap(box, job.error, icon="ERROR")
        if job.hint:
            runtime._wrap(box, job.hint, icon="INFO")
    if job.kind == "decompose" and job.state == "done":
        if not job.atlases_loaded:
            op = box.operator("neural_atlas.load_atlases", icon="IMPORT")
            op.job_id = job.job_id
        else:
            row = box.row(align=True)
            for i in range(job.n_layers):
                op = row.operator("neural_atlas.paint_setup", text=f"Paint {i}", icon="BRUSH_DATA")
                op.job_id, op.layer = job.job_id, i
            draw_shot_edits(box, job)
            dirty = sum(1 for i in images.job_images(job.shot, "edit") if i.is_dirty)
            r = box.row()
            r.scale_y = 1.3
            op = r.operator("neural_atlas.render_edit", icon="SEQUENCE")
            op.job_id = job.job_id
            if dirty:
                box.label(text=f"{dirty} edit image(s) unsaved: Render Edit saves them", icon="FILE_TICK")
    if job.kind == "render" and job.placed:
        box.label(text=f"In the VSE as '{job.render_strip}'", icon="SEQ_STRIP_DUPLICATE")


def draw_shot_edits(layout: bpy.types.UILayout, job: NA_JobItem) -> None:
    """Live preview on/off, painting on a frame, and each layer's edit lifetime."""
    scene = vse.sequencer_scene(bpy.context)
    on = preview.is_on(scene, job)
    row = layout.row(align=True)
    op = row.operator("neural_atlas.preview", text="Live Preview", icon="HIDE_OFF" if on else "HIDE_ON", depress=on)
    op.job_id, op.action = job.job_id, "TOGGLE"
    if on:
        op = row.operator("neural_atlas.preview", text="", icon="FILE_REFRESH")
        op.job_id, op.action = job.job_id, "REFRESH"
    rec = settings(scene).shots.get(job.shot)
    row = layout.row(align=True)
    op = row.operator("neural_atlas.frame_paint", text=f"Paint on Frame {scene.frame_current}", icon="TPAINT_HLT")
    op.job_id = job.job_id
    if any(o.get(frame_paint.KEY) == job.shot for o in bpy.data.objects):
        op = row.operator("neural_atlas.frame_paint_end", text="", icon="CHECKMARK")
        op.job_id = job.job_id
    row = layout.row(align=True)
    op = row.operator("neural_atlas.paint_image_new", text="New Paint Image", icon="IMAGE_DATA")
    op.job_id = job.job_id
    op = row.operator("neural_atlas.project_paint", text="Project", icon="EXPORT")
    op.job_id = job.job_id
    if rec is None:
        return
    layout.prop(rec, "paint_layer")
    col = layout.column(align=True)
    col.label(text="Edit lifetime (timeline frames)", icon="TIME")
    for item in rec.layers:
        sub = col.box()
        r = sub.row(align=True)
        r.prop(item, "opacity", text=f"Layer {item.name}")
        r.prop(item, "use_range", text="", icon="PREVIEW_RANGE")
        if item.use_range:
            r = sub.row(align=True)
            r.prop(item, "frame_start")
            r.prop(item, "frame_end")
        r = sub.row(align=True)
        r.prop(item, "fade_in")
        r.prop(item, "fade_out")


class NA_PT_jobs(_AtlasPanel, bpy.types.Panel):
    bl_space_type = "SEQUENCE_EDITOR"
    bl_label = "Jobs"
    bl_idname = "NA_PT_jobs"

    def draw(self, context: bpy.types.Context) -> None:
        st = settings(_scene(context))
        if not len(st.jobs):
            self.layout.label(text="No jobs yet")
        for i in reversed(range(len(st.jobs))):
            draw_job(self.layout, st.jobs[i], i == st.active_job)


class NA_PT_image(_AtlasPanel, bpy.types.Panel):
    bl_space_type = "IMAGE_EDITOR"
    bl_label = "Neural Atlas"
    bl_idname = "NA_PT_image"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        runtime.draw_connection(layout, runtime.get())
        sp = context.space_data
        img = getattr(sp, "image", None)
        if img is not None and img.get(images.KEY_ROLE):
            role = img.get(images.KEY_ROLE)
            layout.label(text=f"{'Edit' if role == 'edit' else 'Atlas (read-only)'} of layer "
                              f"{img.get(images.KEY_LAYER)}", icon="BRUSH_DATA" if role == "edit" else "LOCKED")
            if role == "atlas":
                layout.label(text="Paint on the edit image, not the atlas", icon="INFO")
        layout.operator("neural_atlas.save_edits", icon="FILE_TICK")
        st = settings(_scene(context))
        for i in reversed(range(len(st.jobs))):
            j = st.jobs[i]
            if j.kind == "decompose" or j.state in J.ACTIVE_STATES:
                draw_job(layout, j, i == st.active_job)


CLASSES = (NA_PT_backend, NA_PT_decompose, NA_PT_jobs, NA_PT_image)
