"""Live preview of an edited shot, computed by Blender from the decomposition's maps.

No backend round trip: the preview shows, for every frame of the shot, exactly the backend's
delta formula (docs/atlas.md)

    out = plate + sum_i o_i(f) * alpha_i * R_i * D_i(uv_i),   D_i = a (rgb - T_i)  (E over T)

from the plate, per layer the STMap with alpha and the residual (maps/ or maps_source/), a
per-layer **delta** D_i formed from the artist's edit image (its pixels in memory, painted or
not yet saved) and the atlas PNG's raw values, and the per-frame opacity o_i of the edit
lifetime (core.lifetime: the numbers Render Edit sends). Two engines compute it:

* ``numpy`` (the default for image-sequence plates): the frame being looked at is computed in
  numpy (``core.live``) from that frame's maps, cached as arrays, and written as an
  uncompressed 8-bit BMP into a private temporary folder; an **image strip** above the source,
  one file per frame of the shot, shows it. A frame is computed when it is first shown (the
  ``frame_change_pre`` handler, before the VSE draws it) and again after an edit changed. After
  a stroke ``sync`` re-reads the edit image once, finds the changed rows by a checksum per band
  of 16 rows, re-forms D only there, and recomputes only the pixels of the cached frames whose
  bilinear footprint touches a changed 16 x 16 texel tile: a stroke costs one read of the edit
  image plus a few milliseconds, not a render. Its values are the backend's 8-bit output
  (clip, x 255, + 0.5, floor), shown by the VSE as they are (the strip has the source strip's
  colour space). Other frames' files are refreshed when they are shown.
* ``cycles`` (movie plates, whose frames Blender's Python cannot read one by one, or on
  request): a preview scene rendered by Cycles, shown as a scene strip. How its shader matches
  the backend: every map is sampled with Closest at the preview pixel's centre (one sample per
  pixel, box filter 0.01 px); D, written into a float **delta image**, is sampled bilinearly at
  the pixel's (s, t) with the texel-centre convention and border clamping of the backend's
  ``grid_sample(align_corners=False, padding_mode="border")``; all values are the plate's
  encoded values (Non-Color), decoded to linear at the end because the VSE encodes a scene
  strip's linear render into its sequencer colour space (sRGB). The Sequencer draws scene
  strips with the sequencer scene's preview shading (``render.sequencer_gl_preview``; Solid by
  default): while a Cycles preview is on it is set to Rendered and set back when the last one
  goes. A headless Cycles render frees unsaved paint of file-backed images (bpy 5.0.1), so the
  add-on saves dirty edit images before such renders.

It never writes the edit images, the atlases or the source. Everything the preview creates is
tagged ``neural_atlas_preview = <shot>`` (the numpy engine's files are in a temporary folder of
their own) and removed by ``disable``: the file's datablocks and strips are then exactly what
they were.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import bpy
import numpy as np

from ..core import lifetime as L
from ..core import live
from ..core import strips as S
from . import images, vse
from .lifetime import first_frame, per_frame
from .paint import node_material
from .props import NA_JobItem

KEY = "neural_atlas_preview"  # custom property on everything the preview creates: the shot key
MAPS_HINT = "add them with `python -m backend render {out} --maps` (or decompose again)"
_DATA = ("scenes", "objects", "cameras", "meshes", "materials", "images", "actions", "node_groups")

Socket = Any  # bpy.types.NodeSocket
Value = Union[Socket, float, tuple]


class PreviewError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


# ----------------------------------------------------------------- the maps
@dataclass(frozen=True)
class MapLayer:
    index: int
    atlas_size: int
    stmap_pattern: str  # path with %05d for the decomposition frame
    residual_pattern: str

    @property
    def stmap(self) -> str:
        """The first file of the STMap sequence (frame 0)."""
        return self.stmap_pattern % 0

    @property
    def residual(self) -> str:
        return self.residual_pattern % 0


@dataclass(frozen=True)
class Maps:
    folder: str
    frames: int
    width: int
    height: int
    layers: tuple[MapLayer, ...]


def read_maps(out_dir: str, prefer_source: bool = False) -> Maps:
    """The EXR maps of a decomposition (maps/meta.json, or maps_source/ when asked and there).
    Raises PreviewError saying how to add them when there are none."""
    folders = ["maps_source", "maps"] if prefer_source else ["maps", "maps_source"]
    for name in folders:
        meta_path = os.path.join(out_dir, name, "meta.json")
        if os.path.isfile(meta_path):
            break
    else:
        raise PreviewError(f"the decomposition in {out_dir} has no EXR maps (maps/meta.json), which the "
                           "live preview reads", MAPS_HINT.format(out=out_dir))
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        folder = os.path.dirname(meta_path)
        layers = []
        for entry in meta["layers"]:
            i = int(entry["index"])
            st = os.path.join(folder, meta["stmap"].format(layer=i))
            rs = os.path.join(folder, meta["residual"].format(layer=i))
            for p in (st % 0, rs % 0):
                if not os.path.isfile(p):
                    raise PreviewError(f"the map {p} is missing", MAPS_HINT.format(out=out_dir))
            layers.append(MapLayer(i, int(entry["atlas_size"]), st, rs))
        return Maps(folder, int(meta["frames"]), int(meta["width"]), int(meta["height"]),
                    tuple(sorted(layers, key=lambda m: m.index)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreviewError(f"cannot read {meta_path}: {e}", MAPS_HINT.format(out=out_dir)) from None


@dataclass(frozen=True)
class Plate:
    path: str  # a movie, or the first file of a numbered image sequence
    movie: bool
    offset: int  # ImageUser.frame_offset putting the shot's frame 0 on its first frame
    size: tuple[int, int]


_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def plate_of(out_dir: str) -> Plate:
    """The frames the decomposition was made from (report.json), as Blender reads them."""
    try:
        with open(os.path.join(out_dir, "report.json"), encoding="utf-8") as f:
            clip = json.load(f)["clip"]
    except (OSError, ValueError, KeyError) as e:
        raise PreviewError(f"cannot read {out_dir}/report.json: {e}", "Decompose the shot again") from None
    source = str(clip["source"])
    try:  # downloaded from a backend on another machine: the clip as this machine has it
        with open(os.path.join(out_dir, "source.local"), encoding="utf-8") as f:
            source = f.read().strip() or source
    except OSError:
        pass
    a, _b = clip["frame_range"]
    size = (int(clip["source_size"][0]), int(clip["source_size"][1]))
    names = list(clip.get("frame_names") or [])
    if os.path.isfile(source):
        # a movie: image users count movie frames from 1
        return Plate(source, True, int(a), size)
    if not names:
        raise PreviewError(f"report.json of {out_dir} does not list the source's frame files",
                           "Decompose the shot again")
    m = _LAST_NUMBER.search(names[0])
    if m is None:
        raise PreviewError(f"the source frame {names[0]!r} has no frame number",
                           "The preview reads numbered image sequences (frame_0001.png, ...)")
    n0, width = int(m.group(1)), len(m.group(1))
    for f, name in enumerate(names):
        want = names[0][:m.start(1)] + str(n0 + f).zfill(width) + names[0][m.end(1):]
        if name != want:
            raise PreviewError(f"the source frames are not numbered one after another ({name!r} where "
                               f"{want!r} was expected)", "Render the strip to a numbered image sequence first")
    if os.path.isdir(os.path.join(source, "video_frames")):  # a seed-layout clip folder
        source = os.path.join(source, "video_frames")
    first = os.path.join(source, names[0])
    if not os.path.isfile(first):
        raise PreviewError(f"the source frame {first} is missing", "Relink or restore the source frames")
    return Plate(first, False, n0 - 1, size)


# ------------------------------------------------------------ node building
class _Graph:
    """Terse shader-node building: numbers become constants, sockets get linked."""

    def __init__(self, nt: bpy.types.NodeTree) -> None:
        self.nt = nt
        self.x = 0

    def node(self, kind: str, **props: Any) -> Any:
        n = self.nt.nodes.new(kind)
        for k, v in props.items():
            setattr(n, k, v)
        n.location = (self.x, 0)
        self.x += 5
        return n

    def _set(self, sock: Socket, v: Value) -> None:
        if isinstance(v, (int, float)):
            if sock.type == "VECTOR":
                sock.default_value = (float(v),) * 3
            else:
                sock.default_value = float(v)
        elif isinstance(v, tuple):
            sock.default_value = v
        else:
            self.nt.links.new(v, sock)

    def math(self, op: str, a: Value, b: Value = 0.0) -> Socket:
        n = self.node("ShaderNodeMath", operation=op)
        self._set(n.inputs[0], a)
        self._set(n.inputs[1], b)
        return n.outputs[0]

    def vec(self, op: str, a: Value, b: Value = 0.0, c: Value = 0.0) -> Socket:
        """Vector math; SCALE takes its scalar as ``b``."""
        n = self.node("ShaderNodeVectorMath", operation=op)
        self._set(n.inputs[0], a)
        if op == "SCALE":
            self._set(n.inputs["Scale"], b)
        else:
            self._set(n.inputs[1], b)
            if op == "MULTIPLY_ADD":
                self._set(n.inputs[2], c)
        return n.outputs[0]

    def tex(self, image: bpy.types.Image, vector: Socket, interpolation: str = "Closest",
            frames: Optional[tuple[int, int, int]] = None) -> Any:
        n = self.node("ShaderNodeTexImage", image=image, interpolation=interpolation, extension="EXTEND")
        if frames is not None:  # (first scene frame, frame count, offset)
            iu = n.image_user
            iu.frame_start, iu.frame_duration, iu.frame_offset = frames
            iu.use_auto_refresh = True
            iu.use_cyclic = False
        self.nt.links.new(vector, n.inputs["Vector"])
        return n

    def split(self, v: Socket) -> tuple[Socket, Socket, Socket]:
        n = self.node("ShaderNodeSeparateXYZ")
        self.nt.links.new(v, n.inputs[0])
        return n.outputs[0], n.outputs[1], n.outputs[2]

    def decode(self, encoded: Socket) -> Socket:
        """The linear value of an sRGB-encoded colour in [0, 1] (the exact two-branch curve)."""
        lo = self.vec("SCALE", encoded, 1.0 / 12.92)
        hi = self.vec("POWER", self.vec("MULTIPLY_ADD", encoded, 1.0 / 1.055, 0.055 / 1.055), 2.4)
        w = self.vec("MULTIPLY_ADD", self.vec("SIGN", self.vec("SUBTRACT", encoded, 0.04045)), 0.5, 0.5)
        return self.vec("ADD", lo, self.vec("MULTIPLY", w, self.vec("SUBTRACT", hi, lo)))


def _layer_delta(g: _Graph, pixel_uv: Socket, delta: bpy.types.Image, stmap: bpy.types.Image,
                 residual: bpy.types.Image, frames: tuple[int, int, int], opacity: Socket) -> Socket:
    """o * alpha * R * D(uv) for one layer: D bilinear at the pixel's STMap (s, t), which is
    Blender's UV of the atlas, with the texel-centre convention and border clamping."""
    st = g.tex(stmap, pixel_uv, frames=frames)
    res = g.tex(residual, pixel_uv, frames=frames)
    d = g.tex(delta, st.outputs["Color"], "Linear")
    gain = g.math("MULTIPLY", st.outputs["Alpha"], opacity)
    return g.vec("SCALE", g.vec("MULTIPLY", d.outputs["Color"], res.outputs["Color"]), gain)


