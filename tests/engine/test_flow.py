"""Optical flow: DIS accuracy, consistency masks, rescaling, the method registry and the cache."""

from __future__ import annotations

import json
import sys
import warnings

import cv2
import numpy as np
import pytest

from backend.clip import Clip, load_clip
from backend.errors import ClipError, ConfigError, OutputError
from backend.preprocess.flow import (
    FLOW_METHODS,
    FlowMethodUnavailable,
    compute_flow,
    consistency_mask,
    dis_flow,
    rescale_flow,
)

SHIFT = np.array([2.5, -1.25], np.float32)


def sinusoids(width: int, height: int, shift=(0.0, 0.0), seed: int = 0) -> np.ndarray:
    """A band-limited random texture sampled exactly at (x - dx, y - dy): uint8 RGB (H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    x -= shift[0]
    y -= shift[1]
    img = np.zeros((height, width))
    for _ in range(24):
        f = rng.uniform(0.05, 0.35, 2) * rng.choice([-1, 1], 2)
        img += np.sin(f[0] * x + f[1] * y + rng.uniform(0, 2 * np.pi))
    img = (img + 24) / 48  # fixed normalisation so both frames share one intensity scale
    g = (img * 255 + 0.5).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def shifted_clip(n: int = 3, width: int = 128, height: int = 96) -> Clip:
    """Frames translating by SHIFT px per frame."""
    frames = np.stack([sinusoids(width, height, SHIFT * i) for i in range(n)]).astype(np.float32) / 255
    return Clip(frames=frames, source="synthetic-shift", frame_range=(0, n))


# ------------------------------------------------------------------ DIS
def test_dis_recovers_subpixel_shift():
    a = sinusoids(128, 96)[None]
    b = sinusoids(128, 96, SHIFT)[None]
    flow = dis_flow(a, b)[0]
    err = np.linalg.norm(flow - SHIFT, axis=-1)[16:-16, 16:-16]
    # measured: mean 0.015 px (max 0.056) with the default "fine" preset, 0.026 with MEDIUM
    assert err.mean() < 0.05, err.mean()
    back = dis_flow(b, a)[0]
    assert np.linalg.norm(back + SHIFT, axis=-1)[16:-16, 16:-16].mean() < 0.05


def test_dis_is_deterministic():
    a = sinusoids(64, 48)[None]
    b = sinusoids(64, 48, SHIFT)[None]
    np.testing.assert_array_equal(dis_flow(a, b), dis_flow(a, b))


def test_dis_pool_gives_the_serial_flows():
    """Pairs on worker threads, OpenCV's threading off: the same flows, the thread count restored."""
    rng = np.random.default_rng(1)
    seq = np.stack([sinusoids(96, 64, SHIFT * i) for i in range(5)])
    seq = np.clip(seq.astype(np.int16) + rng.integers(-8, 9, seq.shape), 0, 255).astype(np.uint8)
    src, dst = np.concatenate([seq[:-1], seq[1:]]), np.concatenate([seq[1:], seq[:-1]])
    before = cv2.getNumThreads()
    serial = dis_flow(src, dst, workers=1)
    for workers in (2, 3, 8):
        np.testing.assert_array_equal(dis_flow(src, dst, workers=workers), serial)
    assert cv2.getNumThreads() == before
    # a single pair is the serial path; bad pixels still raise
    np.testing.assert_array_equal(dis_flow(src[:1], dst[:1], workers=4), serial[:1])
    with pytest.raises(cv2.error):
        dis_flow(src[:, :10], dst, workers=2)


def test_compute_flow_shapes_directions_and_progress():
    clip = shifted_clip(n=4)
    calls = []
    fs = compute_flow(clip, progress=lambda done, total: calls.append((done, total)))
    assert fs.method == "dis" and fs.forward.shape == (3, 96, 128, 2)
    assert fs.forward.dtype == np.float32 and fs.backward.shape == fs.forward.shape
    assert fs.forward_ok.shape == (3, 96, 128) and fs.forward_ok.dtype == bool
    inner = (slice(None), slice(16, -16), slice(16, -16))
    assert np.abs(fs.forward[inner] - SHIFT).mean() < 0.05
    assert np.abs(fs.backward[inner] + SHIFT).mean() < 0.05
    assert fs.forward_ok[inner].mean() > 0.99 and fs.backward_ok[inner].mean() > 0.99
    assert calls and calls[-1] == (3, 3)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("cached", [False, True])
