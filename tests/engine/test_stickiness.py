"""Edit stickiness against a flow (backend/synthetic/stickiness.py, scripts/bench/edit_stickiness.py):
the dot finder and the error computation on dots moved by a known motion; the whole measurement
through the engine's edit path on a bake made of the synthetic clip's ground truth (~0 error) and
on a short CPU decomposition of it (finite, well below the motion), against its true flow."""

import numpy as np
import pytest

from backend.synthetic import make_synthetic_clip, paint_disc
from backend.synthetic.stickiness import (FOUND, NOT_FOUND, OCCLUDED, dot_grid, dot_id_atlas, dot_weights,
                                          flow_errors, ids_from_uv, locate_dots, measure_layer,
                                          paint_dots, sample_bilinear, synthetic_flow, to_flow_pixels)
from backend.synthetic.yardsticks import texel_to_uv

from .conftest import textured_frames

H, W, F_ = 48, 80, 12
COLOUR = (1.0, 0.0, 1.0)
R_PX = 1.8


def motion(t):
    """A known similarity motion of frame 0's points to frame t: turning and drifting."""
    a = np.deg2rad(0.6 * t)
    m = 1.0 + 0.004 * t
    lin = m * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return lin, np.array([0.73 * t, -0.41 * t]) + (np.eye(2) - lin) @ [W / 2, H / 2]


def affine_flow(scale=1, bias=(0.0, 0.0)):
    """(F-1, H*scale, W*scale, 2) exact flow of ``motion`` in an image ``scale`` times larger."""
    ys, xs = np.mgrid[0:H * scale, 0:W * scale].astype(np.float64)
    p = np.stack([(xs + 0.5) / scale - 0.5, (ys + 0.5) / scale - 0.5], -1)  # working-size points
    out = np.empty((F_ - 1, H * scale, W * scale, 2), np.float32)
    for t in range(F_ - 1):
        (l0, b0), (l1, b1) = motion(t), motion(t + 1)
        q = (p - b0) @ np.linalg.inv(l0).T @ l1.T + b1
        out[t] = (q - p) * scale + np.asarray(bias)
    return out


@pytest.fixture(scope="module")
def moved_dots():
    """Frames with dots painted where ``motion`` takes them, the dot ids a uv map would give,
    and an alpha that hides one dot; returns (tracks (F, N, 2), statuses (F, N), truth (F, N, 2))."""
    ys, xs = np.mgrid[0:H, 0:W]
    p0 = np.stack(np.meshgrid(np.arange(8.0, W - 8, 9.0), np.arange(8.0, H - 8, 9.0)), -1).reshape(-1, 2)
    p0 += [0.3, 0.2]
    frames = textured_frames(F_, W, H, seed=1) * 0.6 + 0.2
    tracks, statuses, truth = [], [], []
    for t in range(F_):
        lin, b = motion(t)
        pt = p0 @ lin.T + b
        d = np.hypot(xs[..., None] - pt[:, 0], ys[..., None] - pt[:, 1])  # (H, W, N)
        cover = np.clip(R_PX - d + 0.5, 0, 1).max(-1)
        edited = frames[t] + cover[..., None] * (np.asarray(COLOUR, np.float32) - frames[t])
        ids = np.where(d.min(-1) <= R_PX + 1.5, d.argmin(-1), -1)
        alpha = np.ones((H, W), np.float32)
        alpha[np.hypot(xs - pt[0, 0], ys - pt[0, 1]) < 2.0] = 0.3  # dot 0 half hidden
        xy, st = locate_dots(dot_weights(frames[t], edited, COLOUR), ids, len(p0), alpha,
                             reach_px=R_PX + 1.5, min_weight=0.3 * np.pi * R_PX ** 2)
        tracks.append(xy), statuses.append(st), truth.append(pt)
    return np.stack(tracks), np.stack(statuses), np.stack(truth)