# ------------------------------------------------------------------ building
def _tag(idb: bpy.types.ID, shot: str) -> None:
    idb[KEY] = shot


def _load_sequence(path: str, shot: str, name: str, n_frames: int, movie: bool = False) -> bpy.types.Image:
    img = bpy.data.images.load(bpy.path.abspath(path), check_existing=False)
    img.name = name
    img.source = "MOVIE" if movie else ("SEQUENCE" if n_frames > 1 else "FILE")
    img.colorspace_settings.name = "Non-Color"  # raw encoded values, never colour-converted
    img.alpha_mode = "CHANNEL_PACKED"  # alpha is data (the layer's alpha), not coverage
    if img.is_float:
        img.use_half_precision = False  # an STMap needs float32 (a half steps 1.6 texels of 3,200)
    _tag(img, shot)
    return img


def _bake_opacity(nt: bpy.types.NodeTree, per_layer: dict[int, Any], t0: int, shot: str,
                  label: str) -> None:
    """Per-frame opacities as CONSTANT keyframes (one per frame) on the ``opacity <i>`` Value
    nodes of ``nt``: one action for the node tree; layers at full strength get no curve."""
    ad = nt.animation_data
    if ad is not None and ad.action is not None:
        old = ad.action
        ad.action = None
        if old.get(KEY) == shot and old.users == 0:
            bpy.data.actions.remove(old)
    action = None
    for i, (node, values) in sorted(per_layer.items()):
        sock = node.outputs[0]
        sock.default_value = float(values[0])
        if L.is_full(values):
            continue
        if action is None:
            ad = nt.animation_data or nt.animation_data_create()
            action = bpy.data.actions.new(f"NA {label} preview opacity")
            _tag(action, shot)
            ad.action = action
        path = sock.path_from_id("default_value")
        fc = action.fcurve_ensure_for_datablock(nt, path) if hasattr(action, "fcurve_ensure_for_datablock") \
            else getattr(action, "fcurves").new(path)  # Blender < 4.4
        n = len(values)
        fc.keyframe_points.add(n)
        co = [0.0] * (2 * n)
        co[0::2] = [float(t0 + f) for f in range(n)]
        co[1::2] = [float(v) for v in values]
        fc.keyframe_points.foreach_set("co", co)
        fc.keyframe_points.foreach_set("interpolation", [0] * n)  # CONSTANT
        fc.update()


