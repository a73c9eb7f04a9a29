"""What the operators (and batch scripts) do: submit a decomposition or a render,
and apply job changes to the .blend (import atlases + edit images, place renders).

Edits belong to the *shot* (strip, source and frame range), not to one
decomposition job: re-decomposing the same shot refreshes the atlases and keeps
the artist's edit images untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Optional

import bpy
import numpy as np

from ..core import jobs as J
from ..core import strips as S
from ..core.settings import settings_table
from . import images, runtime, vse
from .props import NA_JobItem, find_job_any, settings

JOB_FIELDS = ("state", "phase", "fraction", "eta_s", "psnr", "iteration", "iterations", "message")


class ActionError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


# -------------------------------------------------------------------- paths
def workspace() -> str:
    from .prefs import prefs

    return prefs().workspace_path()


def shot_key(strip_name: str, source: str, src_range: tuple[int, int]) -> str:
    h = hashlib.sha1(json.dumps([source, list(src_range)]).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '_', strip_name)[:40]}-{h}"


def edit_path(shot: str, layer: int) -> str:
    return os.path.join(workspace(), "edits", shot, f"layer_{layer}.png")


def layer_of(rel: str) -> int:
    m = re.search(r"layer_(\d+)\.", rel)
    if not m:
        raise ActionError(f"unexpected atlas file name {rel!r}")
    return int(m.group(1))


# --------------------------------------------------------------- decompose
def parse_overrides(text: str) -> dict[str, dict[str, Any]]:
    """The panel's one-line overrides: JSON (``{"losses": {"optical_flow": 0.01}}``), TOML, or the
    command line's ``--set`` form, settings separated by ``;`` (``losses.optical_flow=0.01;
    train.iterations=500``; TOML values, a bare word is a string)."""
    text = (text or "").strip()
    if not text:
        return {}
    try:
        d = json.loads(text)
    except ValueError:
        import tomllib

        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            try:  # the command line's --set form, settings separated by ";"
                d = settings_table(filter(None, (p.strip() for p in text.split(";"))))
            except ValueError as e:
                raise ActionError(f"overrides: {e}", 'Write e.g. losses.optical_flow=0.01; train.iterations=500 '
                                  'or {"train": {"iterations": 500}}') from None
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        raise ActionError("overrides must map sections to fields, e.g. {\"train\": {\"iterations\": 500}}")
    return d


def source_size(strip: bpy.types.Strip, info: S.StripInfo) -> tuple[int, int]:
    elems = getattr(strip, "elements", None)
    if elems and len(elems) and getattr(elems[0], "orig_width", 0):
        return int(elems[0].orig_width), int(elems[0].orig_height)
    if info.kind == "IMAGE":
        img = bpy.data.images.load(info.frame_file(0), check_existing=True)
        size = int(img.size[0]), int(img.size[1])
        return size
    sc = strip.id_data
    return int(sc.render.resolution_x), int(sc.render.resolution_y)


def decompose(scene: bpy.types.Scene, strip: bpy.types.Strip, *, preset: Optional[str] = None,
              overrides: Optional[dict] = None, masks_beside_clip: bool = False) -> NA_JobItem:
    """Submit the strip (non-blocking) and add its job record; the job id arrives later.
    ``masks_beside_clip`` (several strips at once): instead of the panel's masks, each clip's
    own seed-layout ``masks/`` folder when it has one (none otherwise)."""
    st = settings(scene)
    info = vse.strip_info(strip)
    timeline = (scene.frame_start, scene.frame_end) if st.use_scene_range else None
    src_range = S.source_range(info, timeline, st.max_frames or None)
    if info.kind == "MOVIE":
        if not os.path.isfile(info.source):
            raise ActionError(f"the movie {info.source!r} does not exist",
                              "Relink the strip's file (Strip > Movie > File) and try again")
        source, frame_range = info.source, src_range
    else:
        folder = S.list_frames(info.source)
        source, frame_range = info.source, S.folder_range(folder, info.files, src_range)
    masks: Optional[list[str]] = None
    if masks_beside_clip:
        beside = S.seed_masks_for(info.source) if info.kind == "IMAGE" else None
        masks = S.mask_folders(beside) if beside else None
    elif st.mask_mode == "FOLDER":
        if not st.mask_folder:
            raise ActionError("no mask folder chosen", "Pick the folder of object masks, or set Masks to None")
        masks = S.mask_folders(os.path.abspath(bpy.path.abspath(st.mask_folder)))
    elif st.mask_mode == "MASK":
        from . import masks as M

        datablocks = [m.mask for m in st.masks if m.mask is not None]
        if not datablocks:
            raise ActionError("no Mask datablock chosen", "Add one Mask per object, or set Masks to None")
        dest = os.path.join(workspace(), "masks", shot_key(strip.name, info.source, src_range))
        # the backend cuts masks with the same frame range as the clip: blank frames pad
        # the folder up to the range start
        masks = M.rasterise(datablocks, info, src_range, source_size(strip, info), dest,
                            first_index=frame_range[0])
    ov = dict(overrides or {})
    s = runtime.connect()
    from . import transfers

    remote = transfers.is_remote()
    submit = dict(frame_range=frame_range, preset=preset or st.preset, overrides=ov or None, name=strip.name)
    token = J.new_token() if remote else s.submit(source, masks=masks, **submit)
    job = st.jobs.add()
    job.token, job.kind, job.state, job.remote = token, "decompose", "submitting", remote
    job.label, job.strip_name, job.source = strip.name, strip.name, info.source
    job.range_start, job.range_stop = src_range
    job.preset = preset or st.preset
    job.src_channel, job.src_frame_start = info.channel, info.frame_start
    job.shot = shot_key(strip.name, info.source, src_range)
    job.mask_count = len(masks or [])
    st.active_job = len(st.jobs) - 1
    if remote:  # the backend does not see this machine's files: upload them, then submit
        job.state = "uploading"
        ranges = None
        if info.kind == "IMAGE" and all(os.path.isdir(m) for m in masks or []):
            # only the shot's own frames (and mask frames, cut the same way) travel; the backend
            # reads them as frames 0 .. n - 1
            ranges = [frame_range] * (1 + len(masks or []))
            submit["frame_range"] = (0, frame_range[1] - frame_range[0])
        transfers.upload_then(token, strip.name, [source, *(masks or [])],
                              lambda srcs: _submitted(token, s.submit(srcs[0], masks=srcs[1:] or None,
                                                                      token=token, **submit)),
                              lambda msg, hint: _failed(token, msg, hint), ranges=ranges)
    runtime.note(f"submitted {strip.name} frames {src_range[0]}-{src_range[1] - 1}")
    return job


# ------------------------------------------------------------------ render
def edit_images(job: NA_JobItem) -> list[bpy.types.Image]:
    return images.job_images(job.shot, "edit")


def render_edit(scene: bpy.types.Scene, job: NA_JobItem, *, formats: tuple[str, ...] = ("png",)) -> NA_JobItem:
    """Save every dirty edit image first (never reload one), then submit the render."""
    if job.kind != "decompose" or job.state != "done":
        raise ActionError(f"{job.label}: the decomposition is {job.state}", "Wait until it is done")
    edits = edit_images(job)
    if not edits:
        raise ActionError("this job has no edit images", "Use Load Atlases first")
    from ..core import lifetime as L
    from .lifetime import per_frame

    try:  # the edit lifetime (range, fades, keyframed opacity): the numbers the preview bakes too
        lifetimes = per_frame(scene, job)
    except L.LifetimeError as e:
        raise ActionError(f"{job.label}: {e}", "Fix the edit's frame range or fades") from None
    saved = images.save_dirty(edits)
    # only layers with paint (alpha > 0) are sent; an all-transparent edit changes nothing
    painted = [img for img in edits if float(images.to_array(img)[..., 3].max()) > 0.0] or edits[:1]
    paths = {int(img[images.KEY_LAYER]): os.path.abspath(bpy.path.abspath(img.filepath_raw or img.filepath))
             for img in painted}
    for layer, p in paths.items():
        if not os.path.isfile(p):
            raise ActionError(f"edit image of layer {layer} was not saved to {p}")
    s = runtime.connect()
    # copy what the render record needs first: adding to the collection may move `job`
    keep = {k: getattr(job, k) for k in ("job_id", "label", "strip_name", "source", "range_start",
                                         "range_stop", "src_channel", "src_frame_start", "shot")}
    opacity = L.render_field({k: v for k, v in lifetimes.items() if k in paths})
    from . import transfers

    remote, parent_id = bool(job.remote), keep["job_id"]
    token = J.new_token() if remote else s.render(keep["job_id"], paths, formats=formats,
                                                   name=f"{keep['label']} edit", opacity=opacity)
    st = settings(scene)
    r = st.jobs.add()
    r.token, r.kind, r.state, r.parent = token, "render", "submitting", keep.pop("job_id")
    r.remote = remote
    for k, v in keep.items():
        setattr(r, k, v)
    r.label = f"{keep['label']} edit"
    st.active_job = len(st.jobs) - 1
    if remote:  # only the edit images the backend lacks travel (content hash)
        r.state, layers = "uploading", sorted(paths)
        transfers.upload_then(token, r.label, [paths[k] for k in layers],
                              lambda srcs: _submitted(token, s.render(
                                  parent_id, dict(zip(layers, srcs)), formats=formats,
                                  name=f"{keep['label']} edit", opacity=opacity, token=token)),
                              lambda msg, hint: _failed(token, msg, hint))
    runtime.note(f"render of {keep['label']} submitted ({len(saved)} edit images saved, "
                 f"{len(paths)} with paint)")
    return r


# ---------------------------------------------------------- paint on a frame
def project_paint(scene: bpy.types.Scene, job: NA_JobItem, paint: bpy.types.Image, timeline_frame: int,
                  layer: int = -1) -> NA_JobItem:
    """Send an RGBA image painted over a frame (straight alpha = coverage) to the backend's
    paint_frame job: the paint lands in the layers' edit images (``merge_paint`` when done).
    The edit images are saved and copied first; the copies are what the backend paints over."""
    import shutil

    from .lifetime import first_frame

    if job.kind != "decompose" or job.state != "done" or not job.atlases_loaded:
        raise ActionError(f"{job.label}: the decomposition is {job.state}", "Wait until it is done and load the atlases")
    t0, n = first_frame(job), int(job.range_stop - job.range_start)
    f = int(timeline_frame) - t0
    if not 0 <= f < n:
        raise ActionError(f"frame {timeline_frame} is outside the shot (timeline frames {t0}-{t0 + n - 1})",
                          "Go to a frame of the shot")
    try:
        with open(os.path.join(job.out_dir, "report.json"), encoding="utf-8") as fh:
            clip = json.load(fh)["clip"]
    except (OSError, ValueError, KeyError) as e:
        raise ActionError(f"cannot read the decomposition's report.json: {e}") from None
    sizes = {(int(clip["width"]), int(clip["height"])), tuple(int(v) for v in clip.get("source_size") or ())}
    if tuple(paint.size) not in sizes:
        raise ActionError(f"'{paint.name}' is {paint.size[0]}x{paint.size[1]}; paint at the working resolution "
                          f"{clip['width']}x{clip['height']} or the source resolution (other sizes are refused, "
                          "not resampled)", "Use New Paint Image for this frame")
    if paint.channels != 4:
        raise ActionError(f"'{paint.name}' has no alpha channel: paint on a transparent RGBA image")
    edits = edit_images(job)
    images.save_dirty(edits)
    base = os.path.join(workspace(), "paint_frame", job.shot, hashlib.sha1(os.urandom(8)).hexdigest()[:12])
    os.makedirs(base, exist_ok=True)
    paint_path = os.path.join(base, "paint.png")
    paint.save(filepath=paint_path, save_copy=True)  # the file is what was painted: nothing is retargeted
    copies = {}
    for img in edits:
        i = int(img[images.KEY_LAYER])
        copies[i] = os.path.join(base, f"layer_{i}.png")
        shutil.copyfile(bpy.path.abspath(img.filepath_raw or img.filepath), copies[i])
    s = runtime.connect()
    keep = {k: getattr(job, k) for k in ("job_id", "label", "strip_name", "source", "range_start", "range_stop",
                                         "src_channel", "src_frame_start", "shot")}
    from . import transfers

    remote, parent_id, pname = bool(job.remote), keep["job_id"], f"{keep['label']} paint frame {timeline_frame}"
    token = J.new_token() if remote else s.paint_frame(keep["job_id"], f, paint_path, layer=layer,
                                                        edits=copies, name=pname)
    st = settings(scene)
    r = st.jobs.add()
    r.token, r.kind, r.state, r.parent = token, "paint_frame", "submitting", keep.pop("job_id")
    r.remote = remote
    for k, v in keep.items():
        setattr(r, k, v)
    r.label, r.paint_base = f"{keep['label']} paint frame {timeline_frame}", base
    st.active_job = len(st.jobs) - 1
    if remote:  # the paint and the edit images it paints over travel (what the backend lacks)
        r.state, layers = "uploading", sorted(copies)
        transfers.upload_then(token, pname, [paint_path, *(copies[k] for k in layers)],
                              lambda srcs: _submitted(token, s.paint_frame(
                                  parent_id, f, srcs[0], layer=layer, edits=dict(zip(layers, srcs[1:])),
                                  name=pname, token=token)),
                              lambda msg, hint: _failed(token, msg, hint))
    runtime.note(f"projecting '{paint.name}' from frame {timeline_frame} of {keep['label']}")
    return r


def _raw_pixels(path: str) -> np.ndarray:
    a = images.file_pixels(path)
    return a if a.shape[2] == 4 else np.concatenate([a, np.ones_like(a[..., :1])], -1)


def merge_paint(scene: bpy.types.Scene, job: NA_JobItem, res: dict[str, Any]) -> list[int]:
    """Put what a paint_frame job painted into the edit images in memory: texels the backend
    changed take its result; every other texel keeps the edit image as it is now (paint made
    since the job was sent is kept). Nothing is reloaded. Returns the layers changed."""
    out = _local_out(job, res, ("edits/",))
    changed_layers = []
    for img in images.job_images(job.shot, "edit"):
        i = int(img[images.KEY_LAYER])
        result = os.path.join(out, "edits", f"layer_{i}.png")
        before = os.path.join(job.paint_base, f"layer_{i}.png")
        if not (os.path.isfile(result) and os.path.isfile(before)):
            continue
        new, old = _raw_pixels(result), _raw_pixels(before)
        if new.shape != old.shape or new.shape[:2] != (img.size[1], img.size[0]):
            raise ActionError(f"the painted edit of layer {i} is {new.shape[1]}x{new.shape[0]}, the edit image "
                              f"{img.size[0]}x{img.size[1]}")
        changed = np.any(new != old, axis=-1)
        if not changed.any():
            continue
        cur = images.pixels(img)
        cur[changed] = new[changed]
        images._pixels(img).foreach_set(cur.ravel())
        img.update()
        changed_layers.append(i)
    job.out_dir = out
    from . import preview

    preview.sync(job.shot)
    runtime.note(f"{job.label}: paint landed in layer(s) {changed_layers or 'none'} (unsaved: Render Edit saves)")
    return changed_layers


# ------------------------------------------------------- remote transfers
def _submitted(token: str, _sent: str) -> None:
    """An upload finished and its job was submitted: the record waits for the job id."""
    _sc, job = _find_by_token(token)
    if job is not None and job.state == "uploading":
        job.state = "submitting"


def _failed(token: str, message: str, hint: str) -> None:
    _sc, job = _find_by_token(token)
    if job is None:
        _sc, job = find_job_any(token)
    if job is not None:
        job.state = "failed" if job.state in ("uploading", "submitting") else job.state
        job.error, job.hint = message, hint
    rt = runtime.get()
    rt.last_error, rt.last_hint = message, hint
    runtime.note(message)


def _download_then_apply(job: NA_JobItem, ch: J.Change, res: dict[str, Any]) -> None:
    """A finished job of a remote backend: bring its files into the workspace, then apply
    the change as for a shared folder (``local_out`` in the result)."""
    from . import transfers

    def then(dest: str) -> None:
        apply(J.Change(ch.kind, ch.job_id, {**ch.info, "result": {**res, "local_out": dest}}, ch.token))

    jid = job.job_id
    job.message = "downloading"
    transfers.download_then(jid, job.kind, job.label, job.source if job.kind == "decompose" else "",
                            then, lambda msg, hint: _failed(jid, msg, hint))


def download_results(job: NA_JobItem) -> None:
    """Download a finished remote job's files (again: a failed or cancelled download resumes)
    and apply them like a fresh result."""
    _download_then_apply(job, J.Change("finished", job.job_id, {"job_id": job.job_id, "state": "done"}),
                         {"job_id": job.job_id})


# ------------------------------------------------------------------- apply
def _find_by_token(token: str) -> tuple[Optional[bpy.types.Scene], Optional[NA_JobItem]]:
    for sc in bpy.data.scenes:
        for j in settings(sc).jobs:
            if token and j.token == token:
                return sc, j
    return None, None


def _update(job: NA_JobItem, info: dict[str, Any]) -> None:
    for k in JOB_FIELDS:
        v = info.get(k)
        if v is None:
            if k in ("eta_s",):
                job.eta_s = -1.0
            continue
        try:
            setattr(job, k, v if not isinstance(v, float) or k != "fraction" else min(1.0, max(0.0, v)))
        except (TypeError, ValueError):
            pass
    if info.get("state") == "done":
        job.fraction = 1.0


def apply(ch: J.Change) -> None:
    """Reflect one change from the session in the .blend (main thread)."""
    if ch.kind == "connection":
        runtime.note(ch.info.get("message", ""))
        return
    sc, job = (None, None)
    if ch.job_id:
        sc, job = find_job_any(ch.job_id)
    if job is None and ch.token:
        sc, job = _find_by_token(ch.token)
    if job is None or sc is None:
        if ch.kind == "error":
            rt = runtime.get()
            rt.last_error, rt.last_hint = ch.info.get("message", ""), ch.info.get("hint", "")
        return
    if ch.kind == "submitted":
        job.job_id = ch.job_id
        _update(job, ch.info)
    elif ch.kind == "error":
        job.state = "failed" if not job.job_id else job.state
        job.error, job.hint = ch.info.get("message", ""), ch.info.get("hint", "")
    elif ch.kind == "job":
        _update(job, ch.info)
    elif ch.kind == "finished":
        _update(job, ch.info)
        job.state = ch.info.get("state", job.state)
        if job.state != "done":
            err = ch.info.get("error") or {}
            job.error = ch.info.get("message_text") or err.get("message", "") or job.state
            job.hint = ch.info.get("hint", "")
            runtime.note(f"{job.label}: {job.state}: {job.error}")
            return
        res = ch.info.get("result")
        if not res:
            job.error = ch.info.get("message_text", "result unavailable")
            job.hint = ch.info.get("hint", "")
            return
        if job.remote and not res.get("local_out"):
            _download_then_apply(job, ch, res)
            return
        try:
            if job.kind == "decompose":
                load_results(sc, job, res)
            elif job.kind == "paint_frame":
                merge_paint(sc, job, res)
            else:
                place(sc, job, res)
            job.error = job.hint = ""
        except (ActionError, S.StripError, OSError, RuntimeError) as e:
            job.error = getattr(e, "message", str(e))
            job.hint = getattr(e, "hint", "")
            runtime.note(f"{job.label}: {job.error}")


def _local_out(job: NA_JobItem, res: dict[str, Any], prefixes: tuple[str, ...]) -> str:
    """The job's output folder on this machine (downloads it from a remote backend)."""
    if res.get("local_out"):  # downloaded from a backend that does not share our files
        return str(res["local_out"])
    out = str(res.get("out_dir") or "")
    if out and os.path.isdir(out):
        return out
    s = runtime.get().session
    if s is None or s.client is None:
        raise ActionError("the job's output folder is not on this machine and there is no connection")
    dest = os.path.join(workspace(), "downloads", job.job_id)
    s.client.download_result(job.job_id, dest, prefixes=prefixes)
    return dest