def test_dots_moved_by_a_known_motion_measure_no_error(moved_dots):
    tracks, status, truth = moved_dots
    assert (status[:, 0] == OCCLUDED).all()  # the hidden dot is never used
    found = status == FOUND
    assert found[:, 1:].mean() > 0.9
    assert (status[~found] != FOUND).all() and np.isnan(tracks[~found]).all()
    lost = status == NOT_FOUND  # only dots that left the frame
    assert ((truth[lost] < R_PX) | (truth[lost] > [W - 1 - R_PX, H - 1 - R_PX])).any(-1).all()
    assert np.abs(tracks[found] - truth[found]).max() < 0.06  # centroids of anti-aliased discs
    for scale in (1, 2):  # a flow at the working size and at twice it
        e = flow_errors(tracks, affine_flow(scale), (H, W), chain=10)
        assert e["pairs"] > 0.6 * (F_ - 1) * tracks.shape[1] and e["chains"] > 0
        assert e["epe_mean_px"] < 0.05 * scale and e["chain_epe_mean_px"] < 0.05 * scale
        assert np.isfinite(e["per_frame_mean_px"]).all()


def test_a_biased_flow_measures_its_bias(moved_dots):
    tracks = moved_dots[0]
    e = flow_errors(tracks, affine_flow(2, bias=(0.6, -0.8)), (H, W), chain=10)
    assert e["epe_mean_px"] == pytest.approx(1.0, abs=0.06)  # |(0.6, -0.8)| in the flow's pixels
    assert e["chain_epe_mean_px"] > 5.0  # ten biased steps drift away from the dot


def test_sampling_and_coordinate_helpers():
    field = np.arange(12, dtype=np.float32).reshape(3, 4, 1)  # value = 4 row + col
    got = sample_bilinear(field, [[0.5, 0.25], [3, 2], [3.01, 0], [np.nan, 1]])[:, 0]
    assert got[:2].tolist() == [1.5, 11.0] and np.isnan(got[2:]).all()
    assert to_flow_pixels([[0.0, 0.0], [9.5, 4.5]], (10, 20), (20, 40)).tolist() == [[0.5, 0.5], [19.5, 9.5]]


def test_dot_grid_paint_and_ids_agree():
    S = 64
    seen = np.zeros((S, S), np.float32)
    seen[:, :40] = 1.0
    centres = dot_grid(seen, 10.0, 1.5)
    assert len(centres) and (centres[:, 0] + 2.5 <= 40).all()  # only where the layer is seen
    layer = paint_dots((S, S), centres, 1.5, COLOUR)
    one = paint_disc(np.zeros((S, S, 4), np.float32), texel_to_uv(centres[0], (S, S)), 1.5, COLOUR)
    r, c = int(centres[0, 1]), int(centres[0, 0])
    assert np.array_equal(layer[r - 3:r + 4, c - 3:c + 4], one[r - 3:r + 4, c - 3:c + 4])
    ids = dot_id_atlas((S, S), centres, 1.5)
    assert (ids[layer[..., 3] > 0] >= 0).all()  # every painted texel belongs to a dot
    uv = texel_to_uv(centres, (S, S))[None]  # a one-row "uv map" through the dot centres
    assert ids_from_uv(ids, uv)[0].tolist() == list(range(len(centres)))
    assert ids_from_uv(ids, np.full((1, 1, 2), 1.5))[0, 0] == -1  # outside the atlas


@pytest.fixture(scope="module")
def scene_and_flow(tmp_path_factory):
    """The synthetic clip (written as a seed-layout folder) and its true forward flow."""
    scene = make_synthetic_clip(width=64, height=36, n_frames=8, seed=2)
    clip = scene.write(tmp_path_factory.mktemp("stick") / "clip")
    return scene, clip, synthetic_flow(scene)


