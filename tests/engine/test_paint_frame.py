"""Painting on a frame (backend.edit.paint) against a decomposition with known, exact maps.

The decomposition here is written by hand: layer 0 an "object" (a rectangle moving 2 px per
frame, its atlas magnified 3.2 texels per pixel), layer 1 the background (static, minified
0.64 texels per pixel, residual gain 1.25), so where each painted pixel must land is known.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from backend.clip import load_clip, write_json, write_png, write_png16_rgba
from backend.edit import EditRenderer
from backend.edit.paint import paint_frame
from backend.errors import ClipError, ConfigError, NeuralAtlasError, OutputError
from backend.export.atlas import sample_atlas

ROOT = Path(__file__).resolve().parents[2]
H, W, F_ = 24, 40, 3
S0, S1 = 64, 32
BG_GAIN = 1.25


def obj_uv(x, y, f):
    return 0.1 * (x - 2 * f - 20), 0.1 * (y - 12)


def bg_uv(x, y, f):
    return (x - 20) / 25, (y - 12) / 25


def texel(uv, S):
    return (uv[0] + 1) * S / 2 - 0.5, (uv[1] + 1) * S / 2 - 0.5


@pytest.fixture
def dec(tmp_path):
    """A hand-made decomposition folder: report.json, bake/ and the source frames."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    a0 = np.zeros((F_, H, W), np.float32)
    uv0 = np.zeros((F_, H, W, 2), np.float32)
    uv1 = np.zeros((F_, H, W, 2), np.float32)
    for f in range(F_):
        inside = (xs >= 10 + 2 * f) & (xs <= 25 + 2 * f) & (ys >= 6) & (ys <= 18)
        a0[f][inside] = 1.0
        a0[f][(xs == 9 + 2 * f) & (ys >= 6) & (ys <= 18)] = 0.5  # an anti-aliased left edge
        uv0[f, ..., 0], uv0[f, ..., 1] = obj_uv(xs, ys, f)
        uv1[f, ..., 0], uv1[f, ..., 1] = bg_uv(xs, ys, f)
    atlases = [cv2.GaussianBlur(rng.random((S, S, 3), np.float32), (0, 0), 1.5) * 0.5 + 0.2 for S in (S0, S1)]
    maps = {0: (uv0, a0, np.ones((F_, H, W, 3))), 1: (uv1, 1 - a0, np.full((F_, H, W, 3), BG_GAIN))}
    # the plate is the layers' composite (what a perfect decomposition reconstructs)
    frames = sum(torch.from_numpy(a)[..., None] * torch.from_numpy(r).float()
                 * sample_atlas(torch.from_numpy(atlases[i]), torch.from_numpy(uv)) for i, (uv, a, r) in maps.items())
    src = tmp_path / "source"
    for f in range(F_):
        write_png(src / f"{f:05d}.png", frames[f].numpy())
    clip = load_clip(src, masks=[], long_edge=max(W, H))
    root = tmp_path / "dec"
    bake = root / "bake"
    bake.mkdir(parents=True)
    for i, (uv, a, r) in maps.items():
        np.save(bake / f"layer_{i}_uv.npy", uv)
        np.save(bake / f"layer_{i}_alpha.npy", a.astype(np.float16))
        np.save(bake / f"layer_{i}_residual.npy", r.astype(np.float16))
        np.save(bake / f"atlas_{i}.npy", atlases[i])
        np.save(bake / f"atlas_{i}_seen.npy", np.ones(atlases[i].shape[:2], np.float32))
    write_json(bake / "meta.json", {"frames": F_, "height": H, "width": W, "layers": 2, "maps": True,
                                    "atlas_size": [S0, S1]})
    write_json(root / "report.json", {
        "layers": [{"index": 0, "name": "object0", "kind": "object"}, {"index": 1, "name": "background",
                                                                       "kind": "background"}],
        "clip": {"source": str(src), "frame_range": list(clip.frame_range), "frames": F_, "width": W, "height": H,
                 "source_size": [2 * W, 2 * H], "fingerprint": clip.fingerprint(), "fps": 24.0},
        "config": {"export": {"video_fps": 24.0}}})
    return root


