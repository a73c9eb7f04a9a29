"""A deterministic synthetic shot with exact ground truth: the demo clip and the test bed.

The shot
--------
A textured background seen through a moving camera (a slightly curved pan, a
gentle zoom-in and a small roll; the background texture is larger than the
frame and is revealed over the clip), with ``n_objects`` textured foreground
blobs (rounded, non-symmetric outlines) that translate, rotate and scale.
Everything is generated procedurally from ``seed``: the same arguments give
bit-identical frames.

Conventions
-----------
*Pixels.* Pixel (column j, row i) has its centre at the image point
(x = j, y = i), the engine's integer-pixel convention (x along columns, y
down rows). A point is "in the frame" when 0 <= x <= W-1 and 0 <= y <= H-1
(the span of pixel centres, where bilinear sampling of a frame is defined).

*Layers.* Layer k < K is object k (object 0 is the front-most; masks are
named ``object0``, ``object1``, ...), layer K is the background: the engine's
order (objects in sorted mask-folder order, background last). The objects are
composited back to front over the background.

*Texture space.* Each layer has its own texture image ``textures[k]``
(h_k, w_k, 3). Texture points are in texel units with the pixel convention:
texel (column c, row r) is centred at (c, r). ``tex_coords[k][t, i, j]`` is the
texture point seen at pixel (j, i) of frame t, defined for every pixel (the
motion of a layer is one global similarity transform per frame), whether the
layer is visible there or not. ``project`` maps texture points to image
points, ``unproject`` the reverse; ``transforms[t, k]`` is the 2x3 matrix of
``project``.

*Units.* Sizes and motions are given in units of the frame's short side
U = min(W, H), as totals over the whole clip, so a 1920x1080 clip of 100
frames is the same shot as the 128x72 clip of 24 frames, only sampled more
finely in space and time. The texture content is defined in the same units,
as noise octaves with wavelengths from 1.12 U down to 0.009 U; each size renders
only the octaves of at least 5 output pixels (0.07 U and up at U = 72, all of
them at U = 1080), and the soft edges of the discs in the textures span 3
output pixels: the texture is band-limited to the output resolution, so a
larger clip shows the same picture with finer grain. The default 128x72,
24-frame clip pans about 2 px per frame and moves the object about 1.7 px per
frame while it turns 30 degrees and grows 20 %.

Rendering
---------
Textures are rasterised once per layer from cubic B-spline noise at 10 texels
per wavelength of the finest rendered octave (at most 2 texels per frame pixel
and 4096 texels on the long side), so they are band-limited well below the
pixel Nyquist rate and bilinear sampling is accurate. Frames sample them with
``cv2.warpAffine`` (bilinear). OpenCV 4.x quantises its interpolation weights
to 1/32 texel, so a frame differs from an exact bilinear sample of its texture by
up to ~6e-3 (mean ~2e-4, largest at disc edges); OpenCV 5 measured ~1e-5. The
geometry (``tex_coords``, ``project``, masks) is exact either way. ``tex_coords`` are
float32 (about 1e-4 texel at 1080p); ``project``/``unproject`` work in float64.
Object edges are anti-aliased with an analytic coverage ``clip(0.5 - d, 0, 1)``
from the signed distance ``d`` (pixels) of the pixel centre to the outline; the
masks are crisp: ``coverage >= 0.5``, i.e. the pixel centre lies inside the
outline, and each object's mask is its *visible* part (what a segmenter would
give), so an object hidden behind a front object is not in its mask there.

Lighting
--------
``lighting=True`` (the default) adds a mild illumination change: each object's
brightness ramps linearly from x0.94 to x1.06 over the clip, and the
background is lit by a soft linear gradient (+-6 % across the frame) whose
direction turns by 90 degrees over the clip, fixed to the camera, so it slides
over the background texture. Frames are ``texture * gain`` with the gain of
``gain()``. It is on by default because real footage always has some, the
method's multiplicative residual exists to absorb it, and the change is small
enough that a decomposition without the residual still reconstructs the clip
well. The yardsticks this clip serves (mark drift, alpha IoU) are geometric
and unaffected; only comparing learned atlas colours with ``textures`` becomes
ambiguous (by the gain), which is why ``lighting=False`` exists. There are no
cast shadows: a dark blob moving with an object would legitimately be claimed
by the object's alpha and blur the alpha ground truth.
"""

from __future__ import annotations

import functools
import json
import zlib
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from ..clip import Clip

PathLike = Union[str, Path]

#: wavelengths (units of U) of the texture noise octaves, finest first; the coarse
#: structure uses the last ones, the fine grain the first ones
_OCTAVES = tuple(0.07 * 2.0 ** i for i in range(-3, 5))
#: an octave is rendered only when its wavelength is at least this many output pixels
_MIN_WAVELENGTH_PX = 5.0
#: padding of every texture beyond the region any frame can see, in U
_TEXTURE_PAD = 0.08
#: texture resolution: texels per wavelength of the finest rendered octave, capped at
#: 2 texels per frame pixel (at zoom 1) and 4096 texels on a texture's long side
_TEXELS_PER_WAVELENGTH = 10.0
_MAX_DENSITY = 2.0
_MAX_TEXELS = 4096
#: output range of the smooth squash applied to texture colours; with the
#: lighting gain (<= 1.06) frames stay inside (0, 1) and are never clipped
_COLOR_LO, _COLOR_HI = 0.02, 0.94
_LIGHT_AMPLITUDE = 0.06
#: width of the soft edge of texture discs, in output pixels (band-limits them)
_DISC_EDGE_PX = 3.0
#: pixels whose interpolated outline distance is this close to zero get the exact one
_MASK_BAND_PX = 0.5
_GT_FILE = "ground_truth.npz"