def _opacity_nodes(nt: bpy.types.NodeTree) -> dict[int, Any]:
    return {int(n.name.split()[-1]): n for n in nt.nodes
            if n.bl_idname == "ShaderNodeValue" and n.name.startswith("opacity ")}


def _material(name: str, shot: str, maps: Maps, plate: Plate, plate_img: bpy.types.Image,
              layers: Sequence[tuple[MapLayer, bpy.types.Image, bpy.types.Image, bpy.types.Image]], t0: int,
              opacity: dict[int, list[float]]) -> bpy.types.Material:
    mat, nt = node_material(name, reuse=False)
    _tag(mat, shot)
    g = _Graph(nt)
    uv = g.node("ShaderNodeUVMap", uv_map="UVMap").outputs["UV"]
    F = maps.frames
    exact = (plate.size == (maps.width, maps.height))
    plate_tex = g.tex(plate_img, uv, "Closest" if exact else "Linear",
                      frames=(t0, F, plate.offset) if (F > 1 or plate.movie) else None)
    out: Socket = plate_tex.outputs["Color"]
    for m, delta, stmap, residual in layers:
        val = g.node("ShaderNodeValue", label=f"opacity {m.index}", name=f"opacity {m.index}")
        out = g.vec("ADD", out, _layer_delta(g, uv, delta, stmap, residual, (t0, F, -1), val.outputs[0]))
    _bake_opacity(nt, {i: (node, opacity.get(i, [1.0] * F)) for i, node in _opacity_nodes(nt).items()},
                  t0, shot, name)
    out = g.vec("MAXIMUM", g.vec("MINIMUM", out, 1.0), 0.0)
    emit = g.node("ShaderNodeEmission")
    nt.links.new(g.decode(out), emit.inputs["Color"])
    res = g.node("ShaderNodeOutputMaterial")
    nt.links.new(emit.outputs[0], res.inputs["Surface"])
    return mat


