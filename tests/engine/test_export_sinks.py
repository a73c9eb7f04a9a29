"""The export's background writers: ordering, error propagation, abort, and the exact 8-bit rounding."""

import threading
import time

import numpy as np
import pytest
import torch

from backend.clip import read_image
from backend.clip.video import open_video, writer_library
from backend.clip.writers import _to_uint
from backend.errors import OutputError
from backend.export.outputs import to_uint8
from backend.export.sinks import FrameWriters, VideoSink


def test_device_uint8_matches_the_png_writers_rounding():
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 0.6, (64, 256, 3)).astype(np.float32)
    x[0, :4, 0] = [np.nan, np.inf, -np.inf, 1.0]
    x[1, :256, 1] = (np.arange(256) / 255.0).astype(np.float32)  # every 8-bit level and its float
    x[2, :256, 2] = ((np.arange(256) + 0.5) / 255.0).astype(np.float32)  # the rounding ties
    assert np.array_equal(to_uint8(torch.from_numpy(x)).numpy(), _to_uint(x, np.uint8))


def test_frame_writers_run_every_job_and_bound_the_frames_in_flight():
    done, running, peak = [], [0], [0]
    lock = threading.Lock()

    def job(k):
        def run():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.002)
            with lock:
                running[0] -= 1
                done.append(k)
        return run

    w = FrameWriters(workers=4, depth=2)
    for f in range(20):
        w.submit([job((f, j)) for j in range(3)])
        assert len(w._pending) <= 2  # the loop never runs more than `depth` frames ahead
    w.close()
    assert sorted(done) == [(f, j) for f in range(20) for j in range(3)]
    assert peak[0] <= 4


def test_frame_writers_raise_the_first_error():
    w = FrameWriters(workers=2, depth=1)

    def boom():
        raise OutputError("disk full")

    w.submit([boom])
    with pytest.raises(OutputError, match="disk full"):
        w.submit([lambda: None])  # the frame before is waited for, and its error surfaces
        w.close()
    w.abort()


@pytest.mark.skipif(writer_library() is None, reason="no H.264 encoder (PyAV or imageio-ffmpeg)")
def test_video_sink_encodes_frames_in_order(tmp_path):
    frames = [np.full((32, 48, 3), 20 * k, np.uint8) for k in range(8)]
    sink = VideoSink(tmp_path / "v.mp4", 10.0)
    for fr in frames:
        sink.put(fr)
    path = sink.close()
    stream = open_video(path)
    got = [fr.astype(int) for fr in stream.frames]
    stream.close()
    assert len(got) == 8
    assert [int(round(g.mean())) for g in got] == pytest.approx([20 * k for k in range(8)], abs=3)


def test_video_sink_abort_leaves_no_file(tmp_path):
    sink = VideoSink(tmp_path / "v.mp4", 10.0)
    sink.put(np.zeros((16, 16, 3), np.uint8))
    sink.abort()
    assert not (tmp_path / "v.mp4").exists()
    assert not any(p.name.endswith(".mp4") for p in tmp_path.iterdir())  # no temporary file either
    assert not (tmp_path / "v").exists()


def test_video_sink_failure_surfaces_and_never_blocks(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    sink = VideoSink(blocker / "v.mp4", 10.0, backlog=1)  # its folder cannot be created
    with pytest.raises(OutputError):
        for _ in range(50):  # more frames than the backlog: the producer must not hang
            sink.put(np.zeros((16, 16, 3), np.uint8))
        sink.close()


def test_export_without_an_encoder_points_videos_at_the_frames(tmp_path, monkeypatch):
    """No H.264 encoder: the PNG frames are the stream, not written a second time."""
    from backend.config import preset
    from backend.export import outputs
    from backend.pipeline import decompose
    from backend.synthetic import make_synthetic_clip

    from .test_train import tiny_config
    monkeypatch.setattr(outputs, "writer_library", lambda preferred=None: None)
    clip_dir = make_synthetic_clip(width=40, height=24, n_frames=4, seed=2).write(tmp_path / "clip")
    cfg = tiny_config(iterations=4).replace(export={"atlas_size": 32, "workers": 3})
    assert preset("seed").export.workers == 0
    out = decompose(clip_dir, tmp_path / "dec", cfg)
    import json
    rep = json.loads((out / "report.json").read_text())
    assert rep["outputs"]["videos"]["reconstruction"] == "frames/reconstruction"
    assert not (out / "video").exists()
    pngs = sorted((out / "frames" / "reconstruction").glob("*.png"))
    assert len(pngs) == 4 and read_image(pngs[0]).shape == (24, 40, 3)
    assert len(list((out / "frames" / "alpha_1").glob("*.png"))) == 4
