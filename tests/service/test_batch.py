"""``python -m backend batch SHOTS.toml``: many shots through the service's job lifecycle
and executors (the stand-in engine; a real tiny shot in test_ray's comparison), run as the
real command in a subprocess. Bad shots are reported at once and the others run; an
interrupted batch resumes from its checkpoints; the summary has PSNR, time, device and
state per shot."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import FAKE_ENGINE, ROOT


def _clip(root: Path, name: str) -> Path:
    d = root / "plates" / name
    d.mkdir(parents=True)
    (d / "00000.png").write_bytes(b"fake frame")
    return d


def _shot_list(root: Path, shots: list[dict]) -> Path:
    """A shot list; values starting with '{' are written as TOML inline tables."""
    lines = ["[defaults]", 'preset = "demo"', 'output_root = "atlases"', ""]
    for s in shots:
        lines.append("[[shot]]")
        lines += [f"{k} = {v}" if isinstance(v, str) and v.startswith("{") else f"{k} = {json.dumps(v)}"
                  for k, v in s.items()]
        lines.append("")
    p = root / "shots.toml"
    p.write_text("\n".join(lines))
    return p


def _batch(args: list[str], env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NEURAL_ATLAS_ENGINE=FAKE_ENGINE, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "backend", "batch", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _run(args, timeout=180, env=None):
    p = _batch(args, env)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, out, err


def _summary(root: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((root / "shots.batch" / "summary.json").read_text())["shots"]}


ITERS = "{ train = { iterations = 40, checkpoint_every = 10 } }"


def test_batch_runs_good_shots_reports_bad_ones_and_summarizes(tmp_path):
    _clip(tmp_path, "a")
    _clip(tmp_path, "b")
    shots = _shot_list(tmp_path, [
        {"name": "sh010", "clip": "plates/a", "overrides": ITERS},
        {"name": "sh020", "clip": "plates/missing", "overrides": ITERS},
        {"name": "sh030", "clip": "plates/b", "overrides": ITERS, "frames": "0:1"},
        {"name": "sh040", "clip": "plates/b", "overrides": '{ train = { iterations = "many" } }'},
    ])
    code, out, err = _run([str(shots), "--concurrency", "2"])
    assert code == 2, err  # an invalid shot: bad input, but the good ones ran
    missing = tmp_path / "plates" / "missing"
    assert f"error: shot sh020: clip {missing} does not exist; the other shots run" in err
    assert "error: shot sh040:" in err and "iterations" in err
    ws = tmp_path / "shots.batch"
    summary = json.loads((ws / "summary.json").read_text())
    rows = _summary(tmp_path)
    assert [r["name"] for r in summary["shots"]] == ["sh010", "sh020", "sh030", "sh040"]
    assert rows["sh020"]["state"] == rows["sh040"]["state"] == "invalid"
    for name in ("sh010", "sh030"):
        r = rows[name]
        assert r["state"] == "done" and r["psnr"] == 30.0 and r["attempts"] == 1
        assert r["output"] == str(tmp_path / "atlases" / name)
        assert (tmp_path / "atlases" / name / "atlas" / "layer_0.png").is_file()  # written where listed
        assert r["placement"]["executor"] == "local" and isinstance(r["wall_seconds"], float)
    assert summary["done"] == 2 and summary["executor"]["concurrency"] == 2
    text = (ws / "summary.txt").read_text()
    assert "sh010" in text and "30.00" in text and "does not exist" in text
    assert not (tmp_path / "atlases" / "sh020").exists()  # a bad shot leaves nothing behind
    # not a terminal: one line per change, never a redraw
    assert "\x1b[" not in err and "[sh010] done" in err
    # the same command again: finished shots are kept, nothing runs twice
    code, out, err = _run([str(shots), "--concurrency", "2"])
    again = _summary(tmp_path)
    assert code == 2 and again["sh010"]["job_id"] == rows["sh010"]["job_id"] and again["sh010"]["attempts"] == 1


def test_interrupted_batch_resumes_from_checkpoints(tmp_path):
    for n in ("a", "b"):
        _clip(tmp_path, n)
    long = "{ train = { iterations = 600, checkpoint_every = 50 } }"
    shots = _shot_list(tmp_path, [{"name": "one", "clip": "plates/a", "overrides": long},
                                  {"name": "two", "clip": "plates/b", "overrides": long}])
    p = _batch([str(shots)])  # one at a time: "two" waits behind "one"
    ck = tmp_path / "atlases" / "one" / "checkpoints" / "latest.json"
    try:
        deadline = time.monotonic() + 120
        while not (ck.exists() and json.loads(ck.read_text())["iteration"] >= 100):
            assert p.poll() is None and time.monotonic() < deadline, "the batch ended or stalled"
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    assert "run the same command again to resume" in err
    saved = json.loads(ck.read_text())["iteration"]
    first = _summary(tmp_path)
    assert first["one"]["state"] == "queued" and first["two"]["state"] == "queued"
    code, out, err = _run([str(shots)])
    assert code == 0, err
    rows = _summary(tmp_path)
    assert rows["one"]["state"] == rows["two"]["state"] == "done"
    assert rows["one"]["attempts"] == 2 and rows["one"]["resumed_from"] == saved >= 100
    assert rows["one"]["job_id"] == first["one"]["job_id"]  # the same job, continued
    assert rows["two"]["attempts"] == 1


def test_progress_table_redraws_on_a_terminal():
    from backend.batch import ProgressTable
    buf = io.StringIO()
    t = ProgressTable({"j1": "sh010"}, buf, tty=True)
    job = {"job_id": "j1", "state": "running", "phase": "train", "iteration": 10, "iterations": 100,
           "psnr": 21.5, "elapsed_s": 3.0, "eta_s": 30.0, "placement": {"executor": "local", "gpu": "1"}}
    t.progress(job, True)
    t.draw(0.0)
    t.progress(dict(job, iteration=50, psnr=25.25), False)
    t.draw(1.0)
    first, second = buf.getvalue().split("\x1b[3F\x1b[J")  # the second draw moves up over the first
    assert "sh010" in first and "10/100" in first and "21.50" in first and "gpu 1" in first
    assert "50/100" in second and "25.25" in second and "0:30" in second


def test_shot_list_that_cannot_be_read_is_refused(tmp_path):
    bad = tmp_path / "shots.toml"
    bad.write_text("[[shot]\nname = ")
    code, out, err = _run([str(bad)])
    assert code == 2 and "is not valid TOML" in err
    code, out, err = _run([str(tmp_path / "nope.toml")])
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty.toml").write_text("[defaults]\npreset = 'demo'\n")
    code, out, err = _run([str(tmp_path / "empty.toml")])
    assert code == 2 and "lists no shots" in err


def test_batch_on_ray(tmp_path, ray_head):
    _clip(tmp_path, "a")
    _clip(tmp_path, "b")
    shots = _shot_list(tmp_path, [{"name": "x", "clip": "plates/a", "overrides": ITERS},
                                  {"name": "y", "clip": "plates/b", "overrides": ITERS}])
    code, out, err = _run([str(shots), "--executor", "ray", "--ray-address", ray_head.address], env=ray_head.env)
    assert code == 0, err
    rows = _summary(tmp_path)
    assert [r["state"] for r in rows.values()] == ["done", "done"]
    assert all(r["placement"]["executor"] == "ray" and r["placement"]["ip"] == "127.0.0.1" for r in rows.values())
    assert "ray 127.0.0.1" in (tmp_path / "shots.batch" / "summary.txt").read_text()
