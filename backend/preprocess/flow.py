"""Optical flow between consecutive frames, forward-backward consistency, and its cache.

The training losses need, for every consecutive pair (i, i+1), the forward
flow i -> i+1, the backward flow i+1 -> i and a mask of pixels where the two
agree (method.md 3.2). ``compute_flow`` produces them with a method from
``FLOW_METHODS``; DIS (OpenCV, CPU, deterministic) is the default, RAFT plugs
into the same registry later. Flows are (dx, dy) in pixels at the clip's
working resolution.
"""

from __future__ import annotations

import os
import secrets
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from ..clip.types import Clip
from ..errors import ClipError, ConfigError, OutputError

#: A flow method: ``fn(src, dst)`` with ``src, dst`` uint8 RGB ``(B, H, W, 3)`` returns
#: float32 ``(B, H, W, 2)`` flows (dx, dy) in px that map each ``src[b]`` pixel to ``dst[b]``.
FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

#: DIS parameter sets: name -> (OpenCV preset, finest scale or None for the preset's own).
#: "fine" is OpenCV's FAST preset refined down to full resolution (finest scale 0):
#: on the tennis clip it was both faster and closer to RAFT than MEDIUM
#: (scripts/bench/flow_epe.py has the numbers).
DIS_PRESETS: dict[str, tuple[int, Optional[int]]] = {
    "ultrafast": (cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, None),
    "fast": (cv2.DISOPTICAL_FLOW_PRESET_FAST, None),
    "medium": (cv2.DISOPTICAL_FLOW_PRESET_MEDIUM, None),
    "medium_fine": (cv2.DISOPTICAL_FLOW_PRESET_MEDIUM, 0),
    "fine": (cv2.DISOPTICAL_FLOW_PRESET_FAST, 0),
}
DIS_DEFAULT_PRESET = "fine"

_PAIRS_PER_CALL = 8  # consecutive pairs handed to a flow method at once (a batch for RAFT)
_CACHE_VERSION = 1


def _cache_tag(method: str) -> str:
    """What, beyond the method name, decides the flows: a cache made otherwise is stale."""
    return f"dis/{DIS_DEFAULT_PRESET}" if method == "dis" else method


@dataclass
class FlowSet:
    """Flows of a clip's consecutive pairs at its working resolution.

    forward:     (F-1, H, W, 2) float32, ``forward[i]`` maps frame i -> i+1 (dx, dy) px.
    backward:    (F-1, H, W, 2) float32, ``backward[i]`` maps frame i+1 -> i.
    forward_ok:  (F-1, H, W) bool, forward-backward consistent in frame i.
    backward_ok: (F-1, H, W) bool, consistent in frame i+1.
    """

    forward: np.ndarray
    backward: np.ndarray
    forward_ok: np.ndarray
    backward_ok: np.ndarray
    method: str
    consistency_px: float = 1.0


# ------------------------------------------------------------------ methods
def dis_flow(src: np.ndarray, dst: np.ndarray, *, preset: str = DIS_DEFAULT_PRESET) -> np.ndarray:
    """DIS optical flow (OpenCV) for a batch of uint8 RGB pairs; see :data:`FlowFn`.

    Runs on grayscale at the given resolution. ``preset`` names a :data:`DIS_PRESETS` entry.
    """
    if preset not in DIS_PRESETS:
        raise ConfigError(f"unknown DIS preset {preset!r}; choose one of {', '.join(DIS_PRESETS)}")
    cv_preset, finest = DIS_PRESETS[preset]
    dis = cv2.DISOpticalFlow_create(cv_preset)
    if finest is not None:
        dis.setFinestScale(finest)
    out = np.empty(src.shape[:3] + (2,), np.float32)
    for b in range(src.shape[0]):
        a = cv2.cvtColor(np.ascontiguousarray(src[b]), cv2.COLOR_RGB2GRAY)
        c = cv2.cvtColor(np.ascontiguousarray(dst[b]), cv2.COLOR_RGB2GRAY)
        out[b] = dis.calc(a, c, None)
    return out


class FlowMethodUnavailable(ConfigError, NotImplementedError):
    """A registered flow method that cannot run in this build or environment."""


