"""The add-on's bpy-free core (neural_atlas.core.strips / jobs) in the backend's venv."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from neural_atlas.core import jobs as J
from neural_atlas.core import strips as S


def info(**kw):
    d = dict(name="shot", kind="IMAGE", channel=2, frame_start=10, final_start=12, final_end=18,
             source_length=8, source="/clips/shot", files=tuple(f"{i:04d}.png" for i in range(8)))
    d.update(kw)
    return S.StripInfo(**d)


def test_visible_and_requested_ranges():
    i = info()
    assert i.visible_source_range() == (2, 8)
    assert S.source_range(i) == (2, 8)
    assert S.source_range(i, (13, 15)) == (3, 6)  # inclusive timeline range -> [a, b)
    assert S.source_range(i, (0, 100), max_frames=3) == (2, 5)
    assert i.source_to_timeline(2) == 12 and i.timeline_to_source(12) == 2
    assert i.frame_file(3).endswith("0003.png")
    with pytest.raises(S.StripError, match="at least 2"):
        S.source_range(i, (17, 30))
    with pytest.raises(S.StripError, match="empty"):
        S.source_range(i, (15, 13))


def test_render_placement_and_free_channel():
    i = info()
    assert S.render_placement(i, (3, 6)) == (13, 16)
    occupied = [(2, 10, 18), (3, 0, 13), (4, 15, 20)]
    assert S.free_channel(occupied, 13, 16, above=2) == 3  # (3, 0, 13) ends where we start
    assert S.free_channel(occupied + [(3, 12, 14)], 13, 16, above=2) == 5
    assert S.free_channel(occupied + [(3, 12, 14)], 13, 16, above=2,
                          ignore_channel_intervals=[(3, 12, 14)]) == 3
    full = [(c, 0, 100) for c in range(1, 129)]
    with pytest.raises(S.StripError, match="no free VSE channel"):
        S.free_channel(full, 0, 10, above=1)


def test_folder_range_and_frames(tmp_path):
    for n in ("f_10.png", "f_2.png", "f_1.png", "notes.txt", "f_3.png"):
        (tmp_path / n).write_bytes(b"x")
    files = S.list_frames(str(tmp_path))
    assert files == ["f_1.png", "f_2.png", "f_3.png", "f_10.png"]  # natural order, images only
    assert S.folder_range(files, files[1:], (0, 2)) == (1, 3)
    with pytest.raises(S.StripError, match="contiguous"):
        S.folder_range(files, ["f_1.png", "f_3.png"], (0, 2))
    with pytest.raises(S.StripError, match="not in its folder"):
        S.folder_range(files, ["g.png"], (0, 1))


def test_mask_folders_seed_layout(tmp_path):
    clip = tmp_path / "clip"
    for obj in ("object1", "object0"):
        (clip / "masks" / obj).mkdir(parents=True)
        (clip / "masks" / obj / "00000.png").write_bytes(b"x")
    (clip / "video_frames").mkdir()
    assert S.mask_folders(str(clip / "masks")) == [str(clip / "masks" / "object0"), str(clip / "masks" / "object1")]
    assert S.mask_folders(str(clip / "masks" / "object1")) == [str(clip / "masks" / "object1")]
    assert S.seed_masks_for(str(clip / "video_frames")) == str(clip / "masks")
    with pytest.raises(S.StripError):
        S.mask_folders(str(clip / "video_frames"))


def test_texts_say_what_to_do():
    msg, hint = J.explain("unreachable", endpoint="tcp://127.0.0.1:5557", log_path="/x/backend.log")
    assert "tcp://127.0.0.1:5557" in msg and "5557" in hint and "firewall" in hint and "/x/backend.log" in hint
    assert "allow-root" in J.explain("path_not_allowed")[1]
    assert "CUDA" in J.explain("gpu_missing")[1]
    assert J.gpu_missing({"type": "cpu"}) and not J.gpu_missing({"type": "cuda"})
    assert J.device_text({"name": "NVIDIA H100", "type": "cuda", "memory_total": 80 * 1024 ** 3,
                          "memory_free": 60 * 1024 ** 3}) == "NVIDIA H100 (cuda), 60.0 / 80.0 GB free"
    t = J.progress_text({"state": "running", "phase": "train", "iteration": 120, "iterations": 1500,
                         "eta_s": 95, "psnr": 31.24})
    assert t == "training 120/1500, ETA 1m 35s, 31.2 dB"
    assert J.progress_text({"state": "done"}) == "Done"
    assert S.format_duration(3725) == "1h 02m" and S.format_duration(None) == "--"


def test_session_against_a_real_server(tmp_path):
    """hello, a submit the server rejects (path not allowed), and an unknown job, through a
    real `python -m backend serve` (no engine work)."""
    port = _free_port()
    env = dict(os.environ, NEURAL_ATLAS_KEYS=str(tmp_path / "keys"))
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--endpoint", f"tcp://127.0.0.1:{port}",
                             "--workspace", str(tmp_path / "ws"), "--no-device-probe",
                             "--allow-root", str(tmp_path / "ws")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "keys" / "signing.key").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        s = J.Session(f"tcp://127.0.0.1:{port}", keys_dir=str(tmp_path / "keys"), timeout=3, retries=3)
        s.connect()
        _pump_until(s, lambda: s.conn.state in ("connected", "unreachable", "error"))
        assert s.conn.state == "connected" and s.conn.server["protocol"] >= 1
        token = s.submit("/definitely/not/allowed/clip.mp4", preset="demo")
        ch = _pump_until(s, lambda c: c.token == token)
        assert ch.kind == "error" and ch.info["code"] == "path_not_allowed" and "allow-root" in ch.info["hint"]
        s.attach(["20990101-000000-abcdef"])
        ch = _pump_until(s, lambda c: c.job_id == "20990101-000000-abcdef")
        assert ch.kind == "finished" and ch.info["state"] == "lost"
        s.close()
    finally:
        proc.terminate()
        proc.wait(10)


def _free_port():
    import socket

    so = socket.socket()
    so.bind(("127.0.0.1", 0))
    p = so.getsockname()[1]
    so.close()
    return p


def _pump_until(s, pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if s.client is not None:
            for e in s.client.poll(0.05):
                s._on_event(e)
        changes, s.changes = s.changes, []
        for c in changes:
            try:
                if pred(c):
                    return c
            except TypeError:
                pass
        try:
            if pred():
                return None
        except TypeError:
            pass
    raise AssertionError("timed out")
