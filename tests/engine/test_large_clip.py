"""Long and large clips: compact and memory-mapped storage, float views, streamed flow.

The full-size measurement (300 frames at 1080p) is scripts/bench/large_clip_memory.py;
these check the mechanisms on small clips, fast.
"""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest

from backend.clip import Clip, load_clip
from backend.clip.storage import FloatView, allocate, is_memory_mapped
from backend.preprocess import compute_flow

from .conftest import textured_frames


def test_memory_mapped_load_equals_in_memory_load(png_clip, tmp_path):
    folder = png_clip(n=6, width=40, height=30)
    mdir = tmp_path / "obj"
    mdir.mkdir()
    for i in range(6):
        m = np.zeros((30, 40), np.uint8)
        m[5:15, 3 + i:20 + i] = 255
        cv2.imwrite(str(mdir / f"{i:05d}.png"), m)
    ram = load_clip(folder, masks=[mdir], mmap_threshold=None)
    mapped = load_clip(folder, masks=[mdir], mmap_threshold=0, scratch_dir=tmp_path / "scratch")
    assert not ram.memory_mapped and mapped.memory_mapped
    assert is_memory_mapped(mapped.mask_data) and mapped.mask_data.dtype == bool
    assert list((tmp_path / "scratch").iterdir()) == []  # scratch files are unlinked at once
    assert mapped.frame_data.dtype == np.uint8 and isinstance(mapped.frames, FloatView)
    np.testing.assert_array_equal(mapped.frame_data, ram.frame_data)
    np.testing.assert_array_equal(np.asarray(mapped.masks), np.asarray(ram.masks))
    assert mapped.fingerprint() == ram.fingerprint()
    # the float view: same values as reading the PNGs as float, converted per slice
    expected = textured_frames(6, 40, 30)
    assert np.abs(mapped.frames[2] - expected[2]).max() < 0.5 / 255 + 1e-6
    assert mapped.frames[1:3].dtype == np.float32 and mapped.frames[1:3].shape == (2, 30, 40, 3)
    assert mapped.frames[0, 0, 0, 0] == np.float32(mapped.frame_data[0, 0, 0, 0]) / np.float32(255)
    assert mapped.frames.max() <= 1.0 and mapped.frames.min() >= 0.0
    assert mapped.frames.mean() == pytest.approx(float(np.asarray(mapped.frames).mean()), rel=1e-5)
    assert mapped.masks.shape == (6, 30, 40, 1) and mapped.masks.dtype == np.float32
    assert len(list(mapped.frames)) == 6


def test_frame_range_and_working_size_independent_of_source(png_clip):
    folder = png_clip(n=12, width=64, height=48)
    clip = load_clip(folder, frame_range=(3, 9), long_edge=32)
    assert clip.frame_data.shape == (6, 24, 32, 3) and clip.frame_range == (3, 9)
    assert clip.source_size == (64, 48) and clip.frame_names[0] == "00003.png"


def test_sixteen_bit_frames_stay_sixteen_bit_and_mixed_depths_widen(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    f8 = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    f16 = rng.integers(0, 65536, (8, 12, 3), dtype=np.uint16)
    cv2.imwrite(str(folder / "0.png"), f8)
    cv2.imwrite(str(folder / "1.png"), f16)
    clip = load_clip(folder)
    assert clip.frame_data.dtype == np.uint16  # widened on the 16-bit frame, exactly (v * 257)
    np.testing.assert_allclose(clip.frames[0], f8[..., ::-1] / 255.0, atol=1e-6)
    np.testing.assert_allclose(clip.frames[1], f16[..., ::-1] / 65535.0, atol=1e-6)


def test_clip_accepts_compact_arrays_and_keeps_float32_as_is():
    u8 = np.random.default_rng(1).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    c = Clip(u8, np.ones((3, 4, 5, 1), bool), ["a"])
    assert c.frames.dtype == np.float32 and c.masks[0].dtype == np.float32
    np.testing.assert_array_equal(c.frames_uint8(), u8)
    f32 = u8.astype(np.float32) / 255
    d = Clip(f32)
    assert d.frames is f32  # float32 arrays are used directly, as before
    assert d.fingerprint() == c.fingerprint()
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        Clip(np.zeros((3, 4, 5)))


def test_allocate_threshold(tmp_path):
    small = allocate((10, 10), np.float32, mmap_threshold=1 << 20)
    big = allocate((1024, 1024), np.uint8, scratch_dir=tmp_path, mmap_threshold=1 << 20)
    assert not is_memory_mapped(small) and is_memory_mapped(big) and not big.any()
    assert not is_memory_mapped(allocate((1024, 1024), np.uint8, mmap_threshold=None))


def flow_peak(n: int, w: int, h: int, folder) -> tuple[int, object]:
    frames = (textured_frames(n, w, h, seed=4) * 255 + 0.5).astype(np.uint8)
    clip = Clip(frames=frames, source=f"stream-test-{n}")
    tracemalloc.start()
    try:
        fs = compute_flow(clip, cache_dir=folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, fs


def test_streamed_flow_memory_does_not_grow_with_clip_length(tmp_path):
    w, h = 128, 96
    short_peak, _ = flow_peak(17, w, h, tmp_path)
    long_peak, fs = flow_peak(65, w, h, tmp_path)
    assert is_memory_mapped(fs.forward) and fs.forward.dtype == np.float16
    assert is_memory_mapped(fs.forward_ok) and fs.forward.shape == (64, h, w, 2)
    float32_flows = 2 * 64 * h * w * 2 * 4  # forward + backward of the long clip in RAM: 12.6 MB
    # a few 8-pair chunks in flight, whatever the length (measured: ~4.5 MB for both)
    assert long_peak < 1.25 * short_peak, (long_peak, short_peak)
    assert long_peak < 0.5 * float32_flows, (long_peak, float32_flows)
