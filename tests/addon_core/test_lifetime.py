"""Edit lifetime (neural_atlas.core.lifetime): range + fades + sampled opacity -> per frame."""

from __future__ import annotations

import pytest

from neural_atlas.core import lifetime as L


def test_whole_shot_at_full_strength_is_all_ones_and_sends_nothing():
    o = L.per_frame_opacity(5)
    assert o == [1.0] * 5 and L.is_full(o)
    assert L.render_field({0: o, 1: o}) is None


def test_range_cuts_and_fades_ramp_linearly():
    life = L.Lifetime(start=2, end=8, fade_in=2, fade_out=1)
    o = L.per_frame_opacity(12, life)
    # frames 0,1 before; 2,3 ramp 1/3, 2/3; 4..7 full; 8 fades out at 1/2; 9.. after
    assert o == pytest.approx([0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1, 0.5, 0, 0, 0])
    assert L.render_field({1: o}) == {"1": pytest.approx(o)}


def test_fades_overlap_in_a_short_range_take_the_smaller_ramp():
    o = L.per_frame_opacity(5, L.Lifetime(start=1, end=3, fade_in=3, fade_out=3))
    assert o == pytest.approx([0, 0.25, 0.5, 0.25, 0])


def test_fades_are_measured_from_the_range_the_artist_set_even_outside_the_shot():
    # the range starts two frames before the shot: the fade-in is partly done at frame 0
    o = L.per_frame_opacity(4, L.Lifetime(start=-2, end=None, fade_in=4))
    assert o == pytest.approx([0.6, 0.8, 1.0, 1.0])


def test_sampled_curve_multiplies_the_envelope_and_is_clamped():
    curve = [0.0, 0.5, 1.5, -1.0, 0.25]
    o = L.per_frame_opacity(5, L.Lifetime(start=1, fade_in=1), curve)
    assert o == pytest.approx([0.0, 0.25, 1.0, 0.0, 0.25])


def test_bad_lifetimes_say_what_to_change():
    with pytest.raises(L.LifetimeError, match="end is before the start"):
        L.per_frame_opacity(10, L.Lifetime(start=5, end=3))
    with pytest.raises(L.LifetimeError, match="outside the shot"):
        L.per_frame_opacity(10, L.Lifetime(start=12, end=20))
    with pytest.raises(L.LifetimeError, match=">= 0"):
        L.per_frame_opacity(10, L.Lifetime(fade_in=-1))
    with pytest.raises(L.LifetimeError, match="3 values, the shot 4"):
        L.per_frame_opacity(4, L.Lifetime(), [1, 1, 1])
    with pytest.raises(L.LifetimeError, match="not a number"):
        L.per_frame_opacity(2, L.Lifetime(), [1, float("nan")])


def test_timeline_frames_map_to_shot_frames():
    assert L.timeline_to_shot(13, 10) == 3 and L.timeline_to_shot(10, 10) == 0
