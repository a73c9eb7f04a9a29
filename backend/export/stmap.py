"""Per-frame maps as EXR image sequences in the STMap convention (docs/atlas.md, "STMaps").

For every layer i and frame f of a decomposition:

* ``<folder>/layer_<i>/stmap.%05d.exr``: 32-bit float RGBA, R = s = (u + 1) / 2,
  G = t = (1 - v) / 2, B = 0, A = the layer's alpha. (s, t) is the Nuke STMap / Blender Map UV
  convention: the atlas image's bottom-left corner is (0, 0), t grows upwards. With the atlas's
  texel centres, ``s * S - 0.5`` is the texel column and ``(1 - t) * S - 0.5`` the row counted
  from the top of the atlas PNG.
* ``<folder>/layer_<i>/residual.%05d.exr``: half float RGB, the residual gain R_i.
* ``<folder>/meta.json``: sizes, layers (with each layer's own atlas size), patterns, the
  convention and the colour rule. It is written last: a folder without it is incomplete.

``folder`` is ``maps`` (the decomposition's working resolution) or ``maps_source`` (the
source resolution; the maps are upsampled bilinearly with the pixel-centre convention, as a
source-resolution edit render does). The values are the bake's exactly (A is the bake's
half-float alpha), so an edit composited from these maps is the backend's render.

Writer: the ``OpenEXR`` package (ZIP compression for the float STMap, PIZ for the half
residual: the fastest lossless pair measured, see docs/benchmarks.md), or OpenCV's EXR codec
where OpenEXR is not installed and the OpenCV build has one. Both are optional imports.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..clip import write_json
from ..clip.writers import replacing
from ..errors import OutputError

#: Config value (``export.maps``) -> folder, and the choices.
MAP_FOLDERS = {"working": "maps", "source": "maps_source"}
MAP_CHOICES = ("working", "source", "none")
STMAP_PATTERN = "layer_{layer}/stmap.%05d.exr"
RESIDUAL_PATTERN = "layer_{layer}/residual.%05d.exr"
COLOUR = "raw encoded plate values, load every map as Non-Color"
CONVENTION = ("STMap: R = s = (u+1)/2, G = t = (1-v)/2, B = 0, A = the layer's alpha; (s, t) = (0, 0) "
              "is the bottom-left corner of the atlas image, t grows upwards (Nuke STMap, Blender Map UV). "
              "Texel column = s*S - 0.5, row from the top of the atlas PNG = (1-t)*S - 0.5 "
              "(S = that layer's atlas size); u, v as in the atlas convention")
INSTALL_HINT = "pip install OpenEXR"


# --------------------------------------------------------------- convention
def stmap_from_uv(uv: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W, 2) uv in [-1, 1] and (H, W) alpha -> (H, W, 4) float32 RGBA STMap."""
    uv = np.asarray(uv, np.float32)
    out = np.empty(uv.shape[:-1] + (4,), np.float32)
    out[..., 0] = (uv[..., 0] + np.float32(1.0)) * np.float32(0.5)
    out[..., 1] = (np.float32(1.0) - uv[..., 1]) * np.float32(0.5)
    out[..., 2] = 0.0
    out[..., 3] = alpha
    return out


def uv_from_stmap(stmap: np.ndarray) -> np.ndarray:
    """Inverse of :func:`stmap_from_uv` for the uv channels: (..., >=2) s, t -> (..., 2) u, v."""
    st = np.asarray(stmap, np.float32)
    return np.stack([st[..., 0] * 2.0 - 1.0, 1.0 - st[..., 1] * 2.0], -1).astype(np.float32)


# ------------------------------------------------------------------ writing
def exr_library() -> Optional[str]:
    """``"openexr"`` or ``"opencv"``: the EXR writer this process can use; None when neither."""
    try:
        import OpenEXR  # noqa: F401
        return "openexr"
    except ImportError:
        pass
    os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")  # read at OpenCV's first EXR call
    import cv2
    try:
        return "opencv" if cv2.haveImageWriter("probe.exr") else None
    except cv2.error:
        return None