# ----------------------------------------------------------------------------- public API
class SyntheticScene:
    """A synthetic clip and its ground truth. Build with ``make_synthetic_clip`` or ``load``.

    Attributes
    ----------
    clip : Clip
        frames (F, H, W, 3) float32 in [0, 1], masks (F, H, W, K) float32 in {0, 1},
        mask_names ``["object0", ...]``, frame_names ``"00000.png", ...``.
    textures : list of (h_k, w_k, 3) float32 arrays, one per layer, background last.
    transforms : (F, L, 2, 3) float64, texture point -> image point per frame and layer.
    params : dict of the generation arguments (JSON-serialisable).
    """

    def __init__(self, clip: Clip, textures: list[np.ndarray], transforms: np.ndarray,
                 texture_origins: np.ndarray, texels_per_unit: np.ndarray, shapes: np.ndarray,
                 object_gain: np.ndarray, background_light: np.ndarray, params: dict) -> None:
        self.clip = clip
        self.textures = textures
        self.transforms = transforms
        self.params = params
        # texture point q of layer k <-> layer-local position origin[k] + q / texels_per_unit[k]
        # (units of U); for objects that is the outline's frame, centred on the object
        self._origins = texture_origins
        self._tpu = texels_per_unit
        self._shapes = shapes  # (K, 5): radius, a2, phase2, a3, phase3 of the outline
        self._object_gain = object_gain  # (F, K)
        self._background_light = background_light  # (F, 2): gain = 1 + light . normalised xy
        lin = transforms[..., :2]
        inv_lin = np.linalg.inv(lin)
        self._inverse = np.concatenate(
            [inv_lin, -np.einsum("...ij,...j->...i", inv_lin, transforms[..., 2])[..., None]], -1)

    # ------------------------------------------------------------------ sizes
    @property
    def n_layers(self) -> int:
        """Objects plus the background."""
        return self.transforms.shape[1]

    @property
    def n_objects(self) -> int:
        return self.n_layers - 1

    @property
    def background(self) -> int:
        """Index of the background layer (the last)."""
        return self.n_layers - 1

    # ------------------------------------------------------------------ geometry
    def project(self, layer: int, tex_xy: np.ndarray, t) -> np.ndarray:
        """Texture points (N, 2) of ``layer`` -> image points (N, 2) in frame(s) ``t``.

        ``t`` is a frame index or an (N,) array of frame indices (one per point).
        """
        return _apply(self.transforms[t, layer], tex_xy)

    def unproject(self, layer: int, image_xy: np.ndarray, t) -> np.ndarray:
        """Image points (N, 2) in frame(s) ``t`` -> texture points (N, 2) of ``layer``."""
        return _apply(self._inverse[t, layer], image_xy)

    def tex_coords_at(self, layer: int, t: int) -> np.ndarray:
        """(H, W, 2) float32: the texture point of ``layer`` seen at every pixel of frame ``t``."""
        h, w = self.clip.height, self.clip.width
        m = self._inverse[t, layer]
        xs = np.arange(w, dtype=np.float64)
        ys = np.arange(h, dtype=np.float64)[:, None]
        out = np.empty((h, w, 2), np.float32)
        out[..., 0] = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        out[..., 1] = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        return out

    @functools.cached_property
    def tex_coords(self) -> list[np.ndarray]:
        """Per layer (background last), (F, H, W, 2) float32 texture points of every pixel.

        Computed on first access (F*H*W*8 bytes per layer: 1.6 GB per layer for
        1920x1080x100; use ``tex_coords_at`` for one frame at a time).
        """
        return [np.stack([self.tex_coords_at(k, t) for t in range(self.clip.n_frames)])
                for k in range(self.n_layers)]

    def signed_distance(self, obj: int, image_xy: np.ndarray, t) -> np.ndarray:
        """(N,) signed distance in pixels from image points to object ``obj``'s outline in frame(s)
        ``t``: negative inside. First-order accurate (exact sign, approximate magnitude)."""
        m = self.transforms[t, obj][..., :2]
        px_per_texel = np.sqrt(np.abs(np.linalg.det(m)))
        local = self._origins[obj] + self.unproject(obj, image_xy, t) / self._tpu[obj]
        return _outline_distance(local, self._shapes[obj]) * px_per_texel * self._tpu[obj]

    def visible(self, layer: int, image_xy: np.ndarray, t, margin: float = 0.0) -> np.ndarray:
        """(N,) bool: image points of frame(s) ``t`` where ``layer`` is seen, at least ``margin``
        pixels from the frame's edge and from every layer boundary.

        An object is seen inside its outline where no object in front of it covers the point;
        the background where no object covers it.
        """
        xy = np.asarray(image_xy, np.float64)
        h, w = self.clip.height, self.clip.width
        ok = ((xy[:, 0] >= margin) & (xy[:, 0] <= w - 1 - margin)
              & (xy[:, 1] >= margin) & (xy[:, 1] <= h - 1 - margin))
        if layer < self.n_objects:
            ok &= self.signed_distance(layer, xy, t) <= -margin
        for front in range(min(layer, self.n_objects)):
            ok &= self.signed_distance(front, xy, t) > margin
        return ok

    def track(self, layer: int, tex_xy, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Where one texture point of ``layer`` appears in every frame.

        Returns ``(expected_xy (F, 2), visible (F,) bool)``, the inputs of
        ``yardsticks.mark_drift`` for a mark painted at that point.
        """
        n = self.clip.n_frames
        t = np.arange(n)
        q = np.broadcast_to(np.asarray(tex_xy, np.float64).reshape(1, 2), (n, 2))
        xy = self.project(layer, q, t)
        return xy, self.visible(layer, xy, t, margin)

    def gain(self, layer: int, image_xy: np.ndarray, t) -> np.ndarray:
        """(N,) illumination gain of ``layer`` at image points of frame(s) ``t`` (1 without
        lighting).

        Where ``layer`` is seen (away from anti-aliased edges), the frame is
        ``texture_k(tex point) * gain``.
        """
        xy = np.asarray(image_xy, np.float64)
        t = np.broadcast_to(np.asarray(t), xy.shape[:1])
        if layer < self.n_objects:
            return self._object_gain[t, layer].astype(np.float64)
        return 1.0 + np.sum(self._background_light[t] * self._normalised_xy(xy), axis=-1)

    def _normalised_xy(self, xy: np.ndarray) -> np.ndarray:
        h, w = self.clip.height, self.clip.width
        return (xy - [(w - 1) / 2, (h - 1) / 2]) / (max(w, h) / 2)

    def render(self, textures: list[np.ndarray]) -> np.ndarray:
        """(F, H, W, 3) float32 frames of this shot with other textures (one (h_k, w_k, 3)
        array per layer, same sizes as ``textures``), e.g. ground-truth textures with a
        painted mark: the result of a perfect decomposition's edit. Same lighting and
        anti-aliasing as the clip."""
        if [t.shape for t in textures] != [t.shape for t in self.textures]:
            raise ValueError("textures must match the scene's texture shapes "
                             f"{[t.shape for t in self.textures]}")
        frames = np.empty_like(self.clip.frames)
        _render_frames(self, [np.asarray(t, np.float32) for t in textures], frames, None)
        return frames

    # ------------------------------------------------------------------ I/O
    def write(self, folder: PathLike) -> Path:
        """Write the seed layout (``video_frames/%05d.png``, ``masks/object<k>/%05d.png``, 8-bit)
        and ``ground_truth.npz`` (transforms, textures, outline and lighting parameters and the
        generation arguments). ``load(folder)`` reads it back. Returns the folder.

        Rewriting a folder is allowed, but a PNG there that this clip would not overwrite
        (say, from a longer clip) raises ``FileExistsError``: the folder would no longer be
        one clip.
        """
        root = Path(folder)
        ours = set(self.clip.frame_names)
        for sub in [root / "video_frames", *sorted((root / "masks").glob("*"))]:
            mine = sub.name == "video_frames" or sub.name in self.clip.mask_names
            stale = sorted(p.name for p in sub.glob("*.png") if not mine or p.name not in ours)
            if stale:
                raise FileExistsError(f"{sub} holds frames of another clip ({stale[0]}, ...): "
                                      "write the synthetic clip to an empty folder")
        (root / "video_frames").mkdir(parents=True, exist_ok=True)
        for name in self.clip.mask_names:
            (root / "masks" / name).mkdir(parents=True, exist_ok=True)
        for t, name in enumerate(self.clip.frame_names):
            rgb = np.round(np.clip(self.clip.frames[t], 0.0, 1.0) * 255.0).astype(np.uint8)
            _imwrite(root / "video_frames" / name, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            for k, obj in enumerate(self.clip.mask_names):
                _imwrite(root / "masks" / obj / name,
                         np.where(self.clip.masks[t, ..., k] >= 0.5, 255, 0).astype(np.uint8))
        arrays = {f"texture_{k}": tex for k, tex in enumerate(self.textures)}
        np.savez(root / _GT_FILE, params=np.array(json.dumps(self.params)),
                 transforms=self.transforms, texture_origins=self._origins,
                 texels_per_unit=self._tpu, shapes=self._shapes, object_gain=self._object_gain,
                 background_light=self._background_light,
                 frame_names=np.array(self.clip.frame_names),
                 **arrays)
        return root


def load(folder: PathLike) -> SyntheticScene:
    """Read a folder written by ``SyntheticScene.write``: the clip from its PNGs (8-bit, so frames
    are quantised to 1/255) and the ground truth from ``ground_truth.npz``."""
    root = Path(folder)
    with np.load(root / _GT_FILE, allow_pickle=False) as gt:
        params = json.loads(str(gt["params"]))
        names = [str(n) for n in gt["frame_names"]]
        n_layers = gt["transforms"].shape[1]
        textures = [gt[f"texture_{k}"].astype(np.float32) for k in range(n_layers)]
        fields = {key: gt[key] for key in ("transforms", "texture_origins", "texels_per_unit",
                                           "shapes", "object_gain", "background_light")}
    frames = np.stack([cv2.cvtColor(_imread(root / "video_frames" / n, cv2.IMREAD_COLOR),
                                    cv2.COLOR_BGR2RGB) for n in names]).astype(np.float32) / 255.0
    mask_names = [f"object{k}" for k in range(n_layers - 1)]
    masks = np.stack([np.stack([_imread(root / "masks" / obj / n, cv2.IMREAD_GRAYSCALE) > 127
                                for obj in mask_names], -1) for n in names]).astype(np.float32)
    clip = _make_clip(frames, masks, params)
    return SyntheticScene(clip, textures, **fields, params=params)


def make_synthetic_clip(width: int = 128, height: int = 72, n_frames: int = 24, seed: int = 0,
                        n_objects: int = 1, lighting: bool = True, *,
                        pan: float = 0.6, zoom: float = 0.12, roll_deg: float = 2.0,
                        object_radius: float = 0.22, object_travel: float = 0.5,
                        object_rotation_deg: float = 30.0, object_scale_change: float = 0.2,
                        fps: float = 24.0) -> SyntheticScene:
    """Generate the synthetic shot. Lengths are in units of the short side U = min(width, height)
    and motions are totals over the clip (see the module docstring).

    pan: camera travel over the background (a slightly curved path, direction within 15 degrees
        of the long axis, sign from the seed).
    zoom: relative zoom-in of the camera (1 -> 1 + zoom).
    roll_deg: camera roll.
    object_radius: mean outline radius of one object (divided by sqrt(n_objects)); the
        outline reaches up to 1.28 times it.
    object_travel: translation of each object in the image along the long axis (plus a gentle
        bob across it of 0.04 U).
    object_rotation_deg: rotation of each object.
    object_scale_change: relative growth of each object (1 -> 1 + change, eased).
    """
    if min(width, height) < 16:
        raise ValueError(f"synthetic clip must be at least 16x16 pixels, got {width}x{height}")
    if n_frames < 1 or n_objects < 1 or seed < 0:
        raise ValueError(f"need n_frames >= 1, n_objects >= 1 and seed >= 0, "
                         f"got {n_frames}, {n_objects}, {seed}")
    params = dict(width=int(width), height=int(height), n_frames=int(n_frames), seed=int(seed),
                  n_objects=int(n_objects), lighting=bool(lighting), pan=float(pan),
                  zoom=float(zoom), roll_deg=float(roll_deg), object_radius=float(object_radius),
                  object_travel=float(object_travel),
                  object_rotation_deg=float(object_rotation_deg),
                  object_scale_change=float(object_scale_change), fps=float(fps))
    unit = float(min(width, height))
    tau = np.arange(n_frames) / max(n_frames - 1, 1)
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    half_frame = np.array([width, height]) / 2 / unit  # frame half-extent in U

    layers = [_object_layer(seed, k, n_objects, params, half_frame, tau) for k in range(n_objects)]
    layers.append(_background_layer(seed, params, half_frame, tau))
    textures, transforms, origins, tpus = [], [], [], []
    for layer in layers:
        finest = min(lam for lam in _OCTAVES if lam * unit >= _MIN_WAVELENGTH_PX)
        tpu = min(_TEXELS_PER_WAVELENGTH / finest, _MAX_DENSITY * unit,
                  _MAX_TEXELS / max(layer.size))
        shape = np.maximum(np.ceil(layer.size * tpu).astype(int), 2)  # (w, h) texels
        origin = layer.low + 0.5 / tpu  # layer-local position of texel (0, 0)
        textures.append(_render_texture(layer.painter, origin, tpu, shape, unit))
        # image = centre + unit * (offset + scale * rot @ local), local = origin + q / tpu
        lin = (unit * layer.scale / tpu)[:, None, None] * _rotation(layer.angle)
        rot = _rotation(layer.angle)
        trans = (centre + unit * layer.offset
                 + unit * layer.scale[:, None] * np.einsum("fij,j->fi", rot, origin))
        transforms.append(np.concatenate([lin, trans[..., None]], -1))
        origins.append(origin)
        tpus.append(tpu)
    transforms = np.stack(transforms, 1)

    object_gain = np.ones((n_frames, n_objects))
    background_light = np.zeros((n_frames, 2))
    if lighting:
        object_gain += _LIGHT_AMPLITUDE * (2 * tau - 1)[:, None]
        turn = _rng(seed, "light").uniform(0, 2 * np.pi) + 0.5 * np.pi * tau
        background_light = _LIGHT_AMPLITUDE * np.stack([np.cos(turn), np.sin(turn)], -1)
    shapes = np.array([layer.outline for layer in layers[:-1]]).reshape(n_objects, 5)

    scene = SyntheticScene(_make_clip(np.zeros((n_frames, height, width, 3), np.float32),
                                      np.zeros((n_frames, height, width, n_objects), np.float32),
                                      params),
                           textures, transforms, np.array(origins), np.array(tpus), shapes,
                           object_gain, background_light, params)
    _render_frames(scene, textures, scene.clip.frames, scene.clip.masks)
    return scene


# ----------------------------------------------------------------------------- layers
class _Layer:
    """One layer's motion (per frame) and texture recipe, in units of U.

    local point l -> image point centre + U * (offset[t] + scale[t] * R(angle[t]) @ l);
    the texture covers local points in [low, low + size].
    """

    def __init__(self, offset, scale, angle, low, size, painter, outline=None):
        self.offset, self.scale, self.angle = offset, scale, angle
        self.low, self.size = np.asarray(low, float), np.asarray(size, float)
        self.painter = painter
        self.outline = outline


def _background_layer(seed: int, p: dict, half_frame: np.ndarray, tau: np.ndarray) -> _Layer:
    rng = _rng(seed, "camera")
    long_axis = 0 if p["width"] >= p["height"] else 1
    heading = rng.uniform(-np.pi / 12, np.pi / 12) + (0.0 if long_axis == 0 else np.pi / 2)
    heading += np.pi * rng.integers(0, 2)
    roll_sign = rng.choice([-1.0, 1.0])

    def camera(s):
        """World point at the image centre, zoom and roll at clip times s in [0, 1]."""
        d = np.array([np.cos(heading), np.sin(heading)])
        perp = np.array([-d[1], d[0]])
        cam = p["pan"] * ((s - 0.5)[:, None] * d + 0.08 * np.sin(np.pi * s)[:, None] * perp)
        return cam, 1.0 + p["zoom"] * s, roll_sign * np.radians(p["roll_deg"]) * (s - 0.5)

    # region seen by any frame, from a dense sampling of the path (independent of n_frames)
    cam, z, roll = camera(np.linspace(0, 1, 257))
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half_frame
    world = cam[:, None] + np.einsum("sij,cj->sci", _rotation(-roll), corners) / z[:, None, None]
    low = world.reshape(-1, 2).min(0) - _TEXTURE_PAD
    size = world.reshape(-1, 2).max(0) + _TEXTURE_PAD - low
    cam, z, roll = camera(tau)
    # image = centre + U * z * R(roll) (w - cam)
    offset = -z[:, None] * np.einsum("fij,fj->fi", _rotation(roll), cam)
    painter = _BackgroundPainter(_rng(seed, "bg-texture"), low, size)
    return _Layer(offset, z, roll, low, size, painter)


def _object_layer(seed: int, k: int, n_objects: int, p: dict, half_frame: np.ndarray,
                  tau: np.ndarray) -> _Layer:
    rng = _rng(seed, "object", k)
    radius = p["object_radius"] / np.sqrt(n_objects) * rng.uniform(0.92, 1.08)
    outline = np.array([radius, rng.uniform(0.12, 0.2), rng.uniform(0, 2 * np.pi),
                        rng.uniform(0.04, 0.08), rng.uniform(0, 2 * np.pi)])
    long_axis = 0 if p["width"] >= p["height"] else 1
    along = np.zeros(2)
    along[long_axis] = 1.0
    across = along[::-1].copy()
    direction = rng.choice([-1.0, 1.0])
    # several objects: separate lanes across the frame, staggered along it as far as the
    # frame allows, all moving the same way, so they rarely overlap
    reach = radius * (1 + outline[1] + outline[3]) * (1 + max(p["object_scale_change"], 0))
    room = max(half_frame[long_axis] - p["object_travel"] / 2 - reach, 0.0)
    spread = (k + 0.5) / n_objects - 0.5
    lane = spread * 0.6
    stagger = spread * min(0.8, 2 * room) + rng.uniform(-0.05, 0.05)
    bob = 0.04 * np.sin(2 * np.pi * tau + rng.uniform(0, 2 * np.pi))
    offset = ((stagger + direction * p["object_travel"] * (tau - 0.5))[:, None] * along
              + (lane + bob)[:, None] * across)
    scale = 1.0 + p["object_scale_change"] * (0.5 - 0.5 * np.cos(np.pi * tau))
    angle = (rng.uniform(0, 2 * np.pi)
             + rng.choice([-1.0, 1.0]) * np.radians(p["object_rotation_deg"]) * tau)
    extent = radius * (1 + outline[1] + outline[3]) + _TEXTURE_PAD
    painter = _ObjectPainter(_rng(seed, "object-texture", k), extent)
    return _Layer(offset, scale, angle, [-extent, -extent], [2 * extent, 2 * extent],
                  painter, outline)


def _outline_distance(local: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Approximate signed distance (units of U) from local points (N, 2) to the outline
    r(phi) = R (1 + a2 cos(2 phi - p2) + a3 cos(3 phi - p3)); negative inside.

    It is the level set rho / r(phi) - 1 divided by its gradient's norm,
    (rho - r) / sqrt(1 + (r' / r)^2): exact sign, first-order exact at the outline, and
    about -r at the centre (no blow-up there).
    """
    radius, a2, p2, a3, p3 = shape
    x, y = local[..., 0], local[..., 1]
    rho = np.hypot(x, y)
    safe = np.maximum(rho, 1e-300)
    c1, s1 = np.where(rho > 0, x / safe, 1.0), y / safe  # cos, sin of the polar angle phi
    c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1  # of 2 phi, 3 phi (no trigonometry per point)
    c3, s3 = c1 * c2 - s1 * s2, s1 * c2 + c1 * s2
    r = radius * (1 + a2 * (c2 * np.cos(p2) + s2 * np.sin(p2))
                  + a3 * (c3 * np.cos(p3) + s3 * np.sin(p3)))
    dr = radius * (-2 * a2 * (s2 * np.cos(p2) - c2 * np.sin(p2))
                   - 3 * a3 * (s3 * np.cos(p3) - c3 * np.sin(p3)))
    return (rho - r) / np.sqrt(1 + (dr / r) ** 2)


# ----------------------------------------------------------------------------- rendering
def _render_frames(scene: SyntheticScene, textures: list[np.ndarray], frames: np.ndarray,
                   masks: Optional[np.ndarray]) -> None:
    """Fill ``frames`` (and ``masks`` unless None) by sampling ``textures`` back to front.

    Each object is drawn from an RGBA source: its texture plus, as a fourth channel, its
    outline's signed distance in texels, so one bilinear warp gives colour and coverage.
    The warped distance is accurate to a few hundredths of a pixel, plenty for the
    anti-aliasing; the masks are decided by the exact analytic distance
    (``signed_distance``) wherever the warped one is within ``_MASK_BAND_PX`` of zero, so they
    agree with ``visible()`` exactly.
    """
    n_frames, h, w = frames.shape[:3]
    bg = scene.background
    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    # normalised x repeated per channel, so the light gain multiplies (H, W*3) rows contiguously
    norm_x3 = np.repeat((xs - (w - 1) / 2) / (max(w, h) / 2), 3).astype(np.float32)
    norm_y = ((ys - (h - 1) / 2) / (max(w, h) / 2)).astype(np.float32)
    sources = [np.dstack([textures[k], _texel_distance(scene, k)])
               for k in range(scene.n_objects)]
    inside = np.zeros((h, w, scene.n_objects), bool)
    for t in range(n_frames):
        frame = frames[t]
        frame[:] = cv2.warpAffine(textures[bg], scene._inverse[t, bg], (w, h),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REPLICATE)
        light = scene._background_light[t]
        if light.any():
            frame.reshape(h, 3 * w)[:] *= ((1.0 + np.float32(light[1]) * norm_y)[:, None]
                                           + np.float32(light[0]) * norm_x3)
        inside[:] = False
        for k in reversed(range(scene.n_objects)):
            box = _object_box(scene, k, t)
            if box is None:
                continue
            x0, x1, y0, y1 = box
            m = scene._inverse[t, k].copy()
            m[:, 2] += m[:, :2] @ [x0, y0]
            rgbd = cv2.warpAffine(sources[k], m, (x1 - x0, y1 - y0),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REPLICATE)
            px_per_texel = np.float32(np.sqrt(abs(np.linalg.det(scene.transforms[t, k][:, :2]))))
            dist = rgbd[..., 3] * px_per_texel
            cover = np.clip(0.5 - dist, 0.0, 1.0)
            color = rgbd[..., :3] * np.float32(scene._object_gain[t, k])
            region = frame[y0:y1, x0:x1]
            region += cv2.merge([cover, cover, cover]) * (color - region)
            edge_rows, edge_cols = np.nonzero(np.abs(dist) < _MASK_BAND_PX)
            exact = scene.signed_distance(
                k, np.stack([edge_cols + x0, edge_rows + y0], -1).astype(np.float64), t)
            box_inside = dist <= 0
            box_inside[edge_rows, edge_cols] = exact <= 0
            inside[y0:y1, x0:x1, k] = box_inside
        if masks is not None:
            covered = np.zeros((h, w), bool)
            for k in range(scene.n_objects):
                masks[t, ..., k] = inside[..., k] & ~covered
                covered |= inside[..., k]


def _texel_distance(scene: SyntheticScene, k: int) -> np.ndarray:
    """(h_k, w_k) float32: object k's outline signed distance in texels at every texel."""
    th, tw = scene.textures[k].shape[:2]
    tpu = scene._tpu[k]
    gx, gy = np.meshgrid(np.arange(tw) / tpu, np.arange(th) / tpu)
    local = np.stack([gx, gy], -1) + scene._origins[k]
    return (_outline_distance(local, scene._shapes[k]) * tpu).astype(np.float32)


def _object_box(scene: SyntheticScene, k: int, t: int) -> Optional[tuple[int, int, int, int]]:
    """Pixel bounds [x0, x1) x [y0, y1) holding object ``k``'s anti-aliased outline in frame t."""
    radius, a2, _, a3, _ = scene._shapes[k]
    local_centre_q = -scene._origins[k] * scene._tpu[k]  # texture point of the local origin
    cx, cy = scene.project(k, local_centre_q[None], t)[0]
    px_per_unit = np.sqrt(abs(np.linalg.det(scene.transforms[t, k][:, :2]))) * scene._tpu[k]
    reach = radius * (1 + a2 + a3) * px_per_unit + 2.0
    h, w = scene.clip.height, scene.clip.width
    x0, x1 = max(0, int(np.floor(cx - reach))), min(w, int(np.ceil(cx + reach)) + 1)
    y0, y1 = max(0, int(np.floor(cy - reach))), min(h, int(np.ceil(cy + reach)) + 1)
    return None if x0 >= x1 or y0 >= y1 else (x0, x1, y0, y1)


def _make_clip(frames: np.ndarray, masks: np.ndarray, params: dict) -> Clip:
    n, h, w = frames.shape[:3]
    return Clip(frames=frames, masks=masks,
                mask_names=[f"object{k}" for k in range(masks.shape[-1])],
                frame_names=[f"{t:05d}.png" for t in range(n)],
                source=f"synthetic:seed={params['seed']}", source_size=(w, h),
                frame_range=(0, n), fps=params["fps"])


# ----------------------------------------------------------------------------- textures
class _Canvas:
    """A texture raster and the layer-local coordinates (units of U) of its texels."""

    def __init__(self, origin: np.ndarray, tpu: float, shape: np.ndarray, unit: float) -> None:
        self.unit = unit
        self.w, self.h = int(shape[0]), int(shape[1])
        self.x = origin[0] + np.arange(self.w) / tpu
        self.y = origin[1] + np.arange(self.h) / tpu

    def noise(self, rng: np.random.Generator, low: np.ndarray, size: np.ndarray,
              wavelengths, exponent: float = 0.5) -> np.ndarray:
        """Sum of smooth-noise octaves (amplitude ~ wavelength**exponent), cubic B-spline
        interpolated white noise on a lattice of half the wavelength.

        The random lattice of each octave covers the layer's region [low, low + size] (in U,
        independent of the output resolution), so the same seed gives the same content at
        every resolution. Octaves shorter than ``_MIN_WAVELENGTH_PX`` output pixels are
        skipped (their random numbers are still drawn); the sum is normalised by the
        variance of all octaves, so the others keep their amplitude at every size.
        """
        total = np.zeros((self.h, self.w), np.float32)
        variance = 0.0
        for lam in wavelengths:
            spacing = lam / 2
            n = np.ceil(size / spacing).astype(int) + 5
            lattice = rng.standard_normal((n[1], n[0])).astype(np.float32)
            amp = lam ** exponent
            variance += amp ** 2
            if lam * self.unit < _MIN_WAVELENGTH_PX:
                continue
            wx = _bspline_matrix((self.x - low[0]) / spacing + 2, n[0])
            wy = _bspline_matrix((self.y - low[1]) / spacing + 2, n[1])
            total += (amp / _BSPLINE_STD) * (wy @ (lattice @ wx.T))
        return total / np.float32(np.sqrt(variance))

    def discs(self, image: np.ndarray, centres, radii, colors, modulation: np.ndarray) -> None:
        """Paint discs (centres, radii in U) in place; disc colour times ``modulation`` (h, w)
        so the discs stay textured. Their edges are band-limited like the noise: a smoothstep
        over ``_DISC_EDGE_PX`` output pixels."""
        edge = _DISC_EDGE_PX / self.unit
        for (cx, cy), r, color in zip(centres, radii, colors):
            reach = r + edge
            c0, c1 = np.searchsorted(self.x, [cx - reach, cx + reach])
            r0, r1 = np.searchsorted(self.y, [cy - reach, cy + reach])
            if c0 >= c1 or r0 >= r1:
                continue
            d = np.hypot(self.x[c0:c1][None, :] - cx, self.y[r0:r1][:, None] - cy)
            a = _smoothstep(np.clip((r - d) / edge + 0.5, 0.0, 1.0)).astype(np.float32)[..., None]
            patch = image[r0:r1, c0:c1]
            patch += a * (np.asarray(color, np.float32) * modulation[r0:r1, c0:c1, None] - patch)


def _render_texture(painter, origin, tpu, shape, unit) -> np.ndarray:
    canvas = _Canvas(origin, tpu, shape, unit)
    image = painter(canvas)
    # smooth squash into [_COLOR_LO, _COLOR_HI]: slope 1 mid-range, no flat clipped areas
    mid, half = (_COLOR_LO + _COLOR_HI) / 2, (_COLOR_HI - _COLOR_LO) / 2
    return (mid + half * np.tanh((image - mid) / half)).astype(np.float32)


class _BackgroundPainter:
    """Natural-looking ground: cool/earthy palette blended by low-frequency noise, multi-octave
    luminance detail, and scattered soft-edged pebbles of varied colour."""

    def __init__(self, rng: np.random.Generator, low: np.ndarray, size: np.ndarray) -> None:
        self.rng, self.low, self.size = rng, low, size

    def __call__(self, canvas: _Canvas) -> np.ndarray:
        rng, low, size = self.rng, self.low, self.size
        base_hue = rng.uniform(0.2, 0.6)  # greens, teals, blues
        values = rng.permutation([0.3, 0.5, 0.65]) + rng.uniform(0, 0.15, 3)  # dark/mid/light
        palette = [_hsv(base_hue + rng.uniform(-0.1, 0.1), rng.uniform(0.25, 0.6), v)
                   for v in values]
        palette.append(_hsv(rng.uniform(0.05, 0.12), rng.uniform(0.2, 0.45),
                            rng.uniform(0.35, 0.6)))
        mix1 = _smoothstep(0.5 + 0.6 * canvas.noise(rng, low, size, _OCTAVES[5:], 0.8))
        mix2 = _smoothstep(0.5 + 0.6 * canvas.noise(rng, low, size, _OCTAVES[4:], 0.8))
        detail = canvas.noise(rng, low, size, _OCTAVES, 0.35)
        tint = canvas.noise(rng, low, size, _OCTAVES[4:6], 0.5)
        m1, m2 = mix1[..., None], mix2[..., None]
        image = (palette[0] * (1 - m1) + palette[1] * m1) * (1 - m2) + palette[2] * m2
        image = image + 0.12 * tint[..., None] * (palette[3] - palette[0])
        shade = 1.0 + 0.3 * detail
        image = (image * shade[..., None]).astype(np.float32)
        count = int(round(14 * size[0] * size[1]))
        centres = low + rng.uniform(0, 1, (count, 2)) * size
        radii = rng.uniform(0.03, 0.08, count)
        colors = [_hsv(base_hue + rng.uniform(-0.25, 0.25), rng.uniform(0.15, 0.5),
                       rng.uniform(0.25, 0.85)) for _ in range(count)]
        canvas.discs(image, centres, radii, colors, modulation=shade)
        return image


class _ObjectPainter:
    """A warm, saturated object texture: two-colour noise blend, warped stripes (show the
    rotation), small dark/bright spots and luminance detail; distinct from the background."""

    def __init__(self, rng: np.random.Generator, extent: float) -> None:
        self.rng = rng
        self.low, self.size = np.array([-extent, -extent]), np.array([2 * extent, 2 * extent])

    def __call__(self, canvas: _Canvas) -> np.ndarray:
        rng, low, size = self.rng, self.low, self.size
        hue = rng.uniform(-0.05, 0.12)  # reds, oranges, magentas
        palette = [_hsv(hue + rng.uniform(-0.04, 0.04), rng.uniform(0.6, 0.9),
                        rng.uniform(0.65, 0.9)),
                   _hsv(hue + rng.uniform(-0.08, 0.08), rng.uniform(0.5, 0.85),
                        rng.uniform(0.4, 0.6)),
                   _hsv(hue + 0.5 + rng.uniform(-0.1, 0.1), rng.uniform(0.3, 0.6),
                        rng.uniform(0.75, 0.9))]
        mix = _smoothstep(0.5 + 0.6 * canvas.noise(rng, low, size, _OCTAVES[4:7], 0.8))[..., None]
        warp = canvas.noise(rng, low, size, _OCTAVES[5:7], 0.8)
        detail = canvas.noise(rng, low, size, _OCTAVES, 0.35)
        angle = rng.uniform(0, np.pi)
        across = (np.cos(angle) * canvas.x[None, :] + np.sin(angle) * canvas.y[:, None])
        stripes = (0.5 + 0.5 * np.sin(2 * np.pi * across / 0.12 + 1.5 * warp))[..., None]
        image = palette[0] * (1 - mix) + palette[1] * mix
        image = image + 0.3 * stripes * (palette[2] - image)
        shade = 1.0 + 0.22 * detail
        image = (image * shade[..., None]).astype(np.float32)
        count = int(round(40 * size[0] * size[1]))
        centres = low + rng.uniform(0, 1, (count, 2)) * size
        radii = rng.uniform(0.02, 0.04, count)
        colors = [np.asarray(palette[1]) * 0.5 if rng.uniform() < 0.5 else
                  np.minimum(np.asarray(palette[2]) * 1.1, 1.0) for _ in range(count)]
        canvas.discs(image, centres, radii, colors, modulation=shade)
        return image


# ----------------------------------------------------------------------------- helpers
#: mean standard deviation of B-spline-interpolated unit white noise (averaged over phase)
_BSPLINE_STD = float(np.sqrt(np.mean([sum(w ** 2 for w in (
    (1 - f) ** 3 / 6, (3 * f ** 3 - 6 * f ** 2 + 4) / 6, (-3 * f ** 3 + 3 * f ** 2 + 3 * f + 1) / 6,
    f ** 3 / 6)) for f in np.linspace(0, 1, 64, endpoint=False)])))


def _bspline_matrix(coords: np.ndarray, n: int) -> np.ndarray:
    """(len(coords), n) float32 weights of cubic B-spline interpolation at lattice coordinates."""
    i = np.floor(coords).astype(int)
    f = coords - i
    weights = [(1 - f) ** 3 / 6, (3 * f ** 3 - 6 * f ** 2 + 4) / 6,
               (-3 * f ** 3 + 3 * f ** 2 + 3 * f + 1) / 6, f ** 3 / 6]
    out = np.zeros((len(coords), n), np.float32)
    rows = np.arange(len(coords))
    for k, wk in enumerate(weights):
        out[rows, np.clip(i - 1 + k, 0, n - 1)] += wk
    return out


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply 2x3 matrices (or one per point, (N, 2, 3)) to points (N, 2)."""
    xy = np.asarray(xy, np.float64)
    return np.einsum("...ij,...j->...i", m[..., :2], xy) + m[..., 2]


def _rotation(angle) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (hue wraps) -> RGB float32."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * (h % 1.0)) % 6.0
    return (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _rng(seed: int, stream: str, index: int = 0) -> np.random.Generator:
    """An independent random stream per purpose, so changing one part leaves the others."""
    return np.random.default_rng([int(seed), zlib.crc32(stream.encode()), int(index)])


def _imwrite(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def _imread(path: Path, flags: int) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        raise OSError(f"could not read {path}")
    return image