def disc(cx, cy, r, colour, size=(H, W)):
    ys, xs = np.mgrid[0:size[0], 0:size[1]]
    img = np.zeros(size + (4,), np.float32)
    img[..., :3] = colour
    img[..., 3] = np.clip(r - np.hypot(xs - cx, ys - cy) + 0.5, 0, 1)
    return img


def read_rgba(path):
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return raw[..., [2, 1, 0, 3]].astype(np.float64) / (65535.0 if raw.dtype == np.uint16 else 255.0), raw.dtype


def centroid(cover):
    ys, xs = np.mgrid[0:cover.shape[0], 0:cover.shape[1]]
    return (cover * xs).sum() / cover.sum(), (cover * ys).sum() / cover.sum()


def test_a_mark_lands_at_its_texels_in_the_owning_layer_only(dec, tmp_path):
    out = tmp_path / "edits"
    info = paint_frame(dec, 1, disc(16, 11, 2.2, (1.0, 0.0, 1.0)), out_edits=out)
    assert set(info["layers"]) == {"0"} and info["dropped_pixels"] == 0 and info["resolution"] == "working"
    assert not (out / "layer_1.png").exists()
    rgba, dtype = read_rgba(out / "layer_0.png")
    assert rgba.shape == (S0, S0, 4) and dtype == np.uint16  # new edit layers: 16-bit RGBA, the atlas's size
    cx, cy = centroid(rgba[..., 3])
    ex, ey = texel(obj_uv(16, 11, 1), S0)
    assert abs(cx - ex) < 0.05 and abs(cy - ey) < 0.05


def test_a_magnified_atlas_gets_no_holes(dec, tmp_path):
    """3.2 texels per pixel: every texel whose point lies inside a painted block of pixels is painted."""
    paint = np.zeros((H, W, 4), np.float32)
    paint[8:15, 13:20] = (1.0, 0.0, 1.0, 1.0)  # pixel centres x 13..19, y 8..14
    paint_frame(dec, 1, paint, out_edits=tmp_path / "edits")
    rgba, _ = read_rgba(tmp_path / "edits" / "layer_0.png")
    c = np.arange(S0)
    u = -1 + (2 * c + 1) / S0
    x = u / 0.1 + 2 + 20  # the pixel x each texel column shows at frame 1 (and y likewise)
    y = u / 0.1 + 12
    inside = ((y[:, None] >= 8) & (y[:, None] <= 14)) & ((x[None, :] >= 13) & (x[None, :] <= 19))
    assert inside.sum() > 300
    assert rgba[..., 3][inside].min() == 1.0 and np.allclose(rgba[..., :3][inside], [1.0, 0.0, 1.0], atol=1e-4)
    outside = ((y[:, None] < 7) | (y[:, None] > 15)) | ((x[None, :] < 12) | (x[None, :] > 20))
    assert not rgba[..., 3][outside].any()