def _raft_pending(name: str) -> FlowFn:
    def unavailable(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        raise FlowMethodUnavailable(f"flow method {name!r} is not available yet: RAFT arrives with "
                                    "the preprocessing issue; use method='dis'")
    return unavailable


#: Registered flow methods by name (the names ``clip.flow_method`` accepts).
FLOW_METHODS: dict[str, FlowFn] = {
    "dis": dis_flow,
    "raft_small": _raft_pending("raft_small"),
    "raft_large": _raft_pending("raft_large"),
}


# ---------------------------------------------------------------- utilities
def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] -> uint8 (rounded), the input flow methods take."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def rescale_flow(flow: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    """Resize a flow field ``(H, W, 2)`` or ``(N, H, W, 2)`` to ``new_h x new_w``.

    The field is resized bilinearly and the vectors scaled per axis: dx by
    ``new_w / W`` and dy by ``new_h / H`` (the seed swaps the two factors).
    """
    flow = np.asarray(flow, np.float32)
    single = flow.ndim == 3
    batch = flow[None] if single else flow
    h, w = batch.shape[1:3]
    scale = np.array([new_w / w, new_h / h], np.float32)
    out = np.empty((batch.shape[0], new_h, new_w, 2), np.float32)
    for i, f in enumerate(batch):
        out[i] = cv2.resize(f, (new_w, new_h), interpolation=cv2.INTER_LINEAR) * scale
    return out[0] if single else out


def consistency_mask(f12: np.ndarray, f21: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """Forward-backward consistency of ``f12`` (frame 1 -> 2) against ``f21`` (2 -> 1).

    A pixel p of frame 1 is consistent when ``||f12(p) + f21(p + f12(p))|| < threshold``,
    with f21 sampled bilinearly (``cv2.remap``), and ``p + f12(p)`` lies inside
    frame 2. Shapes ``(H, W, 2)`` or ``(N, H, W, 2)``; returns bool ``(H, W)`` or ``(N, H, W)``.
    """
    f12 = np.asarray(f12, np.float32)
    f21 = np.asarray(f21, np.float32)
    if f12.shape != f21.shape or f12.shape[-1] != 2:
        raise ValueError(f"flows must have equal (..., H, W, 2) shapes, got {f12.shape} and {f21.shape}")
    single = f12.ndim == 3
    a = f12[None] if single else f12
    b = f21[None] if single else f21
    h, w = a.shape[1:3]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    ok = np.empty(a.shape[:3], bool)
    for i in range(a.shape[0]):
        mx = gx + a[i, ..., 0]
        my = gy + a[i, ..., 1]
        back = cv2.remap(b[i], mx, my, interpolation=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
        err = np.hypot(a[i, ..., 0] + back[..., 0], a[i, ..., 1] + back[..., 1])
        inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
        ok[i] = inside & (err < threshold)
    return ok[0] if single else ok


# -------------------------------------------------------------- compute_flow
def compute_flow(clip: Clip, method: str = "dis", cache_dir: Optional[Union[str, os.PathLike]] = None,
                 consistency_px: float = 1.0,
                 progress: Optional[Callable[[int, int], None]] = None) -> FlowSet:
    """Forward and backward flow of every consecutive pair of ``clip`` and their consistency.

    method
        A :data:`FLOW_METHODS` name.
    cache_dir
        When given, flows are read from / written to
        ``cache_dir/flow_<method>_<clip.fingerprint()>.npz``. The cache stores
        float16 (a change far below DIS's error, see scripts/bench/flow_epe.py)
        and a cached run returns flows rounded to float16 even the first time,
        so that a rerun matches it exactly. Consistency masks are recomputed,
        so ``consistency_px`` may change freely.
    progress
        Called as ``progress(done_pairs, total_pairs)`` as pairs complete.
    """
    if method not in FLOW_METHODS:
        raise ConfigError(f"unknown flow method {method!r}; choose one of {', '.join(FLOW_METHODS)}")
    if clip.n_frames < 2:
        raise ClipError(f"optical flow needs at least 2 frames; the clip {clip.source} has {clip.n_frames}")
    total = clip.n_frames - 1
    shape = (total, clip.height, clip.width, 2)
    cache = None
    flows = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"flow_{method}_{clip.fingerprint()}.npz"
        flows = _read_cache(cache, shape, _cache_tag(method))
    if flows is not None:
        forward, backward = flows
        if progress is not None:
            progress(total, total)
    else:
        forward, backward = _run_method(FLOW_METHODS[method], clip.frames, progress)
        if cache is not None:
            # return exactly what a later cache hit returns, so reruns match
            forward, backward = _write_cache(cache, forward, backward, _cache_tag(method))
    return FlowSet(forward=forward, backward=backward,
                   forward_ok=consistency_mask(forward, backward, consistency_px),
                   backward_ok=consistency_mask(backward, forward, consistency_px),
                   method=method, consistency_px=float(consistency_px))


def _run_method(fn: FlowFn, frames: np.ndarray,
                progress: Optional[Callable[[int, int], None]]) -> tuple[np.ndarray, np.ndarray]:
    total = frames.shape[0] - 1
    forward = np.empty((total,) + frames.shape[1:3] + (2,), np.float32)
    backward = np.empty_like(forward)
    for i in range(0, total, _PAIRS_PER_CALL):
        j = min(total, i + _PAIRS_PER_CALL)
        u8 = to_uint8(frames[i:j + 1])
        first, second = u8[:-1], u8[1:]
        both = fn(np.concatenate([first, second]), np.concatenate([second, first]))
        if both.shape != (2 * (j - i),) + frames.shape[1:3] + (2,):
            raise ValueError(f"flow method returned shape {both.shape} for {2 * (j - i)} pairs "
                             f"of {frames.shape[2]}x{frames.shape[1]} frames")
        forward[i:j] = both[: j - i]
        backward[i:j] = both[j - i:]
        if progress is not None:
            progress(j, total)
    return forward, backward


def _read_cache(path: Path, shape: tuple[int, ...],
                tag: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The cached (forward, backward) pair, or None when absent or unusable (with a warning)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            version = int(data["version"])
            stored_tag = str(data["tag"])
            forward = data["forward"].astype(np.float32)
            backward = data["backward"].astype(np.float32)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        warnings.warn(f"ignoring unreadable flow cache {path}: {e}", stacklevel=3)
        return None
    if version != _CACHE_VERSION or stored_tag != tag:
        warnings.warn(f"ignoring flow cache {path}: made by another version or method "
                      f"({stored_tag}, now {tag})", stacklevel=3)
        return None
    if forward.shape != shape or backward.shape != shape:
        warnings.warn(f"ignoring flow cache {path}: it does not match this clip", stacklevel=3)
        return None
    return forward, backward


def _write_cache(path: Path, forward: np.ndarray, backward: np.ndarray,
                 tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Store the flows as float16 and return them as read back (float32)."""
    forward16 = forward.astype(np.float16)
    backward16 = backward.astype(np.float16)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, version=np.int64(_CACHE_VERSION), tag=np.array(tag),
                     forward=forward16, backward=backward16)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write the flow cache {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return forward16.astype(np.float32), backward16.astype(np.float32)