def require_exr_library(what: str = "the EXR maps") -> str:
    lib = exr_library()
    if lib is None:
        raise OutputError(f"{what} need an EXR writer: neither the OpenEXR package nor an OpenCV with "
                          f"its EXR codec is installed here ({INSTALL_HINT}); or set export.maps = \"none\"")
    return lib


def library_version(lib: str) -> str:
    if lib == "openexr":
        import OpenEXR
        return f"OpenEXR {getattr(OpenEXR, '__version__', '?')}"
    import cv2
    return f"OpenCV {cv2.__version__}"


def write_exr(path: Path, image: np.ndarray, half: bool, lib: str, compression: str = "zip") -> Path:
    """Write an (H, W, 3|4) RGB(A) image as a scanline EXR (float32 or half), atomically."""
    img = np.asarray(image)
    names = "RGBA"[: img.shape[2]]
    dtype = np.float16 if half else np.float32
    with replacing(path, "EXR map") as tmp:
        if lib == "openexr":
            import OpenEXR
            comp = {"zip": OpenEXR.ZIP_COMPRESSION, "piz": OpenEXR.PIZ_COMPRESSION,
                    "none": OpenEXR.NO_COMPRESSION}[compression]
            channels = {n: np.ascontiguousarray(img[..., k], dtype=dtype) for k, n in enumerate(names)}
            with OpenEXR.File({"compression": comp, "type": OpenEXR.scanlineimage}, channels) as f:
                f.write(str(tmp))
        else:
            import cv2
            comp = {"zip": cv2.IMWRITE_EXR_COMPRESSION_ZIP, "piz": cv2.IMWRITE_EXR_COMPRESSION_PIZ,
                    "none": cv2.IMWRITE_EXR_COMPRESSION_NO}[compression]
            order = [2, 1, 0, 3][: img.shape[2]]  # OpenCV stores BGR(A)
            kind = cv2.IMWRITE_EXR_TYPE_HALF if half else cv2.IMWRITE_EXR_TYPE_FLOAT
            data = np.ascontiguousarray(img[..., order], dtype=np.float32)
            if not cv2.imwrite(str(tmp), data, [cv2.IMWRITE_EXR_TYPE, kind, cv2.IMWRITE_EXR_COMPRESSION, comp]):
                raise OutputError(f"OpenCV could not write the EXR map {path}")
    return path


def read_exr(path: Path) -> np.ndarray:
    """An EXR map written here as (H, W, C) float32, channels in RGB(A) order."""
    lib = require_exr_library("reading EXR maps")
    if lib == "openexr":
        import OpenEXR
        with OpenEXR.File(str(path), separate_channels=True) as f:
            ch = f.channels()
            names = [n for n in "RGBA" if n in ch]
            return np.stack([np.asarray(ch[n].pixels, np.float32) for n in names], -1)
    import cv2
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise OutputError(f"cannot read the EXR map {path}")
    img = img.astype(np.float32)
    return img[..., [2, 1, 0, 3][: img.shape[2]]] if img.ndim == 3 else img[..., None]


# ------------------------------------------------------------ map sequences
def maps_to_host(uv, alpha, residual, size: Optional[tuple[int, int]] = None):
    """One frame's maps (torch (N, h, w, 2), (N, h, w), (N, h, w, 3), any device) as the host
    arrays the files hold: uv float32, alpha float32 holding the bake's half-float values,
    residual float16; with ``size`` (W, H) upsampled first (bilinear, pixel centres: the
    source-resolution edit render's own upsampling)."""
    import torch
    a = alpha.to(torch.float16).float()
    r = residual.to(torch.float16).float()
    uv = uv.float()
    if size is not None and (size[1], size[0]) != tuple(uv.shape[1:3]):
        from ..edit.fused import upsample_maps
        uv, a, r = upsample_maps(uv, a, r, (size[1], size[0]))
    return uv.cpu().numpy(), a.cpu().numpy(), r.to(torch.float16).cpu().numpy()


