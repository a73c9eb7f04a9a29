"""The local executor with ``serve --concurrency N``: several jobs at once on one machine,
each worker given one of the visible GPUs (least loaded first). Shown by events: both
jobs report training before either finishes (long jobs that are then cancelled)."""

from __future__ import annotations

import time

from neural_atlas.core import protocol as P

from .conftest import fast


def _until(c, pred, timeout=60.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c.poll(0.1)
        if pred():
            return
    raise AssertionError(f"timed out waiting for {what}; jobs {c.jobs}")


def _training(c, job):
    i = c.jobs.get(job) or {}
    assert i.get("state") not in P.TERMINAL_STATES, i
    return i.get("phase") == "train" and (i.get("iteration") or 0) >= 5


def test_concurrency_two_runs_two_jobs_at_once_and_spreads_gpus(server_factory, clip_dir):
    # two visible GPUs (names only: the stand-in engine does not touch CUDA), three slots
    srv = server_factory(extra=["--concurrency", "3"], env={"CUDA_VISIBLE_DEVICES": "0,1"})
    c = srv.client(timeout=5.0)
    assert c.hello()["executor"] == {"name": "local", "concurrency": 3, "gpus": ["0", "1"]}
    jobs = [c.submit(clip_dir, preset="demo", overrides=fast(100_000, 1000)) for _ in range(3)]
    _until(c, lambda: all(_training(c, j) for j in jobs), what="three jobs training at once")
    assert sorted(c.hello()["running_jobs"]) == sorted(jobs)
    places = [c.jobs[j]["placement"] for j in jobs]
    assert sorted(p["slot"] for p in places) == [0, 1, 2]
    assert sorted(p["gpu"] for p in places) == ["0", "0", "1"]  # two on one GPU when N exceeds them
    for p in places:  # what the worker process really got
        env = open(f"/proc/{p['pid']}/environ", "rb").read().split(b"\0")
        assert f"CUDA_VISIBLE_DEVICES={p['gpu']}".encode() in env
    for j in jobs:
        c.cancel(j)
    for j in jobs:
        assert c.wait(j, timeout=180)["state"] == "cancelled"


def test_concurrency_two_holds_the_third_job_until_a_slot_frees(server_factory, clip_dir):
    srv = server_factory(extra=["--concurrency", "2"])
    c = srv.client(timeout=5.0)
    a, b, third = (c.submit(clip_dir, preset="demo", overrides=fast(100_000, 1000)) for _ in range(3))
    c.watch([a, b, third])
    _until(c, lambda: _training(c, a) and _training(c, b), what="a and b training at once")
    assert c.status(third)["state"] == "queued"  # two slots: the lifecycle has not launched it
    c.cancel(a)
    assert c.wait(a, timeout=180)["state"] == "cancelled"
    _until(c, lambda: _training(c, third), what="the third job in the freed slot")
    assert c.status(b)["state"] == "running"
    for j in (b, third):
        c.cancel(j)
        assert c.wait(j, timeout=180)["state"] == "cancelled"