def load_results(scene: bpy.types.Scene, job: NA_JobItem, res: dict[str, Any]) -> list[bpy.types.Image]:
    """Atlases as Blender images (explicit colour space) + one transparent edit image each."""
    atlases = list(res.get("atlases") or [])
    out = _local_out(job, res, ("atlas/", "report.json"))
    if not atlases:
        adir = os.path.join(out, "atlas")
        atlases = sorted(f"atlas/{n}" for n in os.listdir(adir)) if os.path.isdir(adir) else []
    atlases = [a for a in atlases if re.search(r"layer_\d+\.png$", a)]
    if not atlases:
        raise ActionError("the decomposition wrote no atlas images", "See the backend log")
    job.out_dir = out
    report = res.get("report") or {}
    if isinstance(report, dict) and isinstance(report.get("psnr"), (int, float)):
        job.psnr = float(report["psnr"])
    loaded = []
    for rel in sorted(atlases, key=layer_of):
        layer = layer_of(rel)
        a = images.load_atlas(os.path.join(out, rel), job.shot, layer, job.label)
        images.ensure_edit(job.shot, layer, job.label, (int(a.size[0]), int(a.size[1])),
                           edit_path(job.shot, layer))
        loaded.append(a)
    job.n_layers = len(loaded)
    from .lifetime import ensure_records

    ensure_records(scene, job)  # per-layer edit lifetimes (whole shot, opacity 1 to begin with)
    job.atlases_loaded = True
    runtime.note(f"{job.label}: {len(loaded)} atlases loaded; paint on the edit images")
    return loaded


