"""Optical flow between consecutive frames, forward-backward consistency, and its cache.

The training losses need, for every consecutive pair (i, i+1), the forward
flow i -> i+1, the backward flow i+1 -> i and a mask of pixels where the two
agree (method.md 3.2). ``compute_flow`` produces them with a method from
``FLOW_METHODS``: DIS (OpenCV, CPU, deterministic) is the offline default,
RAFT (torchvision, ``raft_large``/``raft_small``, batched on the GPU) the
quality option, and ``auto`` takes RAFT when its weights are on this machine
and a GPU is present, DIS otherwise (saying why). Flows are (dx, dy) in pixels
at the clip's working resolution, whatever resolution they were computed at.

Frames are read a few pairs at a time and flows written as they come, into
float16 memory-mapped ``.npy`` files when there is a cache folder, so long
high-resolution clips never sit in RAM as float32.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from ..clip.source import working_size
from ..clip.storage import DEFAULT_MMAP_THRESHOLD, allocate
from ..clip.types import Clip
from ..errors import ClipError, ConfigError, OutputError
from .vision import VisionUnavailable, WeightsSpec, WeightsUnavailable  # noqa: F401 (re-export)

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
_CACHE_VERSION = 2


@dataclass
class FlowSet:
    """Flows of a clip's consecutive pairs at its working resolution.

    forward:     (F-1, H, W, 2), ``forward[i]`` maps frame i -> i+1 (dx, dy) px.
    backward:    (F-1, H, W, 2), ``backward[i]`` maps frame i+1 -> i.
    forward_ok:  (F-1, H, W) bool, forward-backward consistent in frame i.
    backward_ok: (F-1, H, W) bool, consistent in frame i+1.

    Flows are float32 arrays when computed without a cache folder, and read-only
    float16 ``np.memmap`` views of the cache files when there is one (read a slice and
    cast it, ``flow.forward[i].astype(np.float32)``; never the whole array at 1080p).
    ``method`` is the method that produced them (``"dis"`` when ``"auto"`` fell back)
    and ``tag`` what decided them (preset, weights, resolution).
    """

    forward: np.ndarray
    backward: np.ndarray
    forward_ok: np.ndarray
    backward_ok: np.ndarray
    method: str
    consistency_px: float = 1.0
    tag: str = ""


# ------------------------------------------------------------------ methods
def dis_workers() -> int:
    """Default DIS worker threads: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def dis_flow(src: np.ndarray, dst: np.ndarray, *, preset: str = DIS_DEFAULT_PRESET,
             workers: Optional[int] = None) -> np.ndarray:
    """DIS optical flow (OpenCV) for a batch of uint8 RGB pairs; see :data:`FlowFn`.

    Runs on grayscale at the given resolution. ``preset`` names a :data:`DIS_PRESETS` entry.
    With several pairs, ``workers`` threads (default :func:`dis_workers`) each run one pair
    at a time on their own DIS instance with OpenCV's own threading off meanwhile: DIS's
    internal parallelism stops scaling at a few cores (scripts/bench/dis_pool.py), pairs do
    not. The flows do not depend on the number of workers.
    """
    if preset not in DIS_PRESETS:
        raise ConfigError(f"unknown DIS preset {preset!r}; choose one of {', '.join(DIS_PRESETS)}")
    cv_preset, finest = DIS_PRESETS[preset]
    n = src.shape[0]
    out = np.empty(src.shape[:3] + (2,), np.float32)

    def make():
        dis = cv2.DISOpticalFlow_create(cv_preset)
        if finest is not None:
            dis.setFinestScale(finest)
        return dis

    def one(dis, b: int) -> None:
        a = cv2.cvtColor(np.ascontiguousarray(src[b]), cv2.COLOR_RGB2GRAY)
        c = cv2.cvtColor(np.ascontiguousarray(dst[b]), cv2.COLOR_RGB2GRAY)
        out[b] = dis.calc(a, c, None)

    workers = min(n, dis_workers() if workers is None else max(1, int(workers)))
    if workers <= 1:
        dis = make()
        for b in range(n):
            one(dis, b)
        return out
    local = threading.local()

    def job(b: int) -> None:
        if not hasattr(local, "dis"):
            local.dis = make()
        one(local.dis, b)

    with _OPENCV_SERIAL:  # OpenCV's thread count is process-wide
        prev = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="dis") as pool:
                for f in [pool.submit(job, b) for b in range(n)]:
                    f.result()
        finally:
            cv2.setNumThreads(prev)
    return out


