"""paint_frame and render's opacity through a real server with the real engine, on loopback."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from neural_atlas.core import protocol as P
from neural_atlas.core.client import ServiceError

from .test_engine_wire import ITER_S_ENV, tiny


@pytest.fixture(scope="module")
def shot(tmp_path_factory):
    from backend.synthetic import make_synthetic_clip
    d = tmp_path_factory.mktemp("paintshot") / "clip"
    make_synthetic_clip(48, 32, 4, seed=3).write(d)
    return d


def _paint(path, w, h):
    """An RGBA paint image (8-bit, straight alpha): a magenta disc left of the centre."""
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 4), np.uint8)
    img[..., 0], img[..., 2] = 255, 255  # BGR(A) order on disk: magenta
    img[..., 3] = (np.clip(3.0 - np.hypot(xs - w * 0.3, ys - h * 0.5) + 0.5, 0, 1) * 255).astype(np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def test_paint_frame_and_faded_render_over_the_wire(server_factory, shot, tmp_path):
    srv = server_factory(engine=None, env=ITER_S_ENV, extra=["--allow-root", str(shot.parent)])
    c = srv.client(timeout=5.0, retries=2)
    job = c.submit(shot, masks=[shot / "masks" / "object0"], preset="demo", overrides=tiny(6))
    assert c.wait(job, timeout=400)["state"] == "done"
    rep = c.result(job)["report"]
    w, h = rep["clip"]["width"], rep["clip"]["height"]

    pj = c.paint_frame(job, 2, _paint(tmp_path / "paint.png", w, h), upload=True)
    info = c.wait(pj, timeout=300)
    assert info["state"] == "done", info
    res = c.result(pj)
    painted = res["outputs"]["layers"]
    assert painted and all(f"edits/layer_{k}.png" in {f["path"] for f in res["files"]} for k in painted)
    k = sorted(painted)[0]
    edit = c.fetch(pj, f"edits/layer_{k}.png", tmp_path / "dl" / f"layer_{k}.png")
    raw = cv2.imread(str(edit), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape[2] == 4 and raw[..., 3].max() > 0

    # a second stroke over the first, on another frame: the job paints over the given edit
    pj2 = c.paint_frame(job, 0, _paint(tmp_path / "paint2.png", w, h), edits={int(k): edit}, upload=True)
    assert c.wait(pj2, timeout=300)["state"] == "done"
    edit2 = c.fetch(pj2, f"edits/layer_{k}.png", tmp_path / "dl2" / f"layer_{k}.png")
    raw2 = cv2.imread(str(edit2), cv2.IMREAD_UNCHANGED)
    assert (raw2[..., 3] >= raw[..., 3]).all() and (raw2[..., 3] > raw[..., 3]).any()

    # bad input is the engine's clear message, as a failed job
    bad = c.paint_frame(job, 2, _paint(tmp_path / "small.png", 10, 10), upload=True)
    binfo = c.wait(bad, timeout=300)
    assert binfo["state"] == "failed" and binfo["error"]["code"] == "invalid_input"
    assert "10x10" in binfo["error"]["message"] and "refused" in binfo["error"]["message"]

    # the edit faded out over the shot: the last frame is the plate, the first is edited
    rj = c.render(job, {int(k): edit2}, formats=["png"], upload=True, opacity={int(k): [1.0, 1.0, 0.5, 0.0]})
    rinfo = c.wait(rj, timeout=300)
    assert rinfo["state"] == "done", rinfo
    assert c.result(rj)["outputs"]["opacity_layers"] == [int(k)]
    with pytest.raises(ServiceError) as e:
        c.render(job, {int(k): edit2}, upload=True, opacity={int(k): [1.0, 2.0]})
    assert e.value.code == "bad_request" and "opacity must be a number in [0, 1]" in e.value.message
    wrong = c.render(job, {int(k): edit2}, formats=["png"], upload=True, opacity={int(k): [1.0, 0.5]})
    winfo = c.wait(wrong, timeout=300)
    assert winfo["state"] == "failed" and "has 2 values; the shot has 4 frames" in winfo["error"]["message"]


def test_protocol_checks_paint_frame_and_opacity():
    ok = {"job_id": "abc", "frame": 3, "image": "/x/paint.png", "layer": 1, "edits": {"1": "/x/e.png"}}
    assert P.validate_body("paint_frame", ok) is ok
    for body, msg in [({"job_id": "abc", "image": "/x.png"}, "missing field 'frame'"),
                      ({"job_id": "abc", "frame": -1, "image": "/x.png"}, "frame must be >= 0"),
                      ({"job_id": "abc", "frame": 1, "image": "/x.png", "edits": {"a": "/e.png"}}, "layer indices")]:
        with pytest.raises(P.ProtocolError, match=msg):
            P.validate_body("paint_frame", body)
    base = {"job_id": "abc", "edits": {"0": "/e.png"}}
    assert P.validate_body("render", dict(base, opacity={"0": [0, 0.5, 1], "1": {"4": 0.25}}))
    for opacity, msg in [({"0": [0, 1.5]}, r"frame 1: opacity must be a number in \[0, 1\]"),
                         ({"0": [True]}, "frame 0: opacity"), ({"x": [1]}, "layer indices"),
                         ({"0": {"a": 1}}, "frame keys"), ({"0": 0.5}, "list of per-frame values")]:
        with pytest.raises(P.ProtocolError, match=msg):
            P.validate_body("render", dict(base, opacity=opacity))
