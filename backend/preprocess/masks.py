"""Object masks for a clip from a detector: detect per frame, associate into tracks, rasterise.

``detect_masks`` runs a detector (:mod:`backend.preprocess.detect`) over the clip's frames
a few at a time, links the instances into tracks (:mod:`backend.preprocess.associate`),
keeps the persistent ones and returns one bool mask sequence per object, named
``<class>_<k>`` (``person_0``, ``person_1``, ...; best-scoring first), which sorts into the
layer order ``load_clip`` uses. ``attach_masks`` puts them on the clip for a decomposition;
``write_masks`` writes the usual one-folder-per-object PNG layout that ``load_clip(masks=...)``
and the seed read back.

User-drawn mask sequences need none of this: ``load_clip(source, masks=[folder, ...])`` reads
them at any size (nearest-neighbour resize, so they stay binary).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from ..clip.storage import DEFAULT_MMAP_THRESHOLD, allocate
from ..clip.types import Clip
from ..errors import ConfigError, OutputError
from .associate import Instance, associate, select_tracks
from .detect import make_detector
from .vision import WeightsSpec

PathLike = Union[str, os.PathLike]


@dataclass
class ObjectMasks:
    """Masks of the tracked objects: ``masks`` bool (F, H, W, K), K objects best first."""

    masks: np.ndarray
    names: list[str]
    labels: list[str]
    scores: list[float]  # summed detection score per object
    frames_seen: list[int]  # frames where each object was detected
    detector: str = ""
    info: dict = field(default_factory=dict)


def detect_masks(clip: Clip, detector="torchvision", classes: Sequence[str] = ("person",), *,
                 max_objects: Optional[int] = None, weights: WeightsSpec = "default",
                 device: Optional[str] = None, score_threshold: float = 0.5, batch_size: int = 2,
                 min_presence: float = 0.2, min_iou: float = 0.1, max_gap: int = 10,
                 progress: Optional[Callable[[int, int], None]] = None,
                 mmap_threshold: Optional[int] = DEFAULT_MMAP_THRESHOLD) -> ObjectMasks:
    """Detect, track and rasterise object masks for every frame of ``clip``.

    detector
        ``"torchvision"``, ``"detectron2"`` or a ready detector (a callable taking uint8 RGB
        ``(B, H, W, 3)`` and returning per-frame lists of ``Instance``).
    classes
        COCO class names, or ``["anything"]`` for any class.
    max_objects
        Keep at most this many objects (default: every persistent one).
    min_presence
        An object must be detected in at least this share of the frames (and 2 frames).
    min_iou, max_gap
        Association settings (:func:`backend.preprocess.associate.associate`).

    Raises ``ConfigError`` for unknown classes or detectors, ``WeightsUnavailable`` for
    missing weights, ``VisionUnavailable`` when torchvision/detectron2 cannot be imported.
    A clip where nothing persistent is found gives ``K = 0`` (``masks.shape[-1] == 0``).
    """
    if max_objects is not None and int(max_objects) < 1:
        raise ConfigError(f"max_objects must be >= 1, got {max_objects}")
    if isinstance(detector, str):
        name = detector
        det = make_detector(detector, classes, weights=weights, device=device,
                            score_threshold=score_threshold)
    else:
        name, det = getattr(detector, "name", type(detector).__name__), detector
    F_, H, W = clip.n_frames, clip.height, clip.width
    per_frame: list[list[Instance]] = []
    step = max(1, int(batch_size))
    for a in range(0, F_, step):
        b = min(F_, a + step)
        found = det(clip.frames_uint8(a, b))
        if len(found) != b - a:
            raise ValueError(f"detector returned {len(found)} results for {b - a} frames")
        per_frame.extend(found)
        if progress is not None:
            progress(b, F_)
    tracks = associate(per_frame, min_iou=min_iou, max_gap=max_gap)
    kept = select_tracks(tracks, F_, max_objects=max_objects, min_presence=min_presence)
    masks = allocate((F_, H, W, len(kept)), bool, mmap_threshold=mmap_threshold)
    counts: dict[str, int] = {}
    names = []
    for k, tr in enumerate(kept):
        base = tr.label.replace(" ", "_")
        names.append(f"{base}_{counts.get(base, 0)}")
        counts[base] = counts.get(base, 0) + 1
        for t, inst in tr.seen.items():
            frame = np.zeros((H, W), bool)
            inst.paste(frame)
            masks[t, :, :, k] = frame
    return ObjectMasks(masks=masks, names=names, labels=[tr.label for tr in kept],
                       scores=[round(tr.score, 4) for tr in kept],
                       frames_seen=[len(tr.seen) for tr in kept], detector=name,
                       info={"tracks_found": len(tracks),
                             "instances": int(sum(len(f) for f in per_frame))})


def attach_masks(clip: Clip, objects: ObjectMasks) -> Clip:
    """Put detected masks on ``clip`` (replacing any), in ``load_clip``'s sorted-name layer order."""
    if objects.masks.shape[:3] != (clip.n_frames, clip.height, clip.width):
        raise ConfigError(f"masks {objects.masks.shape[:3]} do not match the clip "
                          f"{(clip.n_frames, clip.height, clip.width)}")
    if not objects.names:
        clip.masks, clip.mask_names = None, []
        return clip
    from ..clip.source import natural_key

    order = sorted(range(len(objects.names)), key=lambda k: natural_key(objects.names[k]))
    data = objects.masks if order == list(range(len(order))) else objects.masks[..., order]
    clip.masks = data
    clip.mask_names = [objects.names[k] for k in order]
    return clip


def write_masks(objects: ObjectMasks, folder: PathLike, frame_names: Sequence[str], *,
                total_frames: Optional[int] = None, first_frame: int = 0,
                overwrite: bool = False) -> list[Path]:
    """Write ``folder/<name>/<frame stem>.png`` (0/255, 8-bit) per object; returns the folders.

    frame_names
        Names of the clip's frames (their stems name the PNGs).
    total_frames, first_frame
        When the clip was a frame range of a longer source, masks are written for all
        ``total_frames`` source frames (``%05d.png``), empty outside the range, so that
        ``load_clip`` finds one mask per source frame.
    overwrite
        Replace existing object folders of the same names (else refuse).
    """
    root = Path(folder)
    F_ = objects.masks.shape[0]
    written = []
    for k, name in enumerate(objects.names):
        sub = root / name
        if sub.exists() and any(sub.iterdir()):
            if not overwrite:
                raise OutputError(f"{sub} already holds masks; pass overwrite (CLI: --overwrite) "
                                  "or choose another folder")
            shutil.rmtree(sub)
        try:
            sub.mkdir(parents=True, exist_ok=True)
            if total_frames is None:
                names = [Path(n).stem + ".png" for n in frame_names]
                index = {i: i for i in range(F_)}
            else:
                names = [f"{i:05d}.png" for i in range(int(total_frames))]
                index = {first_frame + i: i for i in range(F_)}
            blank = None
            for i, fname in enumerate(names):
                if i in index:
                    img = objects.masks[index[i], :, :, k].astype(np.uint8) * 255
                else:
                    if blank is None:
                        blank = np.zeros(objects.masks.shape[1:3], np.uint8)
                    img = blank
                ok, buf = cv2.imencode(".png", img)
                if not ok:
                    raise OutputError(f"cannot encode the mask {sub / fname}")
                buf.tofile(str(sub / fname))
        except OSError as e:
            raise OutputError(f"cannot write masks to {sub}: {e.strerror or e}") from None
        written.append(sub)
    return written
