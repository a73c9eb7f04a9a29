"""Apply edited atlases to the shot from the baked maps (no network evaluation).

Delta mode (the method's default, method.md 4.4):
    out = frame + sum_i o_i(f) * alpha_i * R_i * (E_i(uv_i) - T_i(uv_i))
so pixels whose layers were not painted stay bit-exact and painted content inherits the
plate's lighting through the residual. Replace mode: out = sum_i alpha_i * R_i * (T_i + o_i(f) D_i)(uv_i).
``o_i(f)`` in [0, 1] is edit layer i's opacity at frame f (its lifetime: fades, a frame range;
1 where not given), see :func:`parse_opacity`.

An edit image for layer i is read in one of three ways (docs/atlas.md):
  * RGBA whose alpha differs from the exported atlas's alpha: an edit layer; its alpha is
    coverage, blended over the atlas as E = T (1 - a) + rgb a (straight PNG alpha, so the
    delta a (rgb - T) is premultiplied before bilinear sampling);
  * RGBA whose alpha equals the exported atlas's alpha, or RGB: a painted copy of the atlas;
    texels that differ from the atlas (beyond the file's quantisation) are the edit.
Edit images of another size are resampled to their layer's atlas size S_i (bilinear, premultiplied;
each layer has its own size, docs/atlas.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from ..clip import load_clip, write_png, write_video
from ..errors import ClipError, ConfigError, NeuralAtlasError
from ..progress import CancelToken, Progress, ProgressFn, null_progress
from ..export.atlas import sample_atlas


@dataclass
class Bake:
    folder: Path
    report: dict
    meta: dict
    atlases: list[np.ndarray]  # (S, S, 3) float32
    seen: list[np.ndarray]  # (S, S) float32

    @property
    def n_layers(self) -> int:
        return int(self.meta["layers"])

    def uv(self, i: int) -> np.ndarray:
        return np.load(self.folder / f"layer_{i}_uv.npy", mmap_mode="r")

    def alpha(self, i: int) -> np.ndarray:
        return np.load(self.folder / f"layer_{i}_alpha.npy", mmap_mode="r")

    def residual(self, i: int) -> np.ndarray:
        return np.load(self.folder / f"layer_{i}_residual.npy", mmap_mode="r")


def load_bake(result_dir: str | Path) -> Bake:
    root = Path(result_dir)
    rep, meta = root / "report.json", root / "bake" / "meta.json"
    if not rep.exists() or not meta.exists():
        raise NeuralAtlasError(f"{root} is not a finished decomposition (report.json or bake/ missing); "
                               "run `decompose` (or `render` to re-export from a checkpoint) first")
    report = json.loads(rep.read_text(encoding="utf-8"))
    m = json.loads(meta.read_text(encoding="utf-8"))
    if not m.get("maps", True):
        raise NeuralAtlasError(f"{root} was exported without its per-frame maps (export.bake = false), "
                               f"which edits render from; add them with `python -m backend render {root} --bake`")
    n = int(m["layers"])
    atlases = [np.load(root / "bake" / f"atlas_{i}.npy") for i in range(n)]
    seen = [np.load(root / "bake" / f"atlas_{i}_seen.npy") for i in range(n)]
    return Bake(root / "bake", report, m, atlases, seen)


def _read_any(path: Path) -> tuple[np.ndarray, int]:
    """Image as float32 (H, W, C) in [0,1] with its channel order RGB(A), and its bit depth."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ClipError(f"cannot read edit image {path} (missing, unreadable or not an image)")
    bits = 16 if raw.dtype == np.uint16 else 8
    img = raw.astype(np.float32) / (65535.0 if bits == 16 else 255.0)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] == 3:
        img = img[..., ::-1]
    elif img.shape[2] == 4:
        img = img[..., [2, 1, 0, 3]]
    return np.ascontiguousarray(img), bits


