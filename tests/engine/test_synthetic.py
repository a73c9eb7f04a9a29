"""The synthetic ground-truth clip (backend.synthetic.scene) and the yardsticks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backend.clip import Clip
from backend.synthetic import (SyntheticScene, alpha_iou, load, make_synthetic_clip, mark_drift,
                               paint_disc, psnr, psnr_per_frame, texel_to_uv, uv_to_texel)


@pytest.fixture(scope="module")
def scene() -> SyntheticScene:
    return make_synthetic_clip(seed=3)


@pytest.fixture(scope="module")
def two_objects() -> SyntheticScene:
    return make_synthetic_clip(96, 64, 10, seed=5, n_objects=2)


def bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample (H, W, C) at points (N, 2) (x = column), edges clamped."""
    h, w = image.shape[:2]
    x = np.clip(xy[:, 0], 0, w - 1)
    y = np.clip(xy[:, 1], 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(int), w - 2)
    y0 = np.minimum(np.floor(y).astype(int), h - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    return ((image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx) * (1 - fy)
            + (image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx) * fy)


def pixel_grid(h: int, w: int) -> np.ndarray:
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    return np.stack([gx.ravel(), gy.ravel()], -1)


# ----------------------------------------------------------------------------- the clip
def test_deterministic_from_seed(scene):
    again = make_synthetic_clip(seed=3)
    assert np.array_equal(again.clip.frames, scene.clip.frames)
    assert np.array_equal(again.clip.masks, scene.clip.masks)
    other = make_synthetic_clip(seed=4)
    assert np.abs(other.clip.frames - scene.clip.frames).mean() > 0.02
    assert not np.array_equal(other.clip.masks, scene.clip.masks)


def test_shapes_dtypes_and_clip_fields(scene, two_objects):
    clip = scene.clip
    assert isinstance(clip, Clip)
    assert clip.frames.shape == (24, 72, 128, 3) and clip.frames.dtype == np.float32
    assert clip.masks.shape == (24, 72, 128, 1) and clip.masks.dtype == np.float32
    assert 0.0 < clip.frames.min() and clip.frames.max() < 1.0
    assert set(np.unique(clip.masks)) == {0.0, 1.0}
    assert clip.mask_names == ["object0"] and clip.frame_names[:2] == ["00000.png", "00001.png"]
    assert clip.source == "synthetic:seed=3" and clip.fps == 24.0
    assert clip.source_size == (128, 72) and clip.frame_range == (0, 24)
    assert scene.n_layers == 2 and scene.background == 1 and len(scene.textures) == 2
    coords = scene.tex_coords
    assert len(coords) == 2 and all(c.shape == (24, 72, 128, 2) and c.dtype == np.float32
                                    for c in coords)
    assert two_objects.clip.masks.shape == (10, 64, 96, 2)
    assert two_objects.clip.mask_names == ["object0", "object1"]
    # odd sizes and portrait frames work too
    portrait = make_synthetic_clip(37, 61, 3, seed=1)
    assert portrait.clip.frames.shape == (3, 61, 37, 3) and portrait.clip.masks.any()


def test_tex_coords_and_project_are_inverse(scene, two_objects):
    for sc in (scene, two_objects):
        h, w = sc.clip.height, sc.clip.width
        grid = pixel_grid(h, w)
        for k in range(sc.n_layers):
            for t in (0, sc.clip.n_frames // 2, sc.clip.n_frames - 1):
                tex = sc.tex_coords[k][t].reshape(-1, 2).astype(np.float64)
                assert np.abs(sc.project(k, tex, t) - grid).max() < 1e-4
                assert np.abs(sc.unproject(k, sc.project(k, tex, t), t) - tex).max() < 1e-6
    # per-point frame indices
    t = np.arange(scene.clip.n_frames)
    q = np.tile([[30.0, 40.0]], (len(t), 1))
    xy = scene.project(1, q, t)
    assert np.allclose(xy[5], scene.project(1, q[:1], 5)[0])


def test_masks_are_the_visible_object(scene, two_objects):
    for sc in (scene, two_objects):
        h, w = sc.clip.height, sc.clip.width
        grid = pixel_grid(h, w)
        for t in range(sc.clip.n_frames):
            masks = sc.clip.masks[t].reshape(-1, sc.n_objects) > 0.5
            for k in range(sc.n_objects):
                assert np.array_equal(masks[:, k], sc.visible(k, grid, t))
            assert np.array_equal(~masks.any(1), sc.visible(sc.background, grid, t))
    # the objects are substantial and stay mostly in frame
    area = scene.clip.masks[..., 0].sum((1, 2))
    assert area.min() > 0.06 * 128 * 72
    assert area.max() < 1.6 * area.min()  # grows by the scale change, never leaves the frame


def test_frames_are_the_textures_seen_through_the_ground_truth(scene, two_objects):
    """Away from object edges every pixel is its layer's texture at tex_coords, times the gain."""
    for sc in (scene, two_objects):
        grid = pixel_grid(sc.clip.height, sc.clip.width)
        for t in (0, sc.clip.n_frames - 1):
            frame = sc.clip.frames[t].reshape(-1, 3)
            for k in range(sc.n_layers):
                seen = sc.visible(k, grid, t, margin=1.0)
                assert seen.sum() > 50
                tex = sc.tex_coords[k][t].reshape(-1, 2)[seen].astype(np.float64)
                want = bilinear(sc.textures[k], tex) * sc.gain(k, grid[seen], t)[:, None]
                error = np.abs(frame[seen] - want)
                # OpenCV 4.x quantises warp weights to 1/32 texel (up to ~6e-3); 5.x: ~1e-5
                assert error.max() < 1e-2 and error.mean() < 5e-4


def test_ground_truth_correspondences_warp_frame_to_frame(scene):
    """Frame t sampled where the ground truth says frame t+1's pixels come from reproduces
    frame t+1 (up to the lighting gain ratio); assuming no motion does not."""
    sc = scene
    grid = pixel_grid(sc.clip.height, sc.clip.width)
    errors, still_errors = [], []
    for t in range(sc.clip.n_frames - 1):
        nxt = sc.clip.frames[t + 1].reshape(-1, 3)
        for k in range(sc.n_layers):
            src = sc.project(k, sc.tex_coords[k][t + 1].reshape(-1, 2).astype(np.float64), t)
            ok = sc.visible(k, grid, t + 1, margin=2.0) & sc.visible(k, src, t, margin=2.0)
            ratio = sc.gain(k, grid[ok], t + 1) / sc.gain(k, src[ok], t)
            pred = bilinear(sc.clip.frames[t], src[ok]) * ratio[:, None]
            errors.append(np.abs(pred - nxt[ok]).ravel())
            still_errors.append(np.abs(sc.clip.frames[t].reshape(-1, 3)[ok] - nxt[ok]).ravel())
    errors, still_errors = np.concatenate(errors), np.concatenate(still_errors)
    assert errors.mean() < 0.004 and np.quantile(errors, 0.99) < 0.025
    assert still_errors.mean() > 5 * errors.mean()


def test_motion_is_well_posed_and_scales_with_resolution(scene):
    sc = scene
    bg, t_all = sc.background, np.arange(sc.clip.n_frames)
    centre = np.array([[63.5, 35.5]])
    # background: a pan of a few pixels per frame, a gentle zoom
    tex = sc.unproject(bg, np.repeat(centre, len(t_all), 0), t_all)
    step = np.linalg.norm(np.diff(sc.project(bg, tex[:-1], t_all[1:]) - centre, axis=0), axis=1)
    seen_shift = np.linalg.norm(sc.project(bg, tex[:-1], t_all[1:]) - centre, axis=1)
    assert step.max() < 1.0 and 1.0 < seen_shift.mean() < 3.0
    zoom = np.sqrt(np.linalg.det(sc.transforms[:, bg, :, :2]))
    assert 1.08 < zoom[-1] / zoom[0] < 1.16
    # object: rotates ~30 degrees, grows ~20 %
    lin = sc.transforms[:, 0, :, :2]
    angle = np.degrees(np.arctan2(lin[:, 1, 0], lin[:, 0, 0]))
    turn = np.abs((angle[-1] - angle[0] + 180) % 360 - 180)
    assert 25 < turn < 35
    growth = np.sqrt(np.linalg.det(lin))
    assert 1.15 < growth[-1] / growth[0] < 1.25
    # twice the size: the same shot (masks agree after downsampling, frames nearly)
    big = make_synthetic_clip(256, 144, 24, seed=3)
    small_masks = big.clip.masks[..., 0].reshape(24, 72, 2, 128, 2).mean((2, 4)) >= 0.5
    assert alpha_iou(small_masks, sc.clip.masks[..., 0]) > 0.95
    small_frames = big.clip.frames.reshape(24, 72, 2, 128, 2, 3).mean((2, 4))
    assert np.abs(small_frames - sc.clip.frames).mean() < 0.02


def test_lighting_option(scene):
    flat = make_synthetic_clip(seed=3, lighting=False)
    grid = pixel_grid(72, 128)
    assert np.all(flat.gain(0, grid[:5], 7) == 1.0) and np.all(flat.gain(1, grid, 7) == 1.0)
    assert scene.gain(0, grid[:1], 0)[0] == pytest.approx(0.94)
    assert scene.gain(0, grid[:1], 23)[0] == pytest.approx(1.06)
    bg_gain = scene.gain(1, grid, 10)
    assert 0.93 < bg_gain.min() < 0.99 and 1.01 < bg_gain.max() < 1.07
    assert np.array_equal(flat.clip.masks, scene.clip.masks)
    assert np.allclose(flat.tex_coords[1], scene.tex_coords[1])


def test_write_and_load_round_trip(scene, tmp_path):
    scene.write(tmp_path / "clip")
    assert len(list((tmp_path / "clip" / "video_frames").glob("*.png"))) == 24
    assert len(list((tmp_path / "clip" / "masks" / "object0").glob("*.png"))) == 24
    back = load(tmp_path / "clip")
    assert np.abs(back.clip.frames - scene.clip.frames).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(back.clip.masks, scene.clip.masks)
    assert back.clip.mask_names == ["object0"] and back.clip.frame_names == scene.clip.frame_names
    assert back.clip.source == scene.clip.source and back.params == scene.params
    assert np.array_equal(back.transforms, scene.transforms)
    assert all(np.array_equal(a, b) for a, b in zip(back.textures, scene.textures))
    grid = pixel_grid(72, 128)
    assert np.array_equal(back.visible(0, grid, 9, margin=1), scene.visible(0, grid, 9, margin=1))
    assert np.array_equal(back.gain(1, grid, 9), scene.gain(1, grid, 9))
    scene.write(tmp_path / "clip")  # rewriting the same clip is fine
    with pytest.raises(FileExistsError):
        make_synthetic_clip(n_frames=3).write(tmp_path / "clip")  # would leave 21 stale frames


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        make_synthetic_clip(8, 8)
    with pytest.raises(ValueError):
        make_synthetic_clip(n_objects=0)
    with pytest.raises(ValueError):
        make_synthetic_clip(seed=-1)


# ----------------------------------------------------------------------------- yardsticks
def test_mark_drift_measures_a_known_offset():
    rng = np.random.default_rng(0)
    original = rng.uniform(0.2, 0.8, (6, 40, 60, 3)).astype(np.float32)
    expected = np.array([[10.0 + 5 * t, 20.0] for t in range(6)])
    edited = original.copy()
    ys, xs = np.mgrid[0:40, 0:60]
    for t in range(6):
        disc = np.hypot(xs - expected[t, 0] - 3.0, ys - expected[t, 1] - 4.0) <= 3.0
        edited[t][disc] = [1.0, 0.0, 0.0]
    edited += rng.normal(0, 0.003, edited.shape).astype(np.float32)  # below the threshold
    edited[4] = original[4]  # the mark is lost in frame 4
    visible = np.array([True, True, True, False, True, True])
    out = mark_drift(original, edited, expected, visible)
    assert out["frames_measured"] == 4 and out["frames_not_visible"] == 1
    assert out["frames_not_found"] == 1
    assert out["mean_px"] == pytest.approx(5.0, abs=0.05)
    assert out["max_px"] == pytest.approx(5.0, abs=0.1)
    assert math.isnan(out["per_frame_px"][3]) and math.isnan(out["per_frame_px"][4])
    assert out["per_frame_px"][0] == pytest.approx(5.0, abs=0.1)
    colored = mark_drift(original, edited, expected, visible, mark_color=(1.0, 0.0, 0.0))
    assert colored["frames_measured"] == 4
    assert colored["mean_px"] == pytest.approx(5.0, abs=0.05)
    none = mark_drift(original, original, expected)
    assert none["frames_measured"] == 0 and math.isnan(none["mean_px"])


def test_perfect_edit_of_the_ground_truth_has_no_drift(scene):
    """Paint a mark into the true object texture, re-render: the yardstick sees ~0 drift."""
    obj = 0
    rows, cols = np.nonzero(scene.clip.masks[0, ..., obj])
    start = np.array([[cols.mean(), rows.mean()]])  # the object's centre in frame 0
    q = scene.unproject(obj, start, 0)[0]
    tex = scene.textures[obj]
    rgba = np.concatenate([tex, np.ones(tex.shape[:2] + (1,), np.float32)], -1)
    color = (0.1, 0.9, 1.0)
    painted = paint_disc(rgba, texel_to_uv(q, tex.shape[:2]), 8.0, color)
    edited = scene.render([painted[..., :3], scene.textures[1]])
    expected, visible = scene.track(obj, q, margin=4.0)
    assert visible.all()
    out = mark_drift(scene.clip.frames, edited, expected, visible, mark_color=color)
    assert out["frames_measured"] == 24
    assert out["mean_px"] < 0.1 and out["max_px"] < 0.2
    # without the colour the centroid leans towards where the texture differs most from
    # the mark: still measured, but biased
    biased = mark_drift(scene.clip.frames, edited, expected, visible)
    assert biased["frames_measured"] == 24 and biased["mean_px"] < 1.5


def test_alpha_iou_on_known_overlaps():
    a = np.zeros((2, 10, 10), np.float32)
    b = np.zeros((2, 10, 10), np.float32)
    a[:, :, :6] = 0.9  # 60 px per frame
    b[:, :, 4:] = 1.0  # 60 px per frame, 20 shared
    assert alpha_iou(a, b) == pytest.approx(20 / 100)
    assert alpha_iou(a, a > 0.5) == 1.0
    assert alpha_iou(a * 0.5, b) == 0.0  # 0.45 is below the threshold
    assert alpha_iou(a * 0.5, b, threshold=0.4) == pytest.approx(0.2)
    assert alpha_iou(np.zeros((1, 3, 3)), np.zeros((1, 3, 3))) == 1.0
    with pytest.raises(ValueError):
        alpha_iou(a, b[:1])


def test_psnr():
    a = np.zeros((3, 4, 4, 3))
    b = np.full((3, 4, 4, 3), 0.1)
    assert psnr(a, b) == pytest.approx(20.0)
    assert psnr(a, a) == float("inf")
    assert psnr(a, b * 2, data_range=2.0) == pytest.approx(20.0)
    b[1] = 0.0
    per = psnr_per_frame(a, b)
    assert per.shape == (3,) and per[0] == pytest.approx(20.0) and per[1] == float("inf")


def test_atlas_texel_convention_and_paint_disc():
    size = (8, 16)  # rows, cols
    assert np.allclose(texel_to_uv([0, 0], size), [-1 + 1 / 16, -1 + 1 / 8])
    assert np.allclose(texel_to_uv([15, 7], size), [1 - 1 / 16, 1 - 1 / 8])
    assert np.allclose(uv_to_texel([-1.0, 1.0], size), [-0.5, 7.5])  # square corners: texel edges
    pts = np.random.default_rng(1).uniform(-1, 16, (20, 2))
    assert np.allclose(uv_to_texel(texel_to_uv(pts, size), size), pts)

    atlas = np.zeros((64, 64, 4), np.float32)
    centre = texel_to_uv([20, 30], (64, 64))  # texel column 20, row 30
    out = paint_disc(atlas, centre, 6.0, (1.0, 0.5, 0.0))
    assert not atlas.any()  # the input is left alone
    assert np.allclose(out[30, 20], [1.0, 0.5, 0.0, 1.0])
    cover = out[..., 3]
    assert cover.sum() == pytest.approx(math.pi * 36, rel=0.03)
    rows, cols = np.mgrid[0:64, 0:64]
    assert (cover * cols).sum() / cover.sum() == pytest.approx(20, abs=1e-3)
    assert (cover * rows).sum() / cover.sum() == pytest.approx(30, abs=1e-3)
    edge = cover[30, 20 + 6]  # on the radius: half covered (anti-aliased)
    assert edge == pytest.approx(0.5)
    half = paint_disc(np.ones((16, 16, 4), np.float32), [0.0, 0.0], 3.0, (0, 0, 0, 0.5))
    assert half[8, 8, 0] == pytest.approx(0.5) and half[8, 8, 3] == pytest.approx(1.0)
    assert np.array_equal(paint_disc(atlas, [5.0, 5.0], 3.0, (1, 1, 1)), atlas)  # off the atlas