_OURS = re.compile(r"^(stmap|residual)\.(\d{5})\.exr$")


class MapSequenceWriter:
    """Writes one resolution's maps (``maps/`` or ``maps_source/``) frame by frame as jobs for the
    export's writer pool; :meth:`finish` removes stale files and writes ``meta.json``."""

    def __init__(self, out_dir: Path, resolution: str, n_layers: int, n_frames: int,
                 size: tuple[int, int]) -> None:
        if resolution not in MAP_FOLDERS:
            raise ValueError(f"map resolution must be one of {', '.join(MAP_FOLDERS)}, got {resolution!r}")
        self.lib = require_exr_library()
        self.root = Path(out_dir)
        self.resolution = resolution
        self.folder = self.root / MAP_FOLDERS[resolution]
        self.n_layers, self.n_frames = n_layers, n_frames
        self.width, self.height = size
        (self.folder / "meta.json").unlink(missing_ok=True)  # incomplete until finish()
        for i in range(n_layers):
            (self.folder / f"layer_{i}").mkdir(parents=True, exist_ok=True)

    def jobs(self, f: int, uv: np.ndarray, alpha: np.ndarray, residual: np.ndarray) -> list[Callable]:
        """Write jobs for frame ``f`` from :func:`maps_to_host`'s arrays: ``uv`` (N, H, W, 2),
        ``alpha`` (N, H, W), ``residual`` (N, H, W, 3)."""
        out = []
        for i in range(self.n_layers):
            st_path = self.folder / (STMAP_PATTERN.format(layer=i) % f)
            res_path = self.folder / (RESIDUAL_PATTERN.format(layer=i) % f)
            out.append(lambda p=st_path, u=uv[i], a=alpha[i]: write_exr(p, stmap_from_uv(u, a), False, self.lib, "zip"))
            out.append(lambda p=res_path, r=residual[i]: write_exr(p, r, True, self.lib, "piz"))
        return out

    def finish(self, layers: Sequence[dict]) -> Path:
        """Remove files of earlier exports this one did not write, then write ``meta.json``.

        ``layers``: per layer ``{"index", "name", "kind", "atlas", "atlas_size"}``."""
        remove_stale_maps(self.folder, self.n_layers, self.n_frames)
        meta = {
            "frames": self.n_frames, "width": self.width, "height": self.height,
            "resolution": self.resolution, "layers": [dict(l) for l in layers],
            "stmap": STMAP_PATTERN, "residual": RESIDUAL_PATTERN, "frame_numbers": "0-based decomposition "
            "frame index, 5 digits, as frames/", "convention": CONVENTION, "colour": COLOUR,
            "channels": {"stmap": "RGBA float32: s, t, 0, alpha", "residual": "RGB half: the residual gain R"},
            "writer": library_version(self.lib), "compression": {"stmap": "zip", "residual": "piz"},
        }
        return write_json(self.folder / "meta.json", meta)


def remove_stale_maps(folder: Path, n_layers: int = 0, n_frames: int = 0) -> None:
    """Delete the map files in ``folder`` of layers >= ``n_layers`` or frames >= ``n_frames``
    (everything with 0, 0, and meta.json then too); only files named as this module names them."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if n_layers == 0:
        (folder / "meta.json").unlink(missing_ok=True)
    for d in folder.glob("layer_*"):
        m = re.fullmatch(r"layer_(\d+)", d.name)
        if not (m and d.is_dir()):
            continue
        layer = int(m.group(1))
        for p in d.iterdir():
            mm = _OURS.match(p.name)
            if mm and (layer >= n_layers or int(mm.group(2)) >= n_frames):
                p.unlink()
        if layer >= n_layers and not any(d.iterdir()):
            d.rmdir()
    if n_layers == 0 and not any(folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