def _scene(name: str, shot: str, maps: Maps, t0: int, mat: bpy.types.Material) -> bpy.types.Scene:
    W, H = maps.width, maps.height
    sc = bpy.data.scenes.new(name)
    _tag(sc, shot)
    sc.frame_start, sc.frame_end = t0, t0 + maps.frames - 1
    r = sc.render
    r.engine = "CYCLES"
    r.resolution_x, r.resolution_y, r.resolution_percentage = W, H, 100
    r.film_transparent = False
    # no persistent data: a kept render session would keep the delta images it first read
    r.use_persistent_data = False
    c = sc.cycles  # type: ignore[attr-defined]
    c.samples, c.preview_samples = 1, 1
    c.use_adaptive_sampling = False
    c.use_denoising = c.use_preview_denoising = False
    c.pixel_filter_type, c.filter_width = "BOX", 0.01  # each pixel samples its centre
    c.max_bounces = 0
    sc.view_settings.view_transform = "Standard"
    sc.world = None
    cam_data = bpy.data.cameras.new(name)
    _tag(cam_data, shot)
    cam_data.type = "ORTHO"
    cam_data.ortho_scale = float(max(W, H))
    cam = bpy.data.objects.new(name + " camera", cam_data)
    _tag(cam, shot)
    cam.location = (W / 2.0, H / 2.0, 1.0)
    sc.collection.objects.link(cam)
    sc.camera = cam
    me = bpy.data.meshes.new(name)
    _tag(me, shot)
    me.from_pydata([(0.0, 0.0, 0.0), (W, 0.0, 0.0), (W, H, 0.0), (0.0, H, 0.0)], [], [(0, 1, 2, 3)])
    uvl = me.uv_layers.new(name="UVMap")
    uvl.data.foreach_set("uv", [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    me.update()
    me.materials.append(mat)
    plane = bpy.data.objects.new(name + " plane", me)
    _tag(plane, shot)
    sc.collection.objects.link(plane)
    return sc


# ---------------------------------------------------------- the delta images
@dataclass
class _Layer:
    """One layer of a Cycles preview: D lives in a float image the shader samples."""

    atlas: np.ndarray  # (S, S, 3) float32, the atlas's raw RGB, Blender's row order (bottom first)
    edit: str  # the artist's edit image (name)
    delta: str  # the preview's delta image (name)
    crc: int = -1  # of the edit pixels last turned into the delta


@dataclass
class _LiveLayer:
    """One layer of a numpy preview: D as an array, updated band by band."""

    index: int
    atlas: np.ndarray  # (S, S, 3) float32, bottom row first
    edit: str
    D: np.ndarray  # (S, S, 3) float32
    tracker: live.EditTracker
    signature: tuple = ()  # the edit's file when it was last read clean
    synced: bool = False


@dataclass
class _Shot:
    shot: str
    engine: str = "cycles"
    layers: dict = field(default_factory=dict)  # layer -> _Layer | _LiveLayer
    # the numpy engine
    folder: str = ""
    maps: Optional[Maps] = None
    plate: Optional[Plate] = None
    t0: int = 0
    n: int = 0
    opacity: dict = field(default_factory=dict)  # layer -> per-frame list
    frames: "OrderedDict[int, live.Frame]" = field(default_factory=OrderedDict)  # most recent last
    valid: set = field(default_factory=set)  # frames whose file shows the current edits
    stats: dict = field(default_factory=dict)  # what the last sync / frame did (tests, bench)


_SHOTS: dict[str, _Shot] = {}
#: frames of a numpy preview kept as arrays (about 200 MB each at 1080p with 2 layers)
CACHED_FRAMES = 2
_BUFFER: list[np.ndarray] = []  # one float32 buffer reused for reading edit images


def atlas_values(atlas: bpy.types.Image) -> np.ndarray:
    """The atlas PNG's raw RGB (S, S, 3), as the backend reads it: a Non-Color, channel-packed
    read of the file (never the artist's image, whose colour Blender linearises and whose RGB it
    premultiplies by alpha = seen, losing T where nothing was seen)."""
    a = images.file_pixels(atlas.filepath_raw or atlas.filepath)
    return np.ascontiguousarray(a[..., :3])


def _encoded(img: bpy.types.Image, reuse: bool = False) -> np.ndarray:
    """An edit image's pixels as stored in its file (encoded, straight alpha), bottom row first.
    ``reuse``: read into the module's buffer (valid until the next read)."""
    w, h = img.size
    if img.channels != 4:
        raise PreviewError(f"'{img.name}' has {img.channels} channels; an edit image is RGBA")
    n = w * h * 4
    if reuse and (not _BUFFER or _BUFFER[0].size < n):
        _BUFFER[:] = [np.empty(n, np.float32)]
    a = images.pixels(img, _BUFFER[0] if reuse else None)
    if holds_linear(img):
        # float buffers hold linear values: encode them as the PNG the backend reads holds them
        a[..., :3] = live.srgb_encode(a[..., :3])
    return a


def holds_linear(img: bpy.types.Image) -> bool:
    """A float image with a colour space: Blender holds its pixels linear, while the backend
    reads the encoded values its PNG holds."""
    return bool(img.is_float) and img.colorspace_settings.name not in ("Non-Color", "Raw", "Generic Data")


def edit_delta(edit: np.ndarray, atlas: np.ndarray) -> np.ndarray:
    """The premultiplied delta of an edit layer over its atlas, ``D = a (rgb - T)`` (the
    backend's ``E - T`` for E = T (1 - a) + rgb a), as RGBA with alpha 1."""
    out = np.empty(edit.shape[:2] + (4,), np.float32)
    live.delta(edit, atlas, out=out[..., :3])
    out[..., 3] = 1.0
    return out


def _file_signature(img: bpy.types.Image) -> tuple:
    path = bpy.path.abspath(img.filepath_raw or img.filepath)
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (path, st.st_mtime_ns, st.st_size)


def _check_size(edit: bpy.types.Image, px: np.ndarray, atlas: np.ndarray) -> None:
    if px.shape[:2] != atlas.shape[:2]:
        raise PreviewError(f"'{edit.name}' is {px.shape[1]}x{px.shape[0]}, the layer's atlas "
                           f"{atlas.shape[1]}x{atlas.shape[0]}", "Use Load Atlases to bring it to the atlas size")


def _sync_cycles(state: _Shot) -> int:
    changed = 0
    for layer in state.layers.values():
        edit, delta = bpy.data.images.get(layer.edit), bpy.data.images.get(layer.delta)
        if edit is None or delta is None:
            continue
        px = _encoded(edit)
        crc = zlib.crc32(memoryview(px).cast("B"))
        if crc == layer.crc:
            continue
        _check_size(edit, px, layer.atlas)
        images._pixels(delta).foreach_set(edit_delta(px, layer.atlas).ravel())
        delta.update()
        layer.crc = crc
        changed += 1
    return changed


def _sync_live(state: _Shot, only: Optional[set] = None) -> int:
    """Re-read edit images that may have changed (dirty, never read, or their file changed),
    re-form D on the changed bands and update the cached frames' changed pixels."""
    changed = 0
    pixels = {f: 0 for f in state.frames}
    for layer in state.layers.values():
        edit = bpy.data.images.get(layer.edit)
        if edit is None or (only is not None and layer.edit not in only):
            continue
        sig = _file_signature(edit)
        if layer.synced and not edit.is_dirty and sig and sig == layer.signature:
            continue  # clean and as last read: its pixels are its file's
        px = _encoded(edit, reuse=True)
        _check_size(edit, px, layer.atlas)
        bands = layer.tracker.changed_bands(px)
        layer.synced, layer.signature = True, (sig if not edit.is_dirty else ())
        if not bands:
            continue
        tiles = live.update_delta(layer.D, px, layer.atlas, bands)
        if not tiles.any():
            continue
        changed += 1
        for f, fr in state.frames.items():
            pixels[f] += fr.update(layer.index, layer.D, tiles)
    if changed:
        state.stats["sync_pixels"] = pixels  # per cached frame, the pixels the last sync that changed something recomputed
        state.valid = set(state.frames)
        for f in state.frames:
            _write_frame(state, f)
    return changed


def sync(shot: Optional[str] = None, only: Optional[Iterable[str]] = None) -> int:
    """Turn changed edit images into the preview (all previews, or ``shot``'s; ``only``: the
    names of the edit images known to have changed): called after strokes (depsgraph updates,
    the paint timer) and by Refresh. Returns how many layers changed. Cheap when nothing
    changed (a checksum of each dirty edit's pixels; clean ones are skipped)."""
    changed = 0
    names = set(only) if only is not None else None
    for key, state in list(_SHOTS.items()):
        if shot is not None and key != shot:
            continue
        n = _sync_live(state, names) if state.engine == "numpy" else _sync_cycles(state)
        if n:
            changed += n
            for sc in bpy.data.scenes:
                touch(sc, key)
    return changed


# ------------------------------------------------------------- numpy frames
def _plate_frame(plate: Plate, f: int) -> str:
    first = os.path.basename(plate.path)
    m = _LAST_NUMBER.search(first)
    assert m is not None
    name = first[:m.start(1)] + str(plate.offset + 1 + f).zfill(len(m.group(1))) + first[m.end(1):]
    return os.path.join(os.path.dirname(plate.path), name)


def _frame_file(state: _Shot, f: int) -> str:
    return os.path.join(state.folder, f"{f:05d}.bmp")


def _compute(state: _Shot, f: int) -> live.Frame:
    """Frame ``f`` of a numpy preview from its maps (files read through Blender, bottom row first)."""
    maps, plate = state.maps, state.plate
    assert maps is not None and plate is not None
    W, H = maps.width, maps.height
    path = _plate_frame(plate, f)
    if not os.path.isfile(path):
        raise PreviewError(f"the source frame {path} is missing", "Relink or restore the source frames")
    px = images.file_pixels(path)[..., :3]
    lookups = {}
    for m in maps.layers:
        o = float(state.opacity.get(m.index, [1.0] * state.n)[f])
        if o <= 0.0:
            continue  # faded out: adds nothing (the backend skips it too)
        st = images.file_pixels(m.stmap_pattern % f)
        rs = images.file_pixels(m.residual_pattern % f)
        if st.shape[:2] != (H, W) or rs.shape[:2] != (H, W):
            raise PreviewError(f"the maps of frame {f} are not {W}x{H}", MAPS_HINT.format(out=maps.folder))
        gain = st[..., 3] if o == 1.0 else st[..., 3] * np.float32(o)
        lookups[m.index] = live.lookup(st[..., :2], gain, rs[..., :3], m.atlas_size)
    return live.Frame(live.resample(px, W, H), lookups, {i: state.layers[i].D for i in lookups})


def _write_frame(state: _Shot, f: int) -> None:
    live.write_bmp(_frame_file(state, f), state.frames[f].u8)


def ensure_frame(shot: str, f: int) -> bool:
    """Make frame ``f``'s file show the current edits; True if it had to be (re)computed."""
    state = _SHOTS.get(shot)
    if state is None or state.engine != "numpy" or not 0 <= f < state.n or f in state.valid:
        return False
    fr = state.frames.pop(f, None)
    if fr is None:
        fr = _compute(state, f)
    state.frames[f] = fr
    while len(state.frames) > CACHED_FRAMES:
        old, _ = state.frames.popitem(last=False)
    _write_frame(state, f)
    state.valid.add(f)
    for sc in bpy.data.scenes:
        touch(sc, shot)
    return True


def show_frame(scene: bpy.types.Scene) -> int:
    """Before the VSE draws ``scene``'s current frame: numpy previews of it compute it if it is
    not current. Returns how many were computed."""
    n = 0
    for key, state in list(_SHOTS.items()):
        if state.engine != "numpy":
            continue
        strip = preview_strip(scene, key)
        if strip is None or strip.mute:
            continue
        try:
            n += ensure_frame(key, int(scene.frame_current) - state.t0)
        except PreviewError as e:
            print(f"[neural_atlas] live preview: {e.message}")
    return n


@bpy.app.handlers.persistent
def on_frame_change(scene: bpy.types.Scene, *_args: Any) -> None:
    if _SHOTS and not (bpy.app.is_job_running("RENDER") and not bpy.app.background):
        show_frame(scene)  # (not from a UI render job's thread)


@atexit.register
def _remove_folders() -> None:
    for state in _SHOTS.values():
        if state.folder:
            shutil.rmtree(state.folder, ignore_errors=True)


# --------------------------------------------------------------------- API
def preview_strip(scene: bpy.types.Scene, shot: str) -> Optional[bpy.types.Strip]:
    for s in vse.all_strips(scene):
        if s.get(KEY) == shot:
            return s
    return None


def is_on(scene: bpy.types.Scene, job: NA_JobItem) -> bool:
    return preview_strip(scene, job.shot) is not None


ENGINES = ("auto", "numpy", "cycles")


def enable(scene: bpy.types.Scene, job: NA_JobItem, prefer_source: bool = False,
           engine: str = "auto") -> bpy.types.Strip:
    """Build the preview of ``job``'s shot and put it in the VSE above the source (replacing
    an earlier preview of the shot). Everything is checked before anything is created.
    ``engine``: ``numpy`` (image-sequence plates), ``cycles``, or ``auto`` (numpy where it can)."""
    if engine not in ENGINES:
        raise PreviewError(f"unknown preview engine {engine!r}", f"one of {', '.join(ENGINES)}")
    if job.kind != "decompose" or job.state != "done" or not job.out_dir:
        raise PreviewError(f"{job.label}: the decomposition is {job.state}", "Wait until it is done")
    maps = read_maps(job.out_dir, prefer_source)
    plate = plate_of(job.out_dir)
    if engine == "auto":
        engine = "cycles" if plate.movie else "numpy"
    elif engine == "numpy" and plate.movie:
        raise PreviewError("the numpy preview reads the plate's frames as files; this shot's source is a movie",
                           "Use the Cycles preview, or render the strip to a numbered image sequence")
    n = int(job.range_stop - job.range_start)
    if maps.frames != n:
        raise PreviewError(f"the maps have {maps.frames} frames, the shot {n}",
                           MAPS_HINT.format(out=job.out_dir))
    atlases = {int(i[images.KEY_LAYER]): i for i in images.job_images(job.shot, "atlas")}
    edits = {int(i[images.KEY_LAYER]): i for i in images.job_images(job.shot, "edit")}
    for m in maps.layers:
        if m.index not in atlases or m.index not in edits:
            raise PreviewError(f"layer {m.index} has no atlas or edit image in this file", "Use Load Atlases first")
        for img in (atlases[m.index], edits[m.index]):
            if tuple(img.size) != (m.atlas_size, m.atlas_size):
                raise PreviewError(f"'{img.name}' is {img.size[0]}x{img.size[1]}, the layer's atlas "
                                   f"{m.atlas_size}x{m.atlas_size}", "Use Load Atlases to bring it to the atlas size")
    opacity = per_frame(scene, job)  # LifetimeError: bad range/fades, before anything is made
    disable(scene, job)
    t0 = first_frame(job)
    if engine == "numpy":
        strip = _enable_numpy(scene, job, maps, plate, t0, n, atlases, edits, opacity)
    else:
        strip = _enable_cycles(scene, job, maps, plate, t0, n, atlases, edits, opacity)
    _remember(job, opacity)
    _arm_paint_poll()
    return strip


def _enable_cycles(scene: bpy.types.Scene, job: NA_JobItem, maps: Maps, plate: Plate, t0: int, n: int,
                   atlases: dict, edits: dict, opacity: dict) -> bpy.types.Strip:
    name = f"NA {job.label} preview"
    made: list[bpy.types.ID] = []
    try:
        plate_img = _load_sequence(plate.path, job.shot, f"{name} plate", n, plate.movie)
        made.append(plate_img)
        layers = []
        state = _Shot(job.shot, "cycles")
        for m in maps.layers:
            delta = bpy.data.images.new(f"{name} delta {m.index}", m.atlas_size, m.atlas_size, alpha=True,
                                        float_buffer=True, is_data=True)
            delta.colorspace_settings.name = "Non-Color"
            delta.alpha_mode = "CHANNEL_PACKED"
            _tag(delta, job.shot)
            state.layers[m.index] = _Layer(atlas_values(atlases[m.index]), edits[m.index].name, delta.name)
            st = _load_sequence(m.stmap, job.shot, f"{name} stmap {m.index}", n)
            rs = _load_sequence(m.residual, job.shot, f"{name} residual {m.index}", n)
            made += [delta, st, rs]
            layers.append((m, delta, st, rs))
        _SHOTS[job.shot] = state
        sync(job.shot)
        mat = _material(name, job.shot, maps, plate, plate_img, layers, t0, opacity)
        sc = _scene(name, job.shot, maps, t0, mat)

        def make(coll: Any, channel: int) -> bpy.types.Strip:
            return coll.new_scene(name=sc.name, scene=sc, channel=channel, frame_start=t0)

        strip = _place(scene, job, t0, n, make, (maps.width, maps.height))
        # the artist's shading, restored by disable when the last Cycles preview goes
        others = [o.get(KEY + "_shading") for o in vse.all_strips(scene) if o.get(KEY) and o != strip]
        strip[KEY + "_shading"] = next((v for v in others if v), str(scene.render.sequencer_gl_preview))
        scene.render.sequencer_gl_preview = "RENDERED"
    except BaseException:
        _SHOTS.pop(job.shot, None)
        _remove_tagged(job.shot)
        raise
    return strip


def _enable_numpy(scene: bpy.types.Scene, job: NA_JobItem, maps: Maps, plate: Plate, t0: int, n: int,
                  atlases: dict, edits: dict, opacity: dict) -> bpy.types.Strip:
    state = _Shot(job.shot, "numpy", folder=tempfile.mkdtemp(prefix="na_preview_"), maps=maps, plate=plate,
                  t0=t0, n=n, opacity={k: list(v) for k, v in opacity.items()})
    try:
        for m in maps.layers:
            T = atlas_values(atlases[m.index])
            state.layers[m.index] = _LiveLayer(m.index, T, edits[m.index].name, np.zeros_like(T),
                                               live.EditTracker(T.shape[0]))
        _SHOTS[job.shot] = state
        _sync_live(state)
        f = int(scene.frame_current) - t0
        f = f if 0 <= f < n else 0
        ensure_frame(job.shot, f)  # the frame on screen; others when they are shown
        src = vse.find_strip(scene, job.strip_name)
        colorspace = src.colorspace_settings.name if src is not None and hasattr(src, "colorspace_settings") \
            else "sRGB"

        def make(coll: Any, channel: int) -> bpy.types.Strip:
            s = coll.new_image(name=f"NA {job.label} preview", filepath=_frame_file(state, 0),
                               channel=channel, frame_start=t0, fit_method="ORIGINAL")
            for k in range(1, n):
                s.elements.append(os.path.basename(_frame_file(state, k)))
            return s

        strip = _place(scene, job, t0, n, make, (maps.width, maps.height))
        getattr(strip, "colorspace_settings").name = colorspace  # an ImageStrip
    except BaseException:
        _SHOTS.pop(job.shot, None)
        shutil.rmtree(state.folder, ignore_errors=True)
        for s in [s for s in vse.all_strips(scene) if s.get(KEY) == job.shot]:
            vse.top_level(scene.sequence_editor).remove(s)
        raise
    return strip


def _place(scene: bpy.types.Scene, job: NA_JobItem, t0: int, n: int, make: Any,
           size: tuple[int, int]) -> bpy.types.Strip:
    ed = vse.ensure_editor(scene)
    occ = vse.occupied(scene)
    top = max([c for c, s, e in occ if s < t0 + n and e > t0] + [int(job.src_channel)])
    channel = S.free_channel(occ, t0, t0 + n, above=top)
    with vse._CacheOff(ed):
        strip = make(vse.top_level(ed), channel)
        strip.frame_final_duration = n
    strip[KEY] = job.shot
    strip.blend_type = "REPLACE"
    W, H = size
    rx, ry = scene.render.resolution_x, scene.render.resolution_y
    if (W, H) != (rx, ry):  # show it over the source at the output size
        k = min(rx / W, ry / H)
        strip.transform.scale_x = strip.transform.scale_y = k
    return strip


def _remove_tagged(shot: str) -> None:
    for coll_name in _DATA:
        coll = getattr(bpy.data, coll_name)
        for idb in [d for d in coll if d.get(KEY) == shot]:
            coll.remove(idb)


def disable(scene: bpy.types.Scene, job: NA_JobItem) -> bool:
    """Remove the shot's preview strip and everything the preview made; True if there was one."""
    found = False
    for sc in bpy.data.scenes:
        for s in [s for s in vse.all_strips(sc) if s.get(KEY) == job.shot]:
            shading = s.get(KEY + "_shading")
            ed = sc.sequence_editor
            with vse._CacheOff(ed):
                vse.top_level(ed).remove(s)
            if shading and not any(o.get(KEY + "_shading") for o in vse.all_strips(sc)):
                sc.render.sequencer_gl_preview = shading
            found = True
    before = sum(1 for c in _DATA for d in getattr(bpy.data, c) if d.get(KEY) == job.shot)
    _remove_tagged(job.shot)
    _BAKED.pop(job.shot, None)
    state = _SHOTS.pop(job.shot, None)
    if state is not None and state.folder:
        shutil.rmtree(state.folder, ignore_errors=True)
    return found or before > 0


def refresh_opacity(scene: bpy.types.Scene, job: NA_JobItem) -> None:
    """Re-bake the per-frame opacity after the lifetime (range, fades, keyframes) changed."""
    opacity = per_frame(scene, job)
    _remember(job, opacity)
    n = int(job.range_stop - job.range_start)
    state = _SHOTS.get(job.shot)
    if state is not None and state.engine == "numpy":
        state.opacity = {k: list(v) for k, v in opacity.items()}
        state.frames.clear()
        state.valid.clear()
        show_frame(scene)
    for mat in bpy.data.materials:
        if mat.get(KEY) == job.shot and mat.node_tree is not None:
            nodes = _opacity_nodes(mat.node_tree)
            _bake_opacity(mat.node_tree, {i: (node, opacity.get(i, [1.0] * n)) for i, node in nodes.items()},
                          first_frame(job), job.shot, mat.name)
    touch(scene, job.shot)


def touch(scene: bpy.types.Scene, shot: Optional[str] = None) -> int:
    """Drop cached preview frames so the VSE draws new paint; returns the strips touched."""
    n = 0
    for s in vse.all_strips(scene):
        if s.get(KEY) and (shot is None or s.get(KEY) == shot):
            s.invalidate_cache("RAW")  # the strip's own frames (COMPOSITE would keep them)
            n += 1
    return n


def tagged(shot: str) -> Iterable[bpy.types.ID]:
    for c in _DATA:
        for d in getattr(bpy.data, c):
            if d.get(KEY) == shot:
                yield d


def engine_of(shot: str) -> Optional[str]:
    state = _SHOTS.get(shot)
    return None if state is None else state.engine


# ------------------------------------------------------------- live updates
_BAKED: dict[str, dict[int, list[float]]] = {}  # shot -> the per-frame opacity last baked


def _remember(job: NA_JobItem, opacity: dict[int, list[float]]) -> None:
    _BAKED[job.shot] = {k: list(v) for k, v in opacity.items()}


@bpy.app.handlers.persistent
def on_depsgraph_update(scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph) -> None:
    """Keep previews live: paint (an image update) drops the cached preview frames; a changed
    lifetime (range, fades, keyframes) re-bakes the per-frame opacity. Bounded work: nothing
    happens unless a preview exists."""
    from .props import settings

    from . import frame_paint

    if frame_paint._CANVASES and depsgraph.id_type_updated("IMAGE"):
        try:
            frame_paint.flush()  # strokes on a frame's canvas into the edit images (and the preview)
        except (PreviewError, ReferenceError):
            pass
    shots = {s.get(KEY): sc for sc in bpy.data.scenes for s in vse.all_strips(sc) if s.get(KEY)}
    if not shots:
        return
    if depsgraph.id_type_updated("IMAGE"):
        names = {u.id.original.name for u in depsgraph.updates if isinstance(u.id, bpy.types.Image)}
        try:
            sync(only=names or None)
        except PreviewError:
            pass  # Refresh reports it
    if not depsgraph.id_type_updated("SCENE"):
        return
    for shot, sc in shots.items():
        job = next((j for j in settings(sc).jobs if j.shot == shot and j.kind == "decompose"
                    and j.state == "done"), None)
        if job is None:
            continue
        try:
            now = per_frame(sc, job)
        except L.LifetimeError:
            continue  # the panel's Refresh reports it; keep the last good bake
        if now != _BAKED.get(shot):
            refresh_opacity(sc, job)


PAINT_POLL_S = 1.0


def paint_poll() -> Optional[float]:
    """GUI timer while a preview is on or a frame is being painted: strokes on a frame's canvas
    go into the edit images (``frame_paint.flush``); while an edit image has unsaved paint,
    turn changed edits into the preview (``sync`` is a checksum when nothing changed). Stops by
    itself when neither is left."""
    from . import frame_paint

    if not _SHOTS and not frame_paint._CANVASES:
        return None
    try:
        if frame_paint._CANVASES:
            frame_paint.flush()
        edits = [bpy.data.images.get(layer.edit) for st in _SHOTS.values() for layer in st.layers.values()]
        dirty = any(img is not None and img.is_dirty for img in edits)
        if dirty:
            sync()
    except (PreviewError, ReferenceError):
        pass
    return PAINT_POLL_S


def _arm_paint_poll() -> None:
    if not bpy.app.background and not bpy.app.timers.is_registered(paint_poll):
        bpy.app.timers.register(paint_poll, first_interval=PAINT_POLL_S)
