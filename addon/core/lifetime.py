"""Edit lifetime: where in the shot an edit layer shows, and how strongly.

Per edit layer the artist sets a frame range, a fade-in and a fade-out (in frames)
and an opacity that may be keyframed (Blender's own animation system samples it:
one value per frame of the shot). This module turns those into the per-frame
opacity list ``o_0 .. o_{F-1}`` that the backend's ``render`` request takes
(``opacity: {"<layer>": [...]}``) and that the live preview bakes into its material,
so both paths apply exactly the same numbers:

    out = plate + sum_i o_i(f) * alpha_i * R_i * (E_i(uv_i) - T_i(uv_i))

Frames here are decomposition frames ``0 .. F-1`` (the ones the maps are indexed
by); the range is inclusive on both ends. A fade of ``k`` frames ramps linearly over
the first (last) ``k`` frames of the range, reaching full strength on the ``k+1``-th:
frame ``start + j`` (``j < k``) gets ``(j + 1) / (k + 1)``. A fade of 0 is a cut.
No bpy, no numpy: plain pytest tests it (tests/addon_core/test_lifetime.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence


class LifetimeError(ValueError):
    """An edit lifetime that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Lifetime:
    """One edit layer's lifetime in decomposition frames. ``start``/``end`` None = the
    shot's first/last frame."""

    start: Optional[int] = None
    end: Optional[int] = None
    fade_in: int = 0
    fade_out: int = 0

    def check(self, n_frames: int) -> tuple[int, int]:
        """The inclusive range ``(first, last)`` clipped to the shot; raises LifetimeError."""
        if n_frames < 1:
            raise LifetimeError("the shot has no frames")
        if self.fade_in < 0 or self.fade_out < 0:
            raise LifetimeError(f"fades must be >= 0 frames, got in {self.fade_in}, out {self.fade_out}")
        first = 0 if self.start is None else int(self.start)
        last = n_frames - 1 if self.end is None else int(self.end)
        if last < first:
            raise LifetimeError(f"the edit's frame range {first}-{last} is empty: the end is before the start")
        if last < 0 or first > n_frames - 1:
            raise LifetimeError(f"the edit's frame range {first}-{last} is outside the shot's frames "
                                f"0-{n_frames - 1}")
        return max(0, first), min(n_frames - 1, last)

    def envelope(self, n_frames: int) -> list[float]:
        """Range and fades alone: 0 outside, ramps inside the fades, 1 elsewhere."""
        first, last = self.check(n_frames)
        # fades are measured from the range as the artist set it, even where it
        # starts before or ends after the shot
        a = first if self.start is None else int(self.start)
        b = last if self.end is None else int(self.end)
        out = []
        for f in range(n_frames):
            if f < first or f > last:
                out.append(0.0)
                continue
            w = 1.0
            if self.fade_in > 0:
                w = min(w, (f - a + 1) / (self.fade_in + 1))
            if self.fade_out > 0:
                w = min(w, (b - f + 1) / (self.fade_out + 1))
            out.append(max(0.0, min(1.0, w)))
        return out


def per_frame_opacity(n_frames: int, lifetime: Lifetime = Lifetime(),
                      opacity: Optional[Sequence[float]] = None) -> list[float]:
    """``o(f) = clamp(opacity[f], 0, 1) * envelope(f)`` for ``f`` in ``0 .. n_frames-1``.

    ``opacity`` is the keyframed opacity sampled once per decomposition frame (None:
    1 everywhere); a constant curve is a list of one value per frame too."""
    env = lifetime.envelope(n_frames)
    if opacity is None:
        curve = [1.0] * n_frames
    else:
        curve = [float(v) for v in opacity]
        if len(curve) != n_frames:
            raise LifetimeError(f"the sampled opacity has {len(curve)} values, the shot {n_frames} frames")
        for f, v in enumerate(curve):
            if not math.isfinite(v):
                raise LifetimeError(f"the opacity at frame {f} is not a number ({v})")
    return [max(0.0, min(1.0, c)) * e for c, e in zip(curve, env)]


def is_full(values: Sequence[float]) -> bool:
    """True when the edit shows at full strength on every frame (nothing to send)."""
    return all(v == 1.0 for v in values)


def render_field(per_layer: Mapping[int, Sequence[float]]) -> Optional[dict[str, list[float]]]:
    """The ``opacity`` field of a ``render`` request: layers at full strength on every
    frame are left out (the backend's default), None when every layer is."""
    field = {str(int(k)): [float(v) for v in vals] for k, vals in sorted(per_layer.items())
             if not is_full(vals)}
    return field or None


def timeline_to_shot(frame: int, first_timeline_frame: int) -> int:
    """Decomposition frame of a timeline frame (the shot's frame 0 shows at
    ``first_timeline_frame``)."""
    return int(frame) - int(first_timeline_frame)