def test_compute_flow_finishes_pairs_on_a_pool_with_the_serial_result(tmp_path, monkeypatch, cached):
    """Rescaling, storing and the consistency masks run per pair on a pool beside the flow method:
    flows and masks equal a one-thread run's and the masks are those of the stored flows (what a
    cache hit would compute), with the pairs spread over several chunks."""
    import backend.preprocess.flow as F
    rng = np.random.default_rng(3)
    seq = np.stack([sinusoids(96, 64, SHIFT * i) for i in range(12)])
    seq = np.clip(seq.astype(np.int16) + rng.integers(-8, 9, seq.shape), 0, 255).astype(np.uint8)
    clip = Clip(frames=seq.astype(np.float32) / 255, source="pool", frame_range=(0, 12))
    runs = {}
    for workers in (1, 3):
        monkeypatch.setattr(F, "dis_workers", lambda w=workers: w)
        monkeypatch.setattr(F, "_PAIRS_PER_CALL", 2)  # 11 pairs: 6 chunks, two in flight
        calls = []
        runs[workers] = F.compute_flow(clip, long_edge=64, progress=lambda d, n: calls.append(d),
                                       cache_dir=tmp_path / f"c{workers}" if cached else None)
        assert calls == [2, 4, 6, 8, 10, 11]
    one, pooled = runs[1], runs[3]
    for a, b in ((one.forward, pooled.forward), (one.backward, pooled.backward),
                 (one.forward_ok, pooled.forward_ok), (one.backward_ok, pooled.backward_ok)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    f, b = np.asarray(pooled.forward, np.float32), np.asarray(pooled.backward, np.float32)
    np.testing.assert_array_equal(pooled.forward_ok, consistency_mask(f, b, 1.0))
    np.testing.assert_array_equal(pooled.backward_ok, consistency_mask(b, f, 1.0))
    assert pooled.forward_ok.mean() > 0.5
    if cached:  # the masks were written with the flows: a hit reads them back
        hit = F.compute_flow(clip, long_edge=64, cache_dir=tmp_path / "c3")
        np.testing.assert_array_equal(np.asarray(hit.forward_ok), np.asarray(pooled.forward_ok))


def test_a_failing_flow_method_stops_the_pool_and_leaves_no_cache(tmp_path, monkeypatch):
    import backend.preprocess.flow as F
    clip = shifted_clip(n=8, width=48, height=32)
    monkeypatch.setattr(F, "_PAIRS_PER_CALL", 2)
    seen = []

    def flaky(src, dst):
        seen.append(len(src))
        if len(seen) == 3:
            raise RuntimeError("flow method broke")
        return dis_flow(src, dst, workers=1)

    with pytest.raises(RuntimeError, match="broke"):
        F._compute_into_cache(tmp_path / "flow_x", clip, flaky, (48, 32), "t", None)
    assert not any(tmp_path.iterdir())  # neither the folder nor its temporary


def test_compute_flow_needs_two_frames():
    clip = Clip(frames=np.zeros((1, 8, 8, 3), np.float32), source="one")
    with pytest.raises(ClipError, match="at least 2 frames"):
        compute_flow(clip)


def test_unknown_method_and_raft_without_torchvision(monkeypatch):
    clip = shifted_clip(n=2, width=32, height=24)
    with pytest.raises(ConfigError, match="dis, raft_small, raft_large, auto"):
        compute_flow(clip, method="farneback")
    assert set(FLOW_METHODS) == {"dis", "raft_small", "raft_large"}
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    with pytest.raises(FlowMethodUnavailable, match="torchvision is not installed") as e:
        compute_flow(clip, method="raft_small")
    assert isinstance(e.value, NotImplementedError) and isinstance(e.value, ConfigError)
    with pytest.warns(UserWarning, match="DIS"):
        fs = compute_flow(clip, method="auto", device="cuda")
    assert fs.method == "dis"


# ---------------------------------------------------------- consistency
def test_consistency_true_for_consistent_motion_false_out_of_frame():
    h, w = 20, 30
    f12 = np.broadcast_to(np.array([2.0, 1.0], np.float32), (h, w, 2)).copy()
    ok = consistency_mask(f12, -f12, 1.0)
    assert ok[:-1, :-2].all()                             # targets inside frame 2
    assert not ok[-1:, :].any() and not ok[:, -2:].any()  # targets leave the frame


def test_consistency_false_where_occluded():
    h, w = 20, 30
    f12 = np.zeros((h, w, 2), np.float32)
    f12[5:10, 5:10] = (3.0, 0.0)          # a patch moving right by 3 px...
    f21 = np.zeros((h, w, 2), np.float32)
    f21[5:10, 8:13] = (-3.0, 0.0)         # ...and seen moving back in frame 2
    ok = consistency_mask(f12, f21, 1.0)
    assert ok[5:10, 5:10].all()           # the moving patch is consistent
    # background pixels the patch covers in frame 2 map onto its backward flow: occluded
    assert not ok[5:10, 10:13].any()
    assert ok[:5].all() and ok[10:].all()


def test_consistency_threshold_and_batch():
    f12 = np.zeros((2, 6, 8, 2), np.float32)
    f21 = np.zeros_like(f12)
    f21[1, ..., 0] = 0.6
    assert consistency_mask(f12, f21, 1.0).all()
    ok = consistency_mask(f12, f21, 0.5)
    assert ok.shape == (2, 6, 8) and ok[0].all() and not ok[1].any()


# ----------------------------------------------------------- rescale_flow
def test_rescale_flow_scales_each_axis_by_its_own_factor():
    flow = np.zeros((30, 40, 2), np.float32)
    flow[..., 0] = 4.0
    flow[..., 1] = 3.0
    out = rescale_flow(flow, 20, 60)  # width x0.5, height x2
    assert out.shape == (60, 20, 2)
    np.testing.assert_allclose(out[..., 0], 2.0, rtol=1e-6)
    np.testing.assert_allclose(out[..., 1], 6.0, rtol=1e-6)
    batch = rescale_flow(np.stack([flow, 2 * flow]), 80, 15)
    assert batch.shape == (2, 15, 80, 2)
    np.testing.assert_allclose(batch[1, ..., 0], 16.0, rtol=1e-6)
    np.testing.assert_allclose(batch[1, ..., 1], 3.0, rtol=1e-6)


# ---------------------------------------------------------------- cache
def cache_folder(tmp_path, clip, method="dis"):
    return tmp_path / f"flow_{method}_{clip.fingerprint()}"


def test_cache_hit_reads_the_files(tmp_path):
    clip = shifted_clip(n=3, width=48, height=32)
    first = compute_flow(clip, cache_dir=tmp_path / "cache")
    folder = cache_folder(tmp_path / "cache", clip)
    assert [f.name for f in (tmp_path / "cache").iterdir()] == [folder.name]
    assert sorted(f.name for f in folder.iterdir()) == [
        "backward.npy", "forward.npy", "meta.json", "ok_1.npy"]
    assert isinstance(first.forward, np.memmap) and first.forward.dtype == np.float16
    again = compute_flow(clip, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.forward, first.forward)
    np.testing.assert_array_equal(again.backward_ok, first.backward_ok)
    # float16 storage: the cached flows are within float16 rounding of a fresh run
    fresh = compute_flow(clip)
    assert fresh.forward.dtype == np.float32
    np.testing.assert_allclose(first.forward, fresh.forward, atol=0.01)
    # prove the second run came from the files: replace their content and read it back
    np.save(folder / "forward.npy", np.zeros(first.forward.shape, np.float16))
    hit = compute_flow(clip, cache_dir=tmp_path / "cache", consistency_px=0.5)
    assert not np.asarray(hit.forward).any() and hit.consistency_px == 0.5
    assert (folder / "ok_0.5.npy").is_file()


def test_cache_invalidated_when_clip_changes(tmp_path):
    clip = shifted_clip(n=3, width=48, height=32)
    compute_flow(clip, cache_dir=tmp_path)
    edited = Clip(frames=clip.frames[::-1].copy(), source=clip.source, frame_range=clip.frame_range)
    assert edited.fingerprint() != clip.fingerprint()
    reversed_flow = compute_flow(edited, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("flow_dis_*"))) == 2
    assert np.abs(reversed_flow.forward[:, 8:-8, 8:-8] + SHIFT).mean() < 0.1
    # one changed pixel in one frame is enough
    touched = clip.frame_data.copy()
    touched[1, 5, 5] = 1.0 - touched[1, 5, 5]
    assert Clip(frames=touched, source=clip.source, frame_range=clip.frame_range).fingerprint() \
        != clip.fingerprint()


