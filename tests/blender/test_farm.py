"""Decompose Selected Strips: every selected strip becomes its own backend job, all queued
at once, and the Jobs panel's list holds them all. A real backend (``serve
--concurrency 2``: both run together) on two tiny synthetic clips; a third strip whose
file is gone is reported and the other two go on."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import TMP, tick_until, tiny_overrides, use_local_backend


def test_decompose_selected_strips_submits_each_and_lists_them(fresh, na, clip):
    import bpy

    # a second shot (a copy of the synthetic clip) and a strip whose frames were moved away
    other = os.path.join(TMP, "clip_b")
    if not os.path.isdir(other):
        shutil.copytree(clip, other)
    gone = os.path.join(TMP, "clip_gone")
    if not os.path.isdir(gone):
        shutil.copytree(os.path.join(clip, "video_frames"), os.path.join(gone, "video_frames"))
    p = use_local_backend(na, os.path.join(TMP, "ws_farm"))
    p.backend_args += " --concurrency 2"
    scene = bpy.context.scene
    vse, props = na.blender.vse, na.blender.props
    strips = [vse.add_source_strip(scene, os.path.join(c, "video_frames"), channel=ch, frame_start=1,
                                   name=f"shot{ch}") for ch, c in ((1, clip), (2, other), (3, gone))]
    vse.fit_scene_to_strip(scene, strips[0], (64, 36))
    shutil.rmtree(gone)
    st = props.settings(scene)
    st.mask_mode = "FOLDER"  # several strips: each takes its own clip's masks/ folder
    for s in vse.all_strips(scene):
        s.select = True
    try:
        r = bpy.ops.neural_atlas.decompose_selected(preset="demo", overrides=tiny_overrides(iterations=20))
        assert r == {"FINISHED"}
        jobs = list(st.jobs)
        assert sorted(j.strip_name for j in jobs) == sorted(s.name for s in strips[:2])
        assert all(j.mask_count == 1 and j.state == "submitting" for j in jobs)  # the clip's own masks
        err = na.blender.runtime.get().last_error
        assert err.startswith("Not submitted: shot3:") and gone in err, err  # the others went on
        tick_until(na, lambda: all(j.state in ("done", "failed", "cancelled") for j in st.jobs), 400)
        for j in st.jobs:
            assert j.state == "done", (j.label, j.error, j.hint)
        info = na.blender.runtime.get().session.jobs
        assert {info[j.job_id]["placement"]["slot"] for j in st.jobs} <= {0, 1}
        # nothing selected: a clear message, no job
        for s in vse.all_strips(scene):
            s.select = False
        with pytest.raises(RuntimeError, match="No movie or image strips selected"):
            bpy.ops.neural_atlas.decompose_selected()
        assert len(st.jobs) == 2
    finally:
        na.blender.runtime.shutdown()
