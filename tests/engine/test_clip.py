"""Clip I/O: load_clip on folders, seed layouts and videos; masks; ranges; writers."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from backend.clip import (
    load_clip,
    natural_key,
    parse_frame_range,
    read_image,
    working_size,
    write_image_sequence,
    write_png,
    write_png16_rgba,
    write_video,
)
from backend.errors import ClipError, OutputError

from .conftest import textured_frames


def write_mask_folder(folder: Path, masks: np.ndarray) -> Path:
    """Write (N, H, W) bool masks as 0/255 PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(masks):
        assert cv2.imwrite(str(folder / f"{i:05d}.png"), m.astype(np.uint8) * 255)
    return folder


def box_masks(n: int, width: int, height: int) -> np.ndarray:
    m = np.zeros((n, height, width), bool)
    m[:, height // 4: height // 2, width // 4: width // 2] = True
    return m


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- ordering
def test_natural_sort_orders_numbers_by_value():
    names = ["frame10.png", "frame2.png", "Frame3.png", "frame1.png", "frame02.png"]
    assert sorted(names, key=natural_key) == [
        "frame1.png", "frame02.png", "frame2.png", "Frame3.png", "frame10.png"]


def test_folder_frames_load_in_natural_order(png_clip):
    folder = png_clip(n=11, pattern="frame%d.png")
    clip = load_clip(folder)
    assert clip.frame_names == [f"frame{i}.png" for i in range(11)]
    expected = textured_frames(11, 24, 16)
    assert np.abs(clip.frames - expected).max() < 0.5 / 255 + 1e-6
    assert clip.frames.dtype == np.float32 and clip.frames.shape == (11, 16, 24, 3)
    assert clip.frame_range == (0, 11) and clip.source_size == (24, 16) and clip.fps is None
    assert clip.masks is None and clip.mask_names == []


# ------------------------------------------------------------ frame ranges
@pytest.mark.parametrize("text, expected", [
    ("10:", (10, None)), (":50", (0, 50)), ("5:20", (5, 20)), (" 5 : 20 ", (5, 20)), (":", (0, None))])
def test_parse_frame_range(text, expected):
    assert parse_frame_range(text) == expected


@pytest.mark.parametrize("text", ["abc", "5", "5:3", "4:4", "-1:4", "1:2:3", ""])
def test_parse_frame_range_rejects(text):
    with pytest.raises(ClipError, match="frame range"):
        parse_frame_range(text)


def test_frame_range_and_max_frames_slice_frames_and_masks(png_clip, tmp_path):
    folder = png_clip(n=10)
    masks = box_masks(10, 24, 16)
    masks[:, 0, 0] = np.arange(10) % 2 == 0  # a per-frame marker
    mdir = write_mask_folder(tmp_path / "person", masks)
    clip = load_clip(folder, masks=[mdir], frame_range=(3, 9))
    assert clip.n_frames == 6 and clip.frame_range == (3, 9)
    assert clip.frame_names[0] == "00003.png"
    np.testing.assert_array_equal(clip.masks[:, 0, 0, 0], masks[3:9, 0, 0])
    with pytest.warns(UserWarning, match="max_frames=4"):
        capped = load_clip(folder, masks=[mdir], frame_range=(3, None), max_frames=4)
    assert capped.frame_range == (3, 7) and capped.masks.shape == (4, 16, 24, 1)
    np.testing.assert_array_equal(capped.frames, clip.frames[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_clip(folder, max_frames=10).n_frames == 10  # no cut, no warning


@pytest.mark.parametrize("frame_range", [(10, None), (12, 14), (0, 11), (5, 99)])
def test_range_outside_clip_names_length(png_clip, frame_range):
    with pytest.raises(ClipError, match="has 10 frames"):
        load_clip(png_clip(n=10), frame_range=frame_range)


def test_range_leaving_one_frame_is_rejected(png_clip):
    with pytest.raises(ClipError, match="at least 2 frames"):
        load_clip(png_clip(n=10), frame_range=(9, None))


# ------------------------------------------------------------ bad inputs
def test_missing_path(tmp_path):
    with pytest.raises(ClipError, match="not found") as e:
        load_clip(tmp_path / "nope")
    assert "nope" in str(e.value)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a frame")
    with pytest.raises(ClipError, match="no frames in .*empty"):
        load_clip(tmp_path / "empty")


def test_single_frame(png_clip):
    with pytest.raises(ClipError, match="at least 2 frames"):
        load_clip(png_clip(n=1))


def test_unsupported_file(tmp_path):
    (tmp_path / "clip.txt").write_text("hello")
    with pytest.raises(ClipError, match="clip.txt"):
        load_clip(tmp_path / "clip.txt")


def test_corrupt_png_is_named(png_clip):
    folder = png_clip(n=3)
    (folder / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ClipError, match="00001.png.*corrupt"):
        load_clip(folder)


def test_mixed_sizes_name_file_and_both_sizes(png_clip, tmp_path):
    folder = png_clip(n=3)
    cv2.imwrite(str(folder / "00002.png"), np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(ClipError) as e:
        load_clip(folder)
    msg = str(e.value)
    assert "00002.png" in msg and "20x10" in msg and "24x16" in msg


def test_mask_count_mismatch(png_clip, tmp_path):
    mdir = write_mask_folder(tmp_path / "person", box_masks(3, 24, 16))
    with pytest.raises(ClipError, match="has 3 images but the clip has 4 frames"):
        load_clip(png_clip(n=4), masks=[mdir])


def test_all_empty_mask_names_object(png_clip, tmp_path):
    good = write_mask_folder(tmp_path / "ball", box_masks(4, 24, 16))
    empty = write_mask_folder(tmp_path / "ghost", np.zeros((4, 16, 24), bool))
    with pytest.raises(ClipError, match="'ghost'.*empty in every frame"):
        load_clip(png_clip(n=4), masks=[good, empty])


def test_missing_mask_folder(png_clip, tmp_path):
    with pytest.raises(ClipError, match="'person' not found"):
        load_clip(png_clip(n=4), masks=[tmp_path / "person"])


# -------------------------------------------------------------- resizing
@pytest.mark.parametrize("size, long_edge, expected", [
    ((448, 256), 768, (448, 256)),     # never upscale
    ((448, 256), 224, (224, 128)),
    ((1920, 1080), 768, (768, 432)),
    ((24, 36), 12, (8, 12)),           # portrait
    ((1000, 3), 100, (100, 2)),        # both dims stay >= 2
    ((99, 50), 66, (66, 33)),          # 33.33 rounds to 33
])
def test_working_size(size, long_edge, expected):
    assert working_size(*size, long_edge) == expected


def test_resize_keeps_aspect_and_never_upscales(png_clip):
    folder = png_clip(n=3, width=48, height=32)
    assert load_clip(folder, long_edge=768).frames.shape == (3, 32, 48, 3)
    small = load_clip(folder, long_edge=24)
    assert small.frames.shape == (3, 16, 24, 3) and small.source_size == (48, 32)
    assert 0.0 <= small.frames.min() and small.frames.max() <= 1.0


def test_masks_resized_nearest_stay_binary(png_clip, tmp_path):
    folder = png_clip(n=3, width=48, height=32)
    rng = np.random.default_rng(1)
    masks = rng.random((3, 64, 96)) > 0.5  # a different size from the frames, on purpose
    mdir = write_mask_folder(tmp_path / "obj", masks)
    clip = load_clip(folder, masks=[mdir], long_edge=20)
    assert clip.masks.shape == (3, 13, 20, 1) and clip.masks.dtype == np.float32
    assert set(np.unique(clip.masks)) == {0.0, 1.0}


def test_mask_threshold_is_half_range(png_clip, tmp_path):
    folder = png_clip(n=2, width=4, height=2)
    mdir = tmp_path / "obj"
    mdir.mkdir()
    levels8 = np.array([[0, 127, 128, 255]] * 2, np.uint8)
    cv2.imwrite(str(mdir / "0.png"), levels8)
    levels16 = np.array([[0, 32767, 32768, 65535]] * 2, np.uint16)
    cv2.imwrite(str(mdir / "1.png"), levels16)
    clip = load_clip(folder, masks=[mdir])
    np.testing.assert_array_equal(clip.masks[:, 0, :, 0], [[0, 0, 1, 1], [0, 0, 1, 1]])


def test_masks_read_natively_binarise_as_their_float_values(png_clip, tmp_path):
    """Mask images are binarised in their own pixel type (no float conversion): the result is the
    float rule's (alpha when it varies, else the brightest channel, > 0.5) for 8- and 16-bit gray,
    colour, gray + alpha and RGBA, with values at the threshold."""
    from backend.clip.source import _binarize
    from backend.clip.writers import read_image

    folder = png_clip(n=6, width=6, height=4)
    mdir = tmp_path / "obj"
    mdir.mkdir()
    rng = np.random.default_rng(5)
    edge8 = np.array([0, 126, 127, 128, 129, 255], np.uint8)
    edge16 = np.array([0, 32766, 32767, 32768, 32769, 65535], np.uint16)
    images = [
        np.tile(edge8, (4, 1)),  # gray
        np.stack([np.tile(edge8, (4, 1)), rng.permutation(np.tile(edge8, (4, 1)).T).T, np.zeros((4, 6), np.uint8)], 2),
        np.dstack([np.full((4, 6), 255, np.uint8)] * 3 + [np.tile(edge8[::-1], (4, 1))]),  # alpha varies
        np.dstack([np.tile(edge8, (4, 1))] * 3 + [np.full((4, 6), 255, np.uint8)]),  # opaque: colour
        np.stack([np.tile(edge16, (4, 1))] * 3, 2),
        np.dstack([np.tile(edge16, (4, 1))] * 3 + [np.tile(edge16[::-1], (4, 1))]),
    ]
    expected = []
    for k, img in enumerate(images):
        cv2.imwrite(str(mdir / f"{k}.png"), img)
        f = read_image(mdir / f"{k}.png")  # float in [0, 1]: the rule as it reads
        rule = f[:, :, 3] > 0.5 if f.shape[2] == 4 and f[:, :, 3].min() < 1.0 else f[:, :, :3].max(axis=2) > 0.5
        native = _binarize(read_image(mdir / f"{k}.png", native=True))
        np.testing.assert_array_equal(native, rule, err_msg=f"image {k}")
        expected.append(rule)
    clip = load_clip(folder, masks=[mdir])
    np.testing.assert_array_equal(clip.masks[..., 0] > 0, np.stack(expected))
    assert np.stack(expected).any(axis=(1, 2)).all() and not np.stack(expected).all(axis=(1, 2)).any()


# --------------------------------------------------------- pixel formats
def test_gray_rgba_and_16bit_frames_become_rgb_float(tmp_path):
    folder = tmp_path / "mixed_formats"
    folder.mkdir()
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (8, 12), dtype=np.uint8)
    bgra = rng.integers(0, 256, (8, 12, 4), dtype=np.uint8)
    bgr16 = rng.integers(0, 65536, (8, 12, 3), dtype=np.uint16)
    cv2.imwrite(str(folder / "0.png"), gray)
    cv2.imwrite(str(folder / "1.png"), bgra)
    cv2.imwrite(str(folder / "2.png"), bgr16)
    clip = load_clip(folder)
    assert clip.frames.shape == (3, 8, 12, 3) and clip.frames.dtype == np.float32
    np.testing.assert_allclose(clip.frames[0], np.repeat(gray[:, :, None], 3, 2) / 255.0, atol=1e-6)
    np.testing.assert_allclose(clip.frames[1], bgra[:, :, 2::-1] / 255.0, atol=1e-6)
    np.testing.assert_allclose(clip.frames[2], bgr16[:, :, ::-1] / 65535.0, atol=1e-6)


# ------------------------------------------------------------ seed layout
def test_seed_layout_masks_sorted_and_nothing_written(png_clip, tmp_path):
    png_clip(name="shot/video_frames", n=5)
    root = tmp_path / "shot"
    write_mask_folder(root / "masks" / "racket", box_masks(5, 24, 16))
    write_mask_folder(root / "masks" / "player", ~box_masks(5, 24, 16))
    before = listing(root)
    clip = load_clip(root)
    assert listing(root) == before
    assert clip.mask_names == ["player", "racket"]
    assert clip.masks.shape == (5, 16, 24, 2)
    assert clip.masks[0, 0, 0, 0] == 1 and clip.masks[0, 0, 0, 1] == 0
    assert load_clip(root, masks=[]).masks is None


@pytest.mark.tennis
def test_tennis_loads_with_its_mask(tennis_dir):
    clip = load_clip(tennis_dir)
    assert clip.frames.shape == (70, 256, 448, 3)
    assert clip.mask_names == ["player"] and clip.masks.shape == (70, 256, 448, 1)
    assert set(np.unique(clip.masks)) == {0.0, 1.0}
    assert 0.01 < clip.masks.mean() < 0.2  # the player covers a few percent of the frame
    assert clip.frame_names[0] == "00000.png" and clip.frame_names[-1] == "00069.png"


# ------------------------------------------------------------------ video
def _libraries() -> list:
    return [pytest.param(name, marks=pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{name} not installed"))
        for name, module in (("av", "av"), ("imageio-ffmpeg", "imageio_ffmpeg"))]


def smooth_frames(n: int, width: int, height: int) -> np.ndarray:
    """Frames of smooth colour ramps, easy on a lossy codec."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((n, height, width, 3), np.float32)
    for i in range(n):
        out[i, ..., 0] = x / width
        out[i, ..., 1] = y / height
        out[i, ..., 2] = 0.2 + 0.6 * i / max(1, n - 1)
    return out


@pytest.mark.parametrize("library", _libraries())
def test_video_round_trip(tmp_path, library):
    from backend.clip.video import open_video

    frames = smooth_frames(6, 33, 21)  # odd size: padded to 34x22 by edge replication
    path = write_video(tmp_path / "out" / "clip.mp4", frames, fps=12.5, encoder=library)
    assert path == tmp_path / "out" / "clip.mp4" and path.stat().st_size > 0
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]  # no temporary left behind
    stream = open_video(path, library)
    decoded = list(stream.frames)
    assert stream.fps == pytest.approx(12.5)
    assert len(decoded) == 6 and decoded[0].shape == (22, 34, 3)
    clip = load_clip(path)
    assert clip.n_frames == 6 and (clip.width, clip.height) == (34, 22)
    assert clip.fps == pytest.approx(12.5) and clip.frame_names[0] == "00000"
    err = np.abs(clip.frames[:, :21, :33] - frames).mean()
    assert err < 0.03, err
    np.testing.assert_allclose(clip.frames[:, :, :, 2].mean(axis=(1, 2)), frames[:, 0, 0, 2], atol=0.03)


@pytest.mark.parametrize("library", _libraries())
def test_video_range_masks_and_errors(tmp_path, library):
    path = write_video(tmp_path / "clip.mp4", smooth_frames(8, 32, 24), fps=10, encoder=library)
    clip = load_clip(path, frame_range=(2, 6), long_edge=16)
    assert clip.frame_range == (2, 6) and clip.frames.shape == (4, 12, 16, 3)
    assert clip.frame_names == ["00002", "00003", "00004", "00005"]
    with pytest.raises(ClipError, match="has 8 frames"):
        load_clip(path, frame_range=(2, 9))
    with pytest.raises(ClipError, match="has 8 frames"):
        load_clip(path, frame_range=(8, None))
    mdir = write_mask_folder(tmp_path / "obj", box_masks(7, 32, 24))
    with pytest.raises(ClipError, match="has 7 images but the clip has 8 frames"):
        load_clip(path, masks=[mdir], frame_range=(0, 4))
    with pytest.warns(UserWarning, match="max_frames=3"):
        assert load_clip(path, max_frames=3).frame_range == (0, 3)


def test_corrupt_video_is_named(tmp_path):
    if importlib.util.find_spec("av") is None and importlib.util.find_spec("imageio_ffmpeg") is None:
        pytest.skip("neither av nor imageio-ffmpeg installed")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 10)
    with pytest.raises(ClipError, match="broken.mp4"):
        load_clip(bad)


def test_video_png_fallback_writes_a_sequence(tmp_path):
    frames = smooth_frames(3, 10, 6)
    out = write_video(tmp_path / "v" / "recon.mp4", frames, fps=10, encoder="png")
    assert out == tmp_path / "v" / "recon"
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert load_clip(out).frames.shape == (3, 6, 10, 3)


# ---------------------------------------------------------------- writers
def test_png16_rgba_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    rgba = rng.random((7, 9, 4)).astype(np.float32)
    path = write_png16_rgba(tmp_path / "a" / "atlas.png", rgba)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (7, 9, 4)
    back = read_image(path)
    assert back.shape == (7, 9, 4)
    assert np.abs(back - rgba).max() <= 0.5 / 65535 + 1e-7
    np.testing.assert_array_equal(raw[:, :, 2], np.round(rgba[:, :, 0] * 65535))  # R stored as BGR's R


def test_png8_round_trip_and_gray(tmp_path):
    rgb = textured_frames(1, 8, 5)[0]
    back = read_image(write_png(tmp_path / "x.png", rgb))
    assert np.abs(back - rgb).max() <= 0.5 / 255 + 1e-6
    gray = read_image(write_png(tmp_path / "g.png", rgb[:, :, 0]))
    assert gray.shape == (5, 8, 3) and np.abs(gray[:, :, 1] - rgb[:, :, 0]).max() <= 0.5 / 255 + 1e-6
    seq = write_image_sequence(tmp_path / "seq", [rgb, rgb], pattern="f%03d.png")
    assert sorted(p.name for p in seq.iterdir()) == ["f000.png", "f001.png"]


def test_unwritable_output_raises_output_error(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    img = np.zeros((4, 4, 3), np.float32)
    with pytest.raises(OutputError, match="blocker"):
        write_png(blocker / "x.png", img)
    with pytest.raises(OutputError, match="blocker"):
        write_png16_rgba(blocker / "sub" / "x.png", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(OutputError, match="blocker"):
        write_image_sequence(blocker / "seq", [img])
    with pytest.raises(OutputError, match="blocker"):
        write_video(blocker / "v.mp4", [img, img], fps=10)


def test_read_only_folder_raises_output_error(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod does not stop writes here (running as root)")
        with pytest.raises(OutputError, match="locked"):
            write_png(folder / "x.png", np.zeros((4, 4, 3), np.float32))
    finally:
        folder.chmod(0o700)


def test_frames_are_decoded_on_threads_in_order_with_a_bounded_window():
    """`_ordered_map` (how frames and masks are decoded): the results come in the items' order,
    no more than `window` items are started ahead of the consumer, and an item's exception is
    raised at its turn, after every earlier result."""
    import threading

    from backend.clip.source import _ordered_map

    lock = threading.Lock()
    started = []

    def fn(i):
        with lock:
            started.append(i)
        if i == 30:
            raise ClipError("item 30 is corrupt")
        return i * i

    got = []
    with pytest.raises(ClipError, match="item 30"):
        for k, v in enumerate(_ordered_map(fn, list(range(50)), window=4)):
            with lock:
                # started: items 0..k consumed or in hand, plus at most the window submitted ahead
                assert len(started) <= k + 1 + 4
            got.append(v)
    assert got == [i * i for i in range(30)]
    assert len(started) <= 30 + 4