def render_outputs(out: str, res: dict[str, Any]) -> tuple[list[str], Optional[str]]:
    """(PNG frames in order, movie) of a render's output folder."""
    outputs = res.get("outputs") or {}
    frames: list[str] = []
    movie: Optional[str] = None
    fd = outputs.get("frames_dir") if isinstance(outputs, dict) else None
    vid = outputs.get("video") if isinstance(outputs, dict) else None
    if isinstance(fd, str) and os.path.isdir(fd):
        frames = [os.path.join(fd, n) for n in S.list_frames(fd)]
    elif isinstance(fd, str) and out and os.path.isdir(os.path.join(out, "frames")):
        d = os.path.join(out, "frames")  # downloaded from a remote backend
        frames = [os.path.join(d, n) for n in S.list_frames(d)]
    else:
        best: list[str] = []
        for d, _dirs, files in os.walk(out):
            if os.path.basename(d) in ("atlas", "bake", "checkpoints"):
                continue
            pngs = [os.path.join(d, n) for n in S.list_frames(d) if n.lower().endswith(".png")]
            if len(pngs) > len(best):
                best = pngs
        frames = best
    if isinstance(vid, str) and os.path.isfile(vid):
        movie = vid
    for d, _dirs, files in os.walk(out):
        for n in sorted(files):
            if n.lower().endswith((".mp4", ".mov", ".mkv")):
                movie = movie or os.path.join(d, n)
    return frames, movie