_OPENCV_SERIAL = threading.Lock()
# flows per call that keep every DIS worker busy (compute_flow reads it as it does RAFT's)
dis_flow.pairs_per_batch = lambda height, width: dis_workers()  # type: ignore[attr-defined]


#: Raised when a registered method cannot run here (torchvision missing, weights absent).
FlowMethodUnavailable = VisionUnavailable


class _LazyRaft:
    """A RAFT flow method built on first use with default weights and device."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self._fn: Optional[FlowFn] = None

    def __call__(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        if self._fn is None:
            self._fn = make_flow_method(self.variant)
        return self._fn(src, dst)


#: Registered flow methods by name (the names ``clip.flow_method`` accepts, plus "auto").
FLOW_METHODS: dict[str, FlowFn] = {
    "dis": dis_flow,
    "raft_small": _LazyRaft("raft_small"),
    "raft_large": _LazyRaft("raft_large"),
}

#: ``compute_flow`` also takes this: RAFT (large) when usable, else DIS.
AUTO = "auto"


def make_flow_method(method: str, *, weights: WeightsSpec = "default", device: Optional[str] = None,
                     batch_size: Optional[int] = None, iters: int = 12) -> FlowFn:
    """A flow method ready to call: DIS, or a :class:`~backend.preprocess.raft.RaftFlow`.

    Raises :class:`FlowMethodUnavailable` (torchvision missing) or its subclass
    :class:`WeightsUnavailable` (weights file absent), both ``ConfigError``.
    """
    if method == "dis":
        return dis_flow
    if method in ("raft_small", "raft_large"):
        from .raft import RaftFlow

        return RaftFlow(method, weights=weights, device=device, batch_size=batch_size, iters=iters)
    raise ConfigError(f"unknown flow method {method!r}; choose one of {', '.join(FLOW_METHODS)}, {AUTO}")


def _auto_method(weights: WeightsSpec, device: Optional[str], batch_size: Optional[int],
                 iters: int = 12) -> tuple[str, FlowFn, str]:
    """(method, fn, note): RAFT large when torchvision, its weights and a GPU are all here."""
    import torch

    want_gpu = device is None or str(device).startswith("cuda")
    if device is None and not torch.cuda.is_available():
        return "dis", dis_flow, "flow: no GPU, using DIS (RAFT on the CPU takes seconds per pair)"
    if not want_gpu:
        return "dis", dis_flow, f"flow: device {device} is not a GPU, using DIS"
    try:
        return "raft_large", make_flow_method("raft_large", weights=weights, device=device,
                                              batch_size=batch_size, iters=iters), ""
    except VisionUnavailable as e:
        return "dis", dis_flow, f"flow: RAFT unavailable, using DIS instead. {e}"


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
    gx = np.arange(w, dtype=np.float32)[None, :]  # broadcast: no full-size coordinate grids
    gy = np.arange(h, dtype=np.float32)[:, None]
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
                 progress: Optional[Callable[[int, int], None]] = None, *,
                 weights: WeightsSpec = "default", device: Optional[str] = None,
                 long_edge: Optional[int] = None, batch_size: Optional[int] = None,
                 iters: int = 12,
                 mmap_threshold: Optional[int] = DEFAULT_MMAP_THRESHOLD) -> FlowSet:
    """Forward and backward flow of every consecutive pair of ``clip`` and their consistency.

    method
        ``"dis"`` (default, offline), ``"raft_large"``, ``"raft_small"`` or ``"auto"``
        (RAFT large when torchvision, its weights and a GPU are here, else DIS with a
        warning). An explicit RAFT method whose weights are missing raises
        :class:`WeightsUnavailable` rather than silently changing method.
    cache_dir
        When given, flows live in ``cache_dir/flow_<method>_<clip.fingerprint()>/``:
        ``forward.npy`` and ``backward.npy`` (float16, memory-mapped on read; the change
        is far below DIS's error, see scripts/bench/flow_epe.py) plus ``meta.json``, and
        the consistency masks for each ``consistency_px`` as ``ok_<px>.npy``. The
        fingerprint covers every pixel, so changed frames, another frame range or
        working size miss the cache; another DIS preset, RAFT weights file, iteration
        count or ``long_edge`` makes it stale (recomputed with a warning). A cached run
        returns float16 memmaps even the first time, so reruns match exactly.
    weights, device, batch_size, iters
        RAFT only: ``"default"`` (torchvision's cache), a path or ``None`` (random);
        the torch device (default CUDA when present); pairs per forward pass;
        refinement iterations (torchvision's default 12, the seed 20).
    long_edge
        Compute flow at most at this long edge (aspect kept) and rescale it to the
        working size, per axis (:func:`rescale_flow`); default: the working size.
    mmap_threshold
        Without a cache folder, outputs this large (bytes) or larger go to scratch
        memory-mapped files (see :func:`backend.clip.storage.allocate`).
    progress
        Called as ``progress(done_pairs, total_pairs)`` as pairs complete.
    """
    if method != AUTO and method not in FLOW_METHODS:
        raise ConfigError(f"unknown flow method {method!r}; choose one of {', '.join(FLOW_METHODS)}, {AUTO}")
    if clip.n_frames < 2:
        raise ClipError(f"optical flow needs at least 2 frames; the clip {clip.source} has {clip.n_frames}")
    if long_edge is not None and int(long_edge) < 16:
        raise ConfigError(f"flow long_edge must be >= 16, got {long_edge}")
    total = clip.n_frames - 1
    H, W = clip.height, clip.width
    shape = (total, H, W, 2)
    fw, fh = working_size(W, H, int(long_edge)) if long_edge else (W, H)

    fn: Optional[FlowFn] = dis_flow if method == "dis" else None
    if method == AUTO:
        method, fn, note = _auto_method(weights, device, batch_size, iters)
        if note:
            warnings.warn(note, stacklevel=2)
    tag = _tag(method, weights, fw, fh, iters)
    cache = Path(cache_dir) / f"flow_{method}_{clip.fingerprint()}" if cache_dir is not None else None
    flows = _read_cache(cache, shape, tag) if cache is not None else None
    ok = None  # masks computed with the flows (no cache); a cache holds its own
    if flows is not None:  # a hit: RAFT is never built, torchvision not even imported
        forward, backward = flows
        if progress is not None:
            progress(total, total)
    else:
        if fn is None:
            fn = make_flow_method(method, weights=weights, device=device, batch_size=batch_size,
                                  iters=iters)
        if cache is not None:  # the consistency masks are computed with the flows, into the cache
            forward, backward = _compute_into_cache(cache, clip, fn, (fw, fh), tag, progress, consistency_px)
        else:
            forward = allocate(shape, np.float32, mmap_threshold=mmap_threshold)
            backward = allocate(shape, np.float32, mmap_threshold=mmap_threshold)
            ok = allocate((2,) + shape[:3], bool, mmap_threshold=mmap_threshold)
            _run_method(fn, clip, forward, backward, (fw, fh), progress, ok, consistency_px)
    fok, bok = (ok[0], ok[1]) if ok is not None else _consistency(forward, backward, consistency_px, cache,
                                                                  mmap_threshold)
    return FlowSet(forward=forward, backward=backward, forward_ok=fok, backward_ok=bok,
                   method=method, consistency_px=float(consistency_px), tag=tag)


def _tag(method: str, weights: WeightsSpec, fw: int, fh: int, iters: int = 12) -> str:
    """What, beyond the clip, decides the flows: a cache made otherwise is stale."""
    if method == "dis":
        return f"dis/{DIS_DEFAULT_PRESET}/{fw}x{fh}"
    if weights is None:
        w = "random"
    elif str(weights) == "default":
        w = "default"
    else:
        w = Path(weights).name
    return f"{method}/{w}/iters{int(iters)}/{fw}x{fh}"


def _run_method(fn: FlowFn, clip: Clip, forward: np.ndarray, backward: np.ndarray,
                flow_size: tuple[int, int], progress: Optional[Callable[[int, int], None]],
                ok: Optional[np.ndarray] = None, consistency_px: float = 1.0) -> None:
    """Fill ``forward``/``backward`` (any float dtype, maybe memmaps) pair chunk by pair chunk, and
    ``ok`` ((2, F-1, H, W) bool) with their consistency when given.

    The flow method runs on the reading thread; each pair's rescaling to the working size, its
    store (float16 for the cache) and its consistency masks (from the stored values, so a cached
    rerun gives the same masks) run on a pool while the method computes the next chunk: at 1080p
    they were most of the phase on a 16-core host, one thread after another. At most two chunks
    are in flight; the results do not depend on the number of threads."""
    total = clip.n_frames - 1
    H, W = clip.height, clip.width
    fw, fh = flow_size
    step = _PAIRS_PER_CALL
    if hasattr(fn, "pairs_per_batch"):
        step = max(step, (fn.pairs_per_batch(fh, fw) + 1) // 2)  # both directions go in one call
    resize = (fw, fh) != (W, H)

    def finish(both: np.ndarray, a: int, n: int, k: int) -> None:
        f, b = both[a], both[n + a]
        forward[k] = rescale_flow(f, W, H) if resize else f
        backward[k] = rescale_flow(b, W, H) if resize else b
        if ok is not None:
            _pair_consistency(forward, backward, ok, k, consistency_px)

    in_flight: list[tuple[int, list]] = []

    def settle(keep: int) -> None:
        while len(in_flight) > keep:
            done, futures = in_flight.pop(0)
            for f in futures:
                f.result()
            if progress is not None:
                progress(done, total)

    with ThreadPoolExecutor(dis_workers(), thread_name_prefix="flow-finish") as pool:
        try:
            for i in range(0, total, step):
                j = min(total, i + step)
                u8 = clip.frames_uint8(i, j + 1)
                if resize:
                    u8 = np.stack([cv2.resize(np.ascontiguousarray(f), (fw, fh), interpolation=cv2.INTER_AREA)
                                   for f in u8])
                first, second = u8[:-1], u8[1:]
                both = fn(np.concatenate([first, second]), np.concatenate([second, first]))
                if both.shape != (2 * (j - i), fh, fw, 2):
                    raise ValueError(f"flow method returned shape {both.shape} for {2 * (j - i)} pairs "
                                     f"of {fw}x{fh} frames")
                settle(1)  # the chunk before the previous one is written before a new one starts
                in_flight.append((j, [pool.submit(finish, both, k - i, j - i, k) for k in range(i, j)]))
            settle(0)
        except BaseException:
            for _, futures in in_flight:
                for f in futures:
                    f.cancel()
            raise


def _pair_consistency(forward: np.ndarray, backward: np.ndarray, ok: np.ndarray, k: int, px: float) -> None:
    """``ok[0, k]``, ``ok[1, k]``: pair k's forward and backward consistency, from the stored flows."""
    f = np.asarray(forward[k], np.float32)
    b = np.asarray(backward[k], np.float32)
    ok[0, k] = consistency_mask(f, b, px)
    ok[1, k] = consistency_mask(b, f, px)


def _ok_name(px: float) -> str:
    return f"ok_{float(px):g}.npy"


def _consistency(forward: np.ndarray, backward: np.ndarray, px: float, cache: Optional[Path],
                 mmap_threshold: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """Consistency masks of stored flows, pair by pair on a pool; cached as ``ok_<px>.npy``
    (2, F-1, H, W) bool."""
    n = forward.shape[0]
    path = cache / _ok_name(px) if cache is not None else None
    if path is not None and path.is_file():
        try:
            ok = np.load(path, mmap_mode="r")
            if ok.shape == (2,) + forward.shape[:3] and ok.dtype == bool:
                return ok[0], ok[1]
        except (OSError, ValueError):
            pass
    if path is not None:
        tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.npy")
        ok = np.lib.format.open_memmap(tmp, mode="w+", dtype=bool, shape=(2,) + forward.shape[:3])
    else:
        ok = allocate((2,) + forward.shape[:3], bool, mmap_threshold=mmap_threshold)
    with ThreadPoolExecutor(dis_workers(), thread_name_prefix="flow-ok") as pool:
        list(pool.map(lambda k: _pair_consistency(forward, backward, ok, k, px), range(n)))
    if path is not None:
        ok.flush()
        del ok
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError(f"cannot write the flow cache {path}: {e.strerror or e}") from None
        ok = np.load(path, mmap_mode="r")
    return ok[0], ok[1]


# -------------------------------------------------------------------- cache
def _cache_usable(folder: Path, shape: tuple[int, ...], tag: str) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("version") == _CACHE_VERSION and meta.get("tag") == tag and \
        tuple(meta.get("shape", ())) == shape


def _read_cache(folder: Path, shape: tuple[int, ...],
                tag: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The cached (forward, backward) float16 memmaps, or None when absent or unusable (warning)."""
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        forward = np.load(folder / "forward.npy", mmap_mode="r")
        backward = np.load(folder / "backward.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable flow cache {folder}: {e}", stacklevel=3)
        return None
    if meta.get("version") != _CACHE_VERSION or meta.get("tag") != tag:
        warnings.warn(f"ignoring flow cache {folder}: made by another version or method "
                      f"({meta.get('tag')}, now {tag})", stacklevel=3)
        return None
    if forward.shape != shape or backward.shape != shape or forward.dtype != np.float16:
        warnings.warn(f"ignoring flow cache {folder}: it does not match this clip", stacklevel=3)
        return None
    return forward, backward


def _compute_into_cache(folder: Path, clip: Clip, fn: FlowFn, flow_size: tuple[int, int], tag: str,
                        progress, consistency_px: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Compute straight into float16 .npy memmaps in a temporary folder (with the consistency masks
    for ``consistency_px``), then move it into place."""
    shape = (clip.n_frames - 1, clip.height, clip.width, 2)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.mkdir(parents=True)
        forward = np.lib.format.open_memmap(tmp / "forward.npy", mode="w+", dtype=np.float16, shape=shape)
        backward = np.lib.format.open_memmap(tmp / "backward.npy", mode="w+", dtype=np.float16, shape=shape)
        ok = np.lib.format.open_memmap(tmp / _ok_name(consistency_px), mode="w+", dtype=bool,
                                       shape=(2,) + shape[:3])
        _run_method(fn, clip, forward, backward, flow_size, progress, ok, consistency_px)
        forward.flush()
        backward.flush()
        ok.flush()
        del forward, backward, ok
        (tmp / "meta.json").write_text(json.dumps({"version": _CACHE_VERSION, "tag": tag,
                                                   "shape": list(shape), "source": clip.source,
                                                   "frame_range": list(clip.frame_range)}),
                                       encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as e:
        raise OutputError(f"cannot write the flow cache {folder}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return np.load(folder / "forward.npy", mmap_mode="r"), np.load(folder / "backward.npy", mmap_mode="r")