def test_corrupt_cache_is_recomputed(tmp_path):
    clip = shifted_clip(n=2, width=48, height=32)
    folder = cache_folder(tmp_path, clip)
    folder.mkdir()
    (folder / "meta.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable flow cache"):
        fs = compute_flow(clip, cache_dir=tmp_path)
    assert np.abs(fs.forward[:, 8:-8, 8:-8] - SHIFT).mean() < 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_flow(clip, cache_dir=tmp_path)  # rewritten: a clean hit now


def test_cache_made_with_other_dis_parameters_is_ignored(tmp_path):
    clip = shifted_clip(n=2, width=48, height=32)
    compute_flow(clip, cache_dir=tmp_path)
    folder = cache_folder(tmp_path, clip)
    meta = json.loads((folder / "meta.json").read_text())
    meta["tag"] = "dis/some-older-preset/48x32"
    (folder / "meta.json").write_text(json.dumps(meta))
    np.save(folder / "forward.npy", np.zeros((1, 32, 48, 2), np.float16))
    with pytest.warns(UserWarning, match="some-older-preset"):
        fs = compute_flow(clip, cache_dir=tmp_path)
    assert np.abs(fs.forward[:, 8:-8, 8:-8] - SHIFT).mean() < 0.1


def test_cache_keyed_by_flow_resolution(tmp_path):
    clip = shifted_clip(n=2, width=128, height=96)
    full = compute_flow(clip, cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="dis/fine/128x96, now dis/fine/64x48"):
        half = compute_flow(clip, cache_dir=tmp_path, long_edge=64)
    assert half.tag == "dis/fine/64x48" and full.tag == "dis/fine/128x96"