def place(scene: bpy.types.Scene, job: NA_JobItem, res: dict[str, Any]) -> bpy.types.Strip:
    out = _local_out(job, res, ("",))
    frames, movie = render_outputs(out, res)
    n = job.range_stop - job.range_start
    if frames and len(frames) != n:
        raise ActionError(f"the render has {len(frames)} frames, the decomposed range {n}",
                          "Render again; if it persists, see the backend log")
    src = vse.find_strip(scene, job.strip_name)
    if src is not None and src.type in ("MOVIE", "IMAGE"):
        info = vse.strip_info(src)
    else:  # the source strip was renamed or deleted: use what the job recorded
        info = S.StripInfo(job.strip_name, "MOVIE", job.src_channel, job.src_frame_start,
                           job.src_frame_start + job.range_start, job.src_frame_start + job.range_stop,
                           job.range_stop, job.source)
    strip = vse.place_render(scene, info, (job.range_start, job.range_stop), frames, movie,
                             decompose_job=job.shot, render_job=job.job_id, name=f"{job.label}")
    job.render_strip, job.placed, job.out_dir = strip.name, True, out
    runtime.note(f"{job.label}: placed on channel {strip.channel}, frames "
                 f"{strip.frame_final_start}-{strip.frame_final_end - 1}")
    return strip
