"""Instance association across frames: one object keeps one layer for the whole shot.

Detectors return unrelated instances per frame (the seed kept the top instance of each
frame, so a layer could jump between people). Here every frame's instances are matched
to the tracks so far by mask IoU with a minimum-cost assignment (Hungarian), after
moving each track's last mask by its recent centroid velocity; unmatched instances
start new tracks, and a track that finds no instance in a frame gets an empty mask
there rather than someone else's. Tracks lost for up to ``max_gap`` frames can be
picked up again. Short-lived tracks (flickering false positives) are dropped and the
rest ranked by their summed detection score.

Masks are kept as crops to their bounding box, so a long 1080p shot with many
detections does not hold full frames per instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

#: Cost that forbids a pairing in :func:`linear_sum_assignment` (finite, so the algorithm runs).
FORBIDDEN = 1e9


@dataclass
class Instance:
    """One detected instance: a bool mask cropped to ``box`` = (x0, y0, x1, y1), exclusive."""

    box: tuple[int, int, int, int]
    crop: np.ndarray
    score: float
    label: str

    @classmethod
    def from_mask(cls, mask: np.ndarray, score: float, label: str) -> Optional["Instance"]:
        """From a full-frame bool mask; None when the mask is empty."""
        ys = np.flatnonzero(mask.any(axis=1))
        if ys.size == 0:
            return None
        xs = np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
        return cls((x0, y0, x1, y1), np.ascontiguousarray(mask[y0:y1, x0:x1]), float(score), label)

    @property
    def area(self) -> int:
        return int(self.crop.sum())

    def centroid(self) -> np.ndarray:
        ys, xs = np.nonzero(self.crop)
        return np.array([xs.mean() + self.box[0], ys.mean() + self.box[1]])

    def shifted(self, dx: int, dy: int) -> "Instance":
        x0, y0, x1, y1 = self.box
        return Instance((x0 + dx, y0 + dy, x1 + dx, y1 + dy), self.crop, self.score, self.label)

    def paste(self, out: np.ndarray) -> None:
        """OR the mask into a full-frame bool array (clipped to its bounds)."""
        h, w = out.shape
        x0, y0, x1, y1 = self.box
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if cx0 < cx1 and cy0 < cy1:
            out[cy0:cy1, cx0:cx1] |= self.crop[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]


def intersection(a: Instance, b: Instance) -> int:
    """Pixels on in both cropped masks, in frame coordinates."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if x0 >= x1 or y0 >= y1:
        return 0
    return int(np.count_nonzero(a.crop[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
                                & b.crop[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]))


def mask_iou(a: Instance, b: Instance) -> float:
    """IoU of two cropped masks in frame coordinates."""
    inter = intersection(a, b)
    union = a.area + b.area - inter
    return inter / union if union else 0.0


def linear_sum_assignment(cost) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment (Hungarian method with potentials), rectangular allowed.

    Returns ``(rows, cols)`` sorted by row, ``min(n, m)`` pairs, like
    ``scipy.optimize.linear_sum_assignment`` (scipy is not a dependency).
    """
    c = np.asarray(cost, np.float64)
    if c.ndim != 2:
        raise ValueError(f"cost must be 2-D, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("cost must be finite (use FORBIDDEN for impossible pairs)")
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    match = np.zeros(m + 1, np.int64)  # match[j]: row (1-based) assigned to column j; 0 none
    way = np.zeros(m + 1, np.int64)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            free = ~used[1:]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    cols = np.flatnonzero(match[1:])
    rows = match[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


@dataclass
class Track:
    """One object through the shot: its instance in each frame where it was found."""

    ident: int
    label: str
    seen: dict[int, Instance] = field(default_factory=dict)

    @property
    def last_frame(self) -> int:
        return max(self.seen)

    @property
    def score(self) -> float:
        return float(sum(i.score for i in self.seen.values()))

    def velocity(self, window: int = 5) -> np.ndarray:
        """Centroid velocity (px per frame): least-squares slope over the last sightings."""
        frames = sorted(self.seen)[-window:]
        if len(frames) < 2:
            return np.zeros(2)
        t = np.array(frames, np.float64)
        c = np.array([self.seen[f].centroid() for f in frames])
        t -= t.mean()
        return (t[:, None] * (c - c.mean(axis=0))).sum(axis=0) / (t * t).sum()

    def predict(self, t: int) -> Instance:
        """The last mask moved to frame ``t`` by the track's recent velocity."""
        last = max(self.seen)
        dx, dy = np.rint(self.velocity() * (t - last)).astype(int)
        return self.seen[last].shifted(int(dx), int(dy))

    def predict_extent(self, t: int, window: int = 5) -> Instance:
        """The largest recent mask moved to frame ``t``: the object's whole extent even when its
        last sightings were partly occluded."""
        recent = sorted(self.seen)[-window:]
        f = max(recent, key=lambda k: (self.seen[k].area, k))
        dx, dy = np.rint(self.velocity() * (t - f)).astype(int)
        return self.seen[f].shifted(int(dx), int(dy))


def overlap(a: Instance, b: Instance) -> float:
    """Intersection over the smaller area: 1 when one mask lies inside the other."""
    return intersection(a, b) / max(1, min(a.area, b.area))


def _match(tracks: list[Track], live: list[int], instances: list[Instance], t: int,
           score, least: float, same_label: bool) -> list[tuple[int, int]]:
    """Minimum-cost pairs (track index, instance index) with ``score(track, inst) >= least``."""
    if not live or not instances:
        return []
    cost = np.full((len(live), len(instances)), FORBIDDEN)
    for a, k in enumerate(live):
        for b, inst in enumerate(instances):
            if same_label and tracks[k].label != inst.label:
                continue
            value = score(tracks[k], inst)
            if value >= least:
                cost[a, b] = 1.0 - value
    rows, cols = linear_sum_assignment(cost)
    return [(live[a], int(b)) for a, b in zip(rows, cols) if cost[a, b] < FORBIDDEN]


def associate(per_frame: list[list[Instance]], *, min_iou: float = 0.1, max_gap: int = 10,
              min_overlap: float = 0.6, same_label: bool = True) -> list[Track]:
    """Link per-frame instances into tracks (module docstring); returns every track.

    Each frame is matched in two rounds, each a minimum-cost assignment: first by IoU
    between a track's last mask (moved by its velocity) and the instances, at least
    ``min_iou``; then, for what is left, by how much of an instance lies inside the
    track's whole recent extent (:meth:`Track.predict_extent`), at least ``min_overlap``,
    which keeps an object that is briefly almost hidden behind another.

    per_frame
        ``per_frame[t]``: the instances detected in frame t (any order).
    max_gap
        Frames a track may go unseen and still be continued.
    same_label
        Never match instances of different class labels.
    """
    tracks: list[Track] = []
    for t, instances in enumerate(per_frame):
        live = [k for k, tr in enumerate(tracks) if t - tr.last_frame <= max_gap + 1]
        pairs = _match(tracks, live, instances, t, lambda tr, inst: mask_iou(tr.predict(t), inst),
                       min_iou, same_label)
        used_tracks = {k for k, _ in pairs}
        used_dets = {b for _, b in pairs}
        rest_tracks = [k for k in live if k not in used_tracks]
        rest = [b for b in range(len(instances)) if b not in used_dets]
        second = _match(tracks, rest_tracks, [instances[b] for b in rest], t,
                        lambda tr, inst: overlap(tr.predict_extent(t), inst), min_overlap, same_label)
        pairs += [(k, rest[b]) for k, b in second]
        for k, b in pairs:
            tracks[k].seen[t] = instances[b]
        used_dets = {b for _, b in pairs}
        for b, inst in enumerate(instances):
            if b not in used_dets:
                tracks.append(Track(len(tracks), inst.label, {t: inst}))
    return tracks


def select_tracks(tracks: list[Track], n_frames: int, *, max_objects: Optional[int] = None,
                  min_presence: float = 0.2) -> list[Track]:
    """Tracks seen in at least ``min_presence`` of the frames (and 2 frames), best summed
    score first, at most ``max_objects``."""
    need = max(2, int(np.ceil(min_presence * n_frames))) if n_frames > 1 else 1
    kept = [tr for tr in tracks if len(tr.seen) >= need]
    kept.sort(key=lambda tr: (-tr.score, tr.ident))
    return kept if max_objects is None else kept[: int(max_objects)]