def test_unwritable_cache_dir(tmp_path):
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    clip = shifted_clip(n=2, width=32, height=24)
    with pytest.raises(OutputError, match="flow cache"):
        compute_flow(clip, cache_dir=tmp_path / "blocker")


def test_flow_at_lower_resolution_is_rescaled_per_axis():
    # known motion (2.5, -1.25) px at 128x96; flow computed at 64x48 must come back in
    # working-resolution pixels: each axis scaled by its own factor
    clip = shifted_clip(n=2, width=128, height=96)
    fs = compute_flow(clip, long_edge=64)
    assert fs.forward.shape == (1, 96, 128, 2)
    inner = fs.forward[0, 16:-16, 16:-16]
    err = np.linalg.norm(inner - SHIFT, axis=-1)
    # measured: mean 0.05 px at half resolution (0.015 px at full)
    assert err.mean() < 0.15, err.mean()
    # a non-square working size from a non-uniform source: 120x40 flow at 60x20
    wide = Clip(frames=np.stack([sinusoids(120, 40, SHIFT * i) for i in range(2)]).astype(np.float32) / 255,
                source="wide")
    w = compute_flow(wide, long_edge=60)
    assert np.linalg.norm(w.forward[0, 8:-8, 12:-12] - SHIFT, axis=-1).mean() < 0.2


def test_flow_on_textured_png_clip(png_clip):
    clip = load_clip(png_clip(n=3, width=40, height=30))
    fs = compute_flow(clip)
    assert fs.forward.shape == (2, 30, 40, 2) and np.isfinite(fs.forward).all()


# ---------------------------------------------------------------- tennis
@pytest.mark.tennis
def test_tennis_dis_close_to_raft(tennis_dir):
    clip = load_clip(tennis_dir, masks=[], frame_range=(0, 5))
    with np.load(tennis_dir / "reference_flow_forward_raft.npz") as data:
        ref = data["flow"][0:4].astype(np.float32)
    fs = compute_flow(clip)
    epe = np.linalg.norm(fs.forward - ref, axis=-1)
    # measured on these 4 pairs: 0.32 px over all pixels, 0.17 px over consistent ones
    # (whole clip: scripts/bench/flow_epe.py)
    assert epe.mean() < 0.6, epe.mean()
    assert epe[fs.forward_ok].mean() < 0.35
