"""The live preview's numpy arithmetic (addon/core/live.py) against the backend's own sampler and
paint colour rule: the bilinear delta lookup equals ``grid_sample(align_corners=False,
padding_mode="border")``, an incremental update after a stroke equals a full recompute bit for
bit and touches only the pixels that see the stroke, and frame-paint's light/unlight is
paint_frame's ``paint / R`` (clamped)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.export.atlas import sample_atlas
from neural_atlas.core import live


def _maps(rng, H=40, W=56, S=96):
    st = rng.uniform(-0.05, 1.05, (H, W, 2)).astype(np.float32)  # a few points beyond the border
    alpha = rng.uniform(0, 1, (H, W)).astype(np.float32)
    alpha[:5] = 0.0  # pixels the layer does not cover
    res = rng.uniform(0.5, 1.5, (H, W, 3)).astype(np.float32)
    return st, alpha, res, S


def test_lookup_is_the_backends_bilinear_sampling_with_border_clamping():
    rng = np.random.default_rng(1)
    st, alpha, res, S = _maps(rng)
    D = rng.normal(0, 0.3, (S, S, 3)).astype(np.float32)  # bottom row first (Blender's order)
    lk = live.lookup(st, alpha, res, S)
    got = np.zeros(st.shape[:2] + (3,), np.float32).reshape(-1, 3)
    got[lk.pix] = live.contribution(D, lk)
    # the backend: uv in [-1, 1] with v = -1 at the top row of a top-first atlas
    uv = torch.from_numpy(np.stack([st[..., 0] * 2 - 1, 1 - st[..., 1] * 2], -1))
    ref = sample_atlas(torch.from_numpy(D[::-1].copy()), uv).numpy() * (alpha[..., None] * res)
    assert np.abs(got.reshape(ref.shape) - ref).max() < 1e-5
    assert len(lk.pix) == int((alpha != 0).sum())


def test_an_incremental_update_is_a_full_recompute_and_stays_local():
    rng = np.random.default_rng(2)
    S = 256
    H, W = 64, 96
    # a smooth mapping over the middle of the atlas, as a real layer's
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    st = np.stack([0.2 + 0.6 * (xs + 0.5) / W, 0.2 + 0.6 * (ys + 0.5) / H], -1)
    alpha = np.ones((H, W), np.float32)
    res = rng.uniform(0.8, 1.2, (H, W, 3)).astype(np.float32)
    plate = rng.uniform(0, 1, (H, W, 3)).astype(np.float32)
    T = rng.uniform(0, 1, (S, S, 3)).astype(np.float32)
    edit = np.zeros((S, S, 4), np.float32)
    D = np.zeros((S, S, 3), np.float32)
    tr = live.EditTracker(S)
    live.update_delta(D, edit, T, tr.changed_bands(edit))
    lk = live.lookup(st, alpha, res, S)
    fr = live.Frame(plate, {0: lk}, {0: D})
    assert np.array_equal(fr.u8, live.to_uint8(plate))  # no paint: the plate
    edit[120:130, 100:108] = (1.0, 0.2, 0.1, 0.8)  # a stroke
    bands = tr.changed_bands(edit)
    assert bands == [(112, 128), (128, 144)]
    tiles = live.update_delta(D, edit, T, bands)
    n = fr.update(0, D, tiles)
    full = live.Frame(plate, {0: live.lookup(st, alpha, res, S)}, {0: D})
    assert np.array_equal(fr.u8, full.u8)
    assert 0 < n < H * W // 4  # only the pixels whose footprint reaches the stroke's tiles
    assert (fr.u8 != live.to_uint8(plate)).any()
    assert tr.changed_bands(edit) == []  # nothing new


def test_light_unlight_is_paint_frames_colour_rule():
    rng = np.random.default_rng(3)
    seen = rng.uniform(0, 1, (50, 4)).astype(np.float32)
    R = rng.uniform(0.3, 1.7, (50, 3)).astype(np.float32)
    R[0] = 0.0  # no light: kept as painted
    stored = live.unlight(seen, R)
    want = np.clip(np.where(R > 1e-3, seen[:, :3] / np.maximum(R, 1e-3), seen[:, :3]), 0, 1)
    assert np.allclose(stored[:, :3], want) and np.array_equal(stored[:, 3], seen[:, 3])
    back = live.light(stored, R)
    ok = (want < 1).all(-1) & (R[:, 0] > 0)
    assert np.allclose(back[ok, :3], seen[ok, :3], atol=1e-6)


def test_residual_atlas_carries_the_frames_residual_to_the_texels_it_shows():
    H, W, S = 20, 30, 64
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    st = np.stack([(10 + xs * 1.5 + 0.5) / S, (5 + ys * 1.5 + 0.5) / S], -1)  # magnified: holes between
    res = np.broadcast_to(np.float32([0.5, 1.0, 2.0]), (H, W, 3)).copy()
    R = live.residual_atlas(st, np.ones((H, W), bool), res, S)
    inside = R[6:5 + int(1.5 * (H - 1)), 11:10 + int(1.5 * (W - 1))]
    assert np.allclose(inside, [0.5, 1.0, 2.0])  # holes filled from neighbours
    assert np.allclose(R[60:, :], 1.0) and np.allclose(R[:, :5], 1.0)  # not shown: no lighting


def test_bmp_is_what_blender_reads(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (7, 5, 3), dtype=np.uint8)  # width 5: row padding
    p = tmp_path / "f.bmp"
    live.write_bmp(str(p), rgb)
    data = p.read_bytes()
    assert data[:2] == b"BM" and len(data) == 54 + (5 * 3 + 1) * 7
    body = np.frombuffer(data[54:], np.uint8).reshape(7, 16)[:, :15].reshape(7, 5, 3)
    assert np.array_equal(body[..., ::-1], rgb)  # bottom row first, BGR, as stored


def test_resample_is_the_backends_inter_area_for_whole_factors():
    import cv2

    img = np.random.default_rng(5).uniform(0, 1, (18, 24, 3)).astype(np.float32)
    assert live.resample(img, 24, 18) is img
    for w, h in ((12, 9), (8, 6)):
        want = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        assert np.abs(live.resample(img, w, h) - want).max() < 1e-5