def edit_delta(edit: np.ndarray, bits: int, atlas: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """The premultiplied edit delta D = E - T (S, S, 3) for one layer (see module docstring)."""
    S = atlas.shape[0]
    q = 65535.0 if bits == 16 else 255.0
    if edit.shape[2] == 4:
        rgb, a = edit[..., :3], edit[..., 3:4]
        if rgb.shape[:2] != (S, S):
            pm = cv2.resize(np.concatenate([rgb * a, a], -1), (S, S), interpolation=cv2.INTER_LINEAR)
            rgb_pm, a = pm[..., :3], pm[..., 3:4]
        else:
            rgb_pm = rgb * a
        seen_q = np.round(seen * q) / q
        if a.shape[:2] == seen.shape and np.abs(a[..., 0] - seen_q).max() <= 1.0 / q:
            edit = np.concatenate([rgb, np.ones_like(a)], -1)  # a painted copy of the exported atlas
        else:
            return (rgb_pm - a * atlas).astype(np.float32)
    rgb = edit[..., :3]
    if rgb.shape[:2] != (S, S):
        rgb = cv2.resize(rgb, (S, S), interpolation=cv2.INTER_LINEAR)
        changed = np.ones((S, S, 1), bool)
    else:
        # the atlas as a file of this depth stores it; one level of slack absorbs rounding
        # differences between tools (and 16 -> 8 bit conversions of the exported atlas)
        ref = np.round(atlas * q) / q
        changed = (np.abs(rgb - ref) > 1.0 / q + 1e-7).any(-1, keepdims=True)
    return np.where(changed, rgb - atlas, 0.0).astype(np.float32)


def parse_opacity(spec, n_layers: int, n_frames: int,
                  layer_names: Optional[Sequence[str]] = None) -> dict[int, np.ndarray]:
    """Per-frame opacity of edit layers -> {layer: (F,) float32}.

    ``spec`` maps a layer index (int or its decimal string) to either a list of one value per
    frame of the decomposition (0-based) or a map {frame: value} where missing frames are 1.
    Every value must be a number in [0, 1]. Raises ConfigError naming the problem."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ConfigError('opacity must map layer indices to a list of per-frame values or a {"frame": value} map, '
                          f'e.g. {{"0": [1.0, 0.5, ...]}}; got {type(spec).__name__}')
    names = f" ({', '.join(layer_names)})" if layer_names else ""
    out: dict[int, np.ndarray] = {}
    for key, values in spec.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"opacity: layer keys must be layer indices, got {key!r}") from None
        if not 0 <= layer < n_layers:
            raise ConfigError(f"opacity names layer {layer}; this decomposition has layers 0..{n_layers - 1}{names}")
        where = f"opacity of layer {layer}"
        if isinstance(values, dict):
            o = np.ones(n_frames, np.float32)
            for fk, v in values.items():
                try:
                    f = int(fk)
                except (TypeError, ValueError):
                    raise ConfigError(f"{where}: frame keys must be frame indices, got {fk!r}") from None
                if not 0 <= f < n_frames:
                    raise ConfigError(f"{where} names frame {f}; the shot has frames 0..{n_frames - 1}")
                o[f] = _opacity_value(v, f"{where} at frame {f}")
        elif isinstance(values, (list, tuple)):
            if len(values) != n_frames:
                raise ConfigError(f"{where} has {len(values)} values; the shot has {n_frames} frames "
                                  "(one value per frame, from frame 0)")
            o = np.array([_opacity_value(v, f"{where} at frame {f}") for f, v in enumerate(values)], np.float32)
        else:
            raise ConfigError(f'{where} must be a list of {n_frames} values or a {{"frame": value}} map, '
                              f"got {type(values).__name__}")
        out[layer] = o
    return out


def _opacity_value(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ConfigError(f"{where} is {v!r}; opacity must be a number in [0, 1]")
    return float(v)


def _parse_range(frame_range, n: int) -> tuple[int, int]:
    if frame_range is None:
        return 0, n
    a, b = frame_range
    a = 0 if a is None else int(a)
    b = n if b is None else int(b)
    if not (0 <= a < b <= n):
        raise ConfigError(f"edit frame range {a}:{b} is outside the decomposed clip's 0:{n}")
    return a, b


class EditRenderer:
    """Edited frames of a decomposition, one at a time (see :func:`render_edit`)."""

    def __init__(self, result_dir: str | Path, edits: dict[int, str | Path] | dict[int, np.ndarray],
                 mode: str = "delta", resolution: str = "working",
                 device: str | torch.device = "cpu", opacity: Optional[dict] = None) -> None:
        if mode not in ("delta", "replace"):
            raise ConfigError(f"edit mode must be 'delta' or 'replace', got {mode!r}")
        if resolution not in ("working", "source"):
            raise ConfigError(f"resolution must be 'working' or 'source', got {resolution!r}")
        self.mode, self.resolution = mode, resolution
        self.bake = bake = load_bake(result_dir)
        N = bake.n_layers
        for k in edits:
            if not (0 <= int(k) < N):
                raise ConfigError(f"layer {k} does not exist; this decomposition has layers 0..{N - 1} "
                                  f"({', '.join(l['name'] for l in bake.report['layers'])})")
        self.opacity = parse_opacity(opacity, N, int(bake.meta["frames"]),
                                     [l["name"] for l in bake.report["layers"]])
        self.device = dev = torch.device(device)
        self.deltas: dict[int, torch.Tensor] = {}
        for k, src in edits.items():
            if isinstance(src, np.ndarray):  # an in-memory RGBA edit layer, float in [0, 1]
                img, bits = np.asarray(src, np.float32), 16
            else:
                img, bits = _read_any(Path(src))
            delta = edit_delta(img, bits, bake.atlases[int(k)], bake.seen[int(k)])
            self.deltas[int(k)] = torch.from_numpy(delta).to(dev)
        self.atlases = [torch.from_numpy(a).to(dev) for a in bake.atlases]
        info = bake.report["clip"]
        long_edge = max(info["width"], info["height"]) if resolution == "working" else 1 << 30
        self.clip = clip = load_clip(info["source"], masks=[], frame_range=tuple(info["frame_range"]),
                                     long_edge=long_edge)
        if clip.n_frames != bake.meta["frames"]:
            raise ClipError(f"the source {info['source']} now has {clip.n_frames} frames in the decomposed "
                            f"range, the decomposition {bake.meta['frames']}; it changed since decomposing")
        if resolution == "working" and clip.fingerprint() != info["fingerprint"]:
            raise ClipError(f"the source {info['source']} changed since it was decomposed; decompose it again")
        self.fps = float(clip.fps or bake.report["config"]["export"]["video_fps"])
        self._scaled = (clip.height, clip.width) != (bake.meta["height"], bake.meta["width"])

    @property
    def n_frames(self) -> int:
        return self.clip.n_frames

    def _maps(self, i: int, f: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, dev = self.bake, self.device
        uv = torch.from_numpy(np.array(b.uv(i)[f])).to(dev)
        a = torch.from_numpy(np.array(b.alpha(i)[f], dtype=np.float32)).to(dev)
        r = torch.from_numpy(np.array(b.residual(i)[f], dtype=np.float32)).to(dev)
        if self._scaled:
            H, W = self.clip.height, self.clip.width
            stack = torch.cat([uv, a[..., None], r], -1).permute(2, 0, 1)[None]
            stack = F.interpolate(stack, size=(H, W), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
            uv, a, r = stack[..., :2], stack[..., 2], stack[..., 3:]
        return uv, a, r

    def _fused(self) -> bool:
        """The one-pass Triton kernel applies to 8-bit sources in delta mode on a GPU."""
        from .fused import triton
        return (triton is not None and self.device.type == "cuda" and self.mode == "delta"
                and self.clip.frame_data.dtype == np.uint8)

    def layer_opacity(self, i: int, f: int) -> float:
        """Edit layer ``i``'s opacity at frame ``f`` (1 where no opacity was given)."""
        o = self.opacity.get(i)
        return 1.0 if o is None else float(o[f])

    def frame(self, f: int, edited: bool = True) -> np.ndarray:
        """Frame ``f`` (H, W, 3) float32 in [0, 1], with the edit when ``edited``."""
        # layers whose edit is faded out at this frame add nothing: skipped
        live = [i for i in sorted(self.deltas) if self.layer_opacity(i, f) > 0.0]
        if not edited or (not live and self.mode == "delta"):
            return self.clip.frames[f]
        if self._fused():
            from .fused import composite_delta
            maps = [self._maps(i, f) for i in live]
            out = composite_delta(torch.from_numpy(np.array(self.clip.frames_uint8(f, f + 1)[0])).to(self.device),
                                  torch.stack([m[0] for m in maps]), torch.stack([m[1] for m in maps]),
                                  torch.stack([m[2] for m in maps]), [self.deltas[i] for i in live],
                                  opacity=torch.tensor([self.layer_opacity(i, f) for i in live]))
            return out.cpu().numpy().astype(np.float32) / 255.0
        frame = torch.from_numpy(self.clip.frames[f]).to(self.device)
        if self.mode == "delta":
            result = frame.clone()
            for i in live:
                uv, a, r = self._maps(i, f)
                o = self.layer_opacity(i, f)
                result += (a if o == 1.0 else a * o)[..., None] * r * sample_atlas(self.deltas[i], uv)
        else:
            result = torch.zeros_like(frame)
            for i in range(self.bake.n_layers):
                uv, a, r = self._maps(i, f)
                tex = self.atlases[i]
                if i in live:
                    o = self.layer_opacity(i, f)
                    tex = tex + (self.deltas[i] if o == 1.0 else self.deltas[i] * o)
                result += a[..., None] * r * sample_atlas(tex, uv)
        return result.clamp(0, 1).cpu().numpy()


def render_edit(result_dir: str | Path, edits: dict[int, str | Path], mode: str = "delta",
                frame_range: Optional[Sequence[Optional[int]]] = None, out: str | Path | None = None,
                formats: Iterable[str] = ("png", "mp4"), resolution: str = "working",
                progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                device: str | torch.device = "cpu", opacity: Optional[dict] = None) -> dict:
    """Render the shot with edited atlases; returns {"frames_dir", "video", "n_frames", ...}.

    ``edits`` maps layer index -> edit image. ``frame_range`` (start, stop) limits where the
    edit applies (other frames are written unchanged). ``resolution``: ``working`` renders at
    the decomposition's size; ``source`` applies the edit to the source frames at their own
    size (baked maps are upsampled), so untouched pixels are the source's exactly. ``opacity``:
    per edit layer its opacity per frame (:func:`parse_opacity`), multiplying that layer's delta.
    """
    progress = progress or null_progress
    cancel = cancel or CancelToken()
    formats = tuple(formats)
    bad = [f for f in formats if f not in ("png", "mp4")]
    if bad or not formats:
        raise ConfigError(f"formats must be a non-empty subset of png, mp4; got {formats}")
    r = EditRenderer(result_dir, edits, mode, resolution, device, opacity=opacity)
    a0, a1 = _parse_range(frame_range, r.n_frames)
    out_dir = Path(out) if out is not None else Path(result_dir) / "edit"
    frames_dir = out_dir / "frames"

    def frames():
        for f in range(r.n_frames):
            cancel.raise_if_cancelled()
            img = r.frame(f, edited=a0 <= f < a1)
            if "png" in formats:
                write_png(frames_dir / f"{f:05d}.png", img)
            progress(Progress("render", fraction=(f + 1) / r.n_frames, message=f"frame {f + 1}/{r.n_frames}"))
            yield img

    info = {"n_frames": r.n_frames, "width": r.clip.width, "height": r.clip.height, "fps": r.fps,
            "mode": mode, "frame_range": [a0, a1], "layers": sorted(r.deltas), "resolution": resolution,
            "opacity_layers": sorted(r.opacity)}
    if "mp4" in formats:
        info["video"] = str(write_video(out_dir / "edited.mp4", frames(), r.fps))
    else:
        for _ in frames():
            pass
    if "png" in formats:
        info["frames_dir"] = str(frames_dir)
    return info
