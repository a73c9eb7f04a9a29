"""The demo and its yardsticks at odd sizes, layer counts and presets (CPU, a few iterations):
every yardstick returns a figure or a clear None, never a crash; bad demo sizes are refused
before anything is trained; a preset whose working size is below the clip's trains at the
clip's size (the yardsticks compare with the ground truth pixel for pixel)."""

from __future__ import annotations

import json
import math

import pytest

from backend.demo import run_demo
from backend.errors import ConfigError

from .test_train import tiny_config


@pytest.mark.parametrize("w,h,frames,objects", [(97, 61, 5, 1), (61, 97, 4, 2)], ids=["97x61-1obj", "61x97-2obj"])
def test_demo_at_odd_sizes_and_layer_counts(tmp_path, w, h, frames, objects):
    # a working size below the clip's (as `fast` at 1080p): the demo trains at the clip's size
    cfg = tiny_config(iterations=4, device="cpu").replace(clip={"long_edge": 32, "max_frames": 3},
                                                          export={"write_videos": False})
    rep = run_demo(tmp_path / "demo", cfg, width=w, height=h, n_frames=frames, seed=7, n_objects=objects)
    assert rep["clip"]["width"] == w and rep["clip"]["objects"] == objects
    assert rep["config"]["clip"]["long_edge"] == max(w, h) and rep["config"]["clip"]["max_frames"] >= frames
    for key in ("edit_drift_px", "frame_paint_drift_px"):
        d = rep[key]
        assert len(d["per_layer"]) == objects + 1
        for v in (d["mean"], d["max"]):
            assert v is None or (math.isfinite(v) and v >= 0)
    assert rep["alpha_iou"] is None or 0.0 <= rep["alpha_iou"] <= 1.0
    json.loads((tmp_path / "demo" / "report.json").read_text())  # strict JSON: no NaN


@pytest.mark.parametrize("kw,msg", [({"width": 8}, "16x16"), ({"n_frames": 1}, "2 frames"),
                                    ({"n_objects": 5}, "--objects")])
def test_demo_refuses_what_it_cannot_measure_before_training(tmp_path, kw, msg):
    args = {"width": 97, "height": 61, "n_frames": 4, "n_objects": 1} | kw
    with pytest.raises(ConfigError, match=msg):
        run_demo(tmp_path / "d", tiny_config(device="cpu"), **args)
    assert not (tmp_path / "d").exists()  # nothing written, nothing trained


def test_a_cancel_after_training_stops_the_demo_and_says_what_it_stops(tmp_path):
    """A Ctrl-C that arrives after the decomposition (during the yardsticks) stops the demo there;
    the handler's message names that stage, not "saving a checkpoint"; the decomposition is whole."""
    from backend.errors import Cancelled
    from backend.progress import CancelToken

    token = CancelToken()
    notes = []

    def progress(p):
        if p.phase == "train":
            notes.append(token.note)
        if p.phase == "done":  # the decomposition's last event: as if a signal came now
            token.cancel("interrupted")

    cfg = tiny_config(iterations=4, device="cpu").replace(export={"write_videos": False})
    with pytest.raises(Cancelled):
        run_demo(tmp_path / "demo", cfg, width=48, height=32, n_frames=3, progress=progress, cancel=token)
    assert notes and set(notes) == {"saving a checkpoint"}
    assert token.note.startswith("stopping the demo's measurements")
    dec = tmp_path / "demo" / "decomposition"
    assert json.loads((dec / "report.json").read_text())["iterations"] == 4
    assert not (tmp_path / "demo" / "report.json").exists()  # the demo's own report: not written