def ground_truth_decomposition(scene, clip, root):
    """A decomposition folder whose baked maps are the synthetic clip's ground truth: each
    layer's texture as its atlas, the true texture coordinates as uv, the true masks as alpha."""
    from backend.clip import load_clip, write_json
    bake = root / "bake"
    bake.mkdir(parents=True)
    fg = scene.clip.masks[..., 0]
    sizes = []
    for k in range(scene.n_layers):
        tex = scene.textures[k]
        S = max(tex.shape[:2])
        atlas = np.zeros((S, S, 3), np.float32)
        atlas[:tex.shape[0], :tex.shape[1]] = tex
        seen = np.zeros((S, S), np.float32)
        seen[:tex.shape[0], :tex.shape[1]] = 1.0
        np.save(bake / f"atlas_{k}.npy", atlas)
        np.save(bake / f"atlas_{k}_seen.npy", seen)
        np.save(bake / f"layer_{k}_uv.npy", texel_to_uv(scene.tex_coords[k], (S, S)).astype(np.float32))
        np.save(bake / f"layer_{k}_alpha.npy", (fg if k == 0 else 1 - fg).astype(np.float16))
        np.save(bake / f"layer_{k}_residual.npy", np.ones(fg.shape + (3,), np.float16))
        sizes.append(S)
    F, h, w = fg.shape
    write_json(bake / "meta.json", {"frames": F, "height": h, "width": w, "layers": 2, "maps": True,
                                    "atlas_size": sizes})
    src = load_clip(clip, masks=[], long_edge=max(w, h))
    write_json(root / "report.json", {
        "layers": [{"index": 0, "name": "object0", "kind": "object"},
                   {"index": 1, "name": "background", "kind": "background"}],
        "clip": {"source": str(clip), "frame_range": list(src.frame_range), "frames": F, "width": w,
                 "height": h, "source_size": [w, h], "fingerprint": src.fingerprint(), "fps": 24.0},
        "config": {"export": {"video_fps": 24.0}}})
    return root


def test_the_ground_truth_sticks_to_the_true_flow(scene_and_flow, tmp_path):
    """Through the engine's edit path, maps that are the ground truth measure ~0 against the
    true flow: the whole chain (grid, paint, render, ids from uv, centroids, flow) is exact."""
    scene, clip, flow = scene_and_flow
    bg = scene.background
    p = np.argwhere(scene.clip.masks[3, ..., 0] == 0)[:1, ::-1].astype(np.float64)  # a background pixel
    assert np.allclose(sample_bilinear(flow[3], p), scene.project(bg, scene.unproject(bg, p, 3), 4) - p,
                       atol=1e-3)
    dec = ground_truth_decomposition(scene, clip, tmp_path / "gt")
    for layer, spacing in ((bg, 8.0), (0, 4.0)):
        m = measure_layer(dec, layer, flow, spacing_px=spacing, radius_px=1.5, chain=5)
        assert m["dots_tracked"] >= (10 if layer == bg else 2) and m["pairs"] > 0 and m["chains"] > 0, m
        assert m["epe_median_px"] < 0.1 and m["chain_epe_median_px"] < 0.2, m
        assert m["epe_mean_px"] < 0.15 and m["chain_epe_mean_px"] < 0.3, m


def test_a_short_cpu_decomposition_measures_a_finite_small_error(scene_and_flow, tmp_path):
    from backend.config import preset
    from backend.pipeline import decompose
    scene, clip, flow = scene_and_flow
    cfg = preset("demo").replace(train={"device": "cpu", "iterations": 60, "pretrain_iterations": 5,
                                        "checkpoint_every": 1000},
                                 clip={"long_edge": 64})
    out = decompose(clip, tmp_path / "dec", cfg)
    m = measure_layer(out, scene.background, flow, spacing_px=8.0, radius_px=1.5, chain=5, min_alpha=0.5)
    assert m["dots_tracked"] >= 5 and m["pairs"] > 0, m
    # small: well below the motion itself (an edit frozen on screen would measure about that)
    motion = float(np.linalg.norm(flow, axis=-1).mean())
    assert motion > 2.0
    assert np.isfinite(m["epe_mean_px"]) and m["epe_mean_px"] < 0.5 * motion, (m, motion)