def test_the_render_shows_the_paint_at_the_painted_frame_and_follows_the_surface(dec, tmp_path):
    out = tmp_path / "edits"
    colour = (0.9, 0.1, 0.3)
    paint = disc(16, 12, 4.0, colour)
    paint_frame(dec, 0, paint, out_edits=out)
    r = EditRenderer(dec, {0: out / "layer_0.png"})
    for f in range(F_):  # the object moves 2 px a frame: the mark with it
        got = r.frame(f)
        # pixels whose neighbours are fully painted too (bilinear lookups reach a texel around)
        solid = cv2.erode((paint[..., 3] > 0.999).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        inside = np.roll(solid, 2 * f, axis=1)
        assert inside.sum() >= 9 and np.abs(got[inside] - colour).max() < 3e-3, f
        # nothing changes farther than a pixel from the paint (a lookup blends texels around its point)
        changed = np.abs(got - r.frame(f, edited=False)).sum(-1) > 1e-3
        near = cv2.dilate((paint[..., 3] > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert changed.any() and not (changed & ~np.roll(near, 2 * f, axis=1)).any()


def test_background_paint_is_divided_by_the_residual_and_box_filtered(dec, tmp_path):
    out = tmp_path / "edits"
    paint = np.zeros((H, W, 4), np.float32)
    paint[1:5, 28:36] = (0.5, 0.25, 1.0, 1.0)  # on the background, which has gain 1.25
    info = paint_frame(dec, 2, paint, out_edits=out)
    assert set(info["layers"]) == {"1"}
    rgba, _ = read_rgba(out / "layer_1.png")
    solid = rgba[..., 3] > 0.999
    assert solid.sum() >= 6
    assert np.allclose(rgba[..., :3][solid], [0.4, 0.2, 0.8], atol=1e-4)  # colour / R, so R * it = as painted
    r = EditRenderer(dec, {1: out / "layer_1.png"})
    got = r.frame(2)
    plate = r.frame(2, edited=False)
    assert np.allclose(got[2:4, 30:34], [0.5, 0.25, 1.0], atol=3e-3)  # as painted (to the plate's 8 bits)
    assert np.array_equal(got[12:, :], plate[12:, :])


def test_edges_are_shared_and_layer_choice_drops_what_it_does_not_see(dec, tmp_path):
    paint = np.zeros((H, W, 4), np.float32)
    paint[10:13, 5:14] = (0.2, 0.8, 0.2, 1.0)  # across the object's left edge at x = 9 (alpha 0.5)
    info = paint_frame(dec, 0, paint, out_edits=tmp_path / "both")
    assert set(info["layers"]) == {"0", "1"} and info["dropped_pixels"] == 0
    # rendered at the painted frame, the stroke covers the edge pixels fully
    r = EditRenderer(dec, {0: tmp_path / "both" / "layer_0.png", 1: tmp_path / "both" / "layer_1.png"})
    got = r.frame(0)
    assert np.abs(got[11, 9] - [0.2, 0.8, 0.2]).max() < 0.02
    only_bg = paint_frame(dec, 0, paint, layer=1, out_edits=tmp_path / "bg")
    assert set(only_bg["layers"]) == {"1"}
    assert only_bg["dropped_pixels"] == 3 * 4  # x = 10..13 are the object's (x = 9 is shared)


def test_strokes_accumulate_over_other_paint_left_bit_exact(dec, tmp_path):
    out = tmp_path / "edits"
    out.mkdir()
    existing = np.zeros((S0, S0, 4), np.uint8)
    existing[2:6, 50:60] = (10, 200, 30, 128)  # 8-bit paint elsewhere
    cv2.imwrite(str(out / "layer_0.png"), existing[..., [2, 1, 0, 3]])
    paint_frame(dec, 0, disc(14, 9, 2.0, (1.0, 1.0, 0.0)), out_edits=out)
    first = cv2.imread(str(out / "layer_0.png"), cv2.IMREAD_UNCHANGED)[..., [2, 1, 0, 3]]
    assert first.dtype == np.uint8 and np.array_equal(first[2:6, 50:60], existing[2:6, 50:60])
    info = paint_frame(dec, 2, disc(24, 15, 2.0, (0.0, 0.0, 1.0)), out_edits=out)  # another frame
    assert info["layers"]["0"]["created"] is False and info["layers"]["0"]["bits"] == 8
    second = cv2.imread(str(out / "layer_0.png"), cv2.IMREAD_UNCHANGED)[..., [2, 1, 0, 3]]
    touched = np.any(second != first, -1)
    assert touched.any() and np.array_equal(second[~touched], first[~touched])
    cx, cy = centroid((second[..., 3] * (second[..., 2] > 128)).astype(np.float64))  # the blue mark
    ex, ey = texel(obj_uv(24, 15, 2), S0)
    assert abs(cx - ex) < 0.3 and abs(cy - ey) < 0.3
    # paint over paint: the yellow mark where the blue one overlaps it keeps its coverage (OVER)
    assert np.array_equal(second[2:6, 50:60], existing[2:6, 50:60])


def test_source_resolution_paint_lands_in_the_same_place(dec, tmp_path):
    info = paint_frame(dec, 1, disc(2 * 16 + 0.5, 2 * 11 + 0.5, 4.4, (1, 0, 0), size=(2 * H, 2 * W)),
                       out_edits=tmp_path / "src")
    assert info["resolution"] == "source"
    rgba, _ = read_rgba(tmp_path / "src" / "layer_0.png")
    cx, cy = centroid(rgba[..., 3])
    ex, ey = texel(obj_uv(16, 11, 1), S0)
    assert abs(cx - ex) < 0.1 and abs(cy - ey) < 0.1


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "backend", "paint-frame", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_paints_and_bad_input_exits_2_changing_nothing(dec, tmp_path):
    out = tmp_path / "edits"
    good = write_png16_rgba(tmp_path / "paint.png", disc(16, 11, 2.0, (1, 0, 1)))
    res = _cli(dec, "--frame", 1, "--image", good, "--out-edits", out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["layers"]["0"]["texels"] > 0
    before = (out / "layer_0.png").read_bytes()
    small = write_png16_rgba(tmp_path / "small.png", np.zeros((10, 10, 4), np.float32))
    rgb = write_png(tmp_path / "rgb.png", np.zeros((H, W, 3), np.float32))
    cases = [(("--frame", 1, "--image", small), f"10x10; paint on frame 1 at .* {W}x{H} or the source resolution"),
             (("--frame", 3, "--image", good), "frame 3 is outside the shot: it has frames 0..2"),
             (("--frame", -1, "--image", good), "outside the shot"),
             (("--frame", 1, "--image", rgb), "has no alpha channel"),
             (("--frame", 1, "--image", good, "--layer", 2), "layer 2 does not exist"),
             (("--frame", 1, "--image", tmp_path / "missing.png"), "image not found")]
    for args, msg in cases:
        res = _cli(dec, *args, "--out-edits", out)
        assert res.returncode == 2 and __import__("re").search(msg, res.stderr), (args, res.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["layer_0.png"] and (out / "layer_0.png").read_bytes() == before
    # an edit folder that cannot be written
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli(dec, "--frame", 1, "--image", good, "--out-edits", blocker / "edits")
    assert res.returncode == 2 and "not writable" in res.stderr
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        os.chmod(out, 0o555)
        try:
            res = _cli(dec, "--frame", 1, "--image", good, "--out-edits", out)
            assert res.returncode == 2 and "not writable" in res.stderr
        finally:
            os.chmod(out, 0o755)
        assert (out / "layer_0.png").read_bytes() == before
    # a decomposition without its per-frame maps says how to add them
    meta = dec / "bake" / "meta.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), maps=False)))
    res = _cli(dec, "--frame", 1, "--image", good, "--out-edits", out)
    assert res.returncode == 2 and "render" in res.stderr and "--bake" in res.stderr
    assert (out / "layer_0.png").read_bytes() == before


def test_edit_images_that_are_not_edit_layers_are_refused(dec, tmp_path):
    out = tmp_path / "edits"
    out.mkdir()
    write_png(out / "layer_0.png", np.zeros((S0, S0, 3), np.float32))  # RGB
    with pytest.raises(ClipError, match="not an 8- or 16-bit RGBA edit layer"):
        paint_frame(dec, 0, disc(16, 11, 2.0, (1, 0, 1)), out_edits=out)
    write_png16_rgba(out / "layer_0.png", np.zeros((S0 // 2, S0 // 2, 4), np.float32))
    with pytest.raises(ClipError, match="keeps edit layers at the atlas size"):
        paint_frame(dec, 0, disc(16, 11, 2.0, (1, 0, 1)), out_edits=out)
    atlas_copy = np.concatenate([np.load(dec / "bake" / "atlas_0.npy"), np.ones((S0, S0, 1), np.float32)], -1)
    write_png16_rgba(out / "layer_0.png", atlas_copy)
    with pytest.raises(ClipError, match="painted copy of the atlas"):
        paint_frame(dec, 0, disc(16, 11, 2.0, (1, 0, 1)), out_edits=out)
    with pytest.raises(ConfigError, match="outside the shot"):
        paint_frame(dec, True, disc(16, 11, 2.0, (1, 0, 1)), out_edits=out)
    assert issubclass(OutputError, NeuralAtlasError)
