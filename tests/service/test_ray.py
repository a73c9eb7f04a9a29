"""The Ray executor with a real local Ray cluster (``ray_head``: loopback, 2 CPUs, a
``fake_gpu`` resource) behind a real server: jobs run as Ray actors, cancel reaches them,
a killed Ray worker resumes from its checkpoint, a restarted service re-attaches, and
fractional GPU shares pack two jobs on one (fake) GPU.

Waits are on events (pushes and job records) with generous deadlines; the stand-in
engine (``fake_engine``) trains 10 ms steps, so "mid-training" is a state, not a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from neural_atlas.core import protocol as P

from .conftest import fast
from .test_engine_wire import _wait_for

pytest.importorskip("ray", reason="the Ray executor's tests need `pip install neural-atlas[ray]`")


def _ray_server(server_factory, head, *extra, **kw):
    return server_factory(extra=["--executor", "ray", "--ray-address", head.address, *extra],
                          env=dict(head.env, **kw.pop("env", {})), **kw)


def _until(c, job, pred, timeout=120.0):
    """Watch the job and poll its pushes until pred(JobInfo) holds (fails if it ends first)."""
    c.status(job, watch=True)
    return _wait_for(c, job, pred, timeout)


def _training(i):
    return i.get("phase") == "train" and (i.get("iteration") or 0) >= 20


def test_jobs_run_as_ray_actors_and_cancel_reaches_them(server_factory, ray_head, clip_dir):
    srv = _ray_server(server_factory, ray_head)
    c = srv.client(timeout=5.0)
    h = c.hello()
    assert h["executor"]["name"] == "ray" and h["executor"]["per_job"] == {"CPU": 1.0}
    done = c.submit(clip_dir, preset="demo", overrides=fast(60, 20))
    info = c.wait(done, timeout=120)
    assert info["state"] == "done" and info["iteration"] == 60
    pl = info["placement"]
    assert pl["executor"] == "ray" and pl["ip"] == "127.0.0.1" and pl["resources"] == {"CPU": 1.0}
    assert pl["pid"] != pl["worker_pid"]  # the actor hosts the same worker process as local jobs
    assert c.result(done)["report"]["psnr"] == 30.0
    # cancel reaches a running Ray job: the wait ends on the `cancelled` push (the timeout is a
    # bound for a loaded machine; the time it took is printed, never asserted)
    job = c.submit(clip_dir, preset="demo", overrides=fast(100_000, 1000))
    _until(c, job, _training)
    t0 = time.monotonic()
    c.cancel(job)
    info = c.wait(job, timeout=120)
    took = time.monotonic() - t0
    assert info["state"] == "cancelled", info
    print(f"ray cancel took {took:.2f} s")
    ck = json.loads((srv.workspace / "jobs" / job / "out" / "checkpoints" / "latest.json").read_text())
    assert ck["iteration"] >= 20  # the worker saved on its way out, as under the local executor


def test_two_tiny_shots_on_ray_match_the_local_executor(server_factory, ray_head, tmp_path):
    """The real engine: two tiny synthetic shots through Ray (two actors at once) and through
    the local executor (--concurrency 2): the same atlases, byte for byte, and the same PSNR."""
    from backend.synthetic import make_synthetic_clip

    from .test_engine_wire import ITER_S_ENV, tiny
    shots = tmp_path / "shots"
    for seed in (3, 4):
        make_synthetic_clip(48, 32, 4, seed=seed).write(shots / f"shot{seed}")
    running = {}
    for name, extra in (("local", ["--concurrency", "2"]), ("ray", ["--executor", "ray", "--ray-address",
                                                                    ray_head.address])):
        srv = server_factory(workspace=tmp_path / f"ws-{name}", engine=None,
                             extra=[*extra, "--allow-root", str(shots)], env=dict(ray_head.env, **ITER_S_ENV))
        c = srv.client(timeout=5.0)
        running[name] = (srv, c, [c.submit(shots / f"shot{seed}", preset="demo", overrides=tiny(8, every=4),
                                           masks=[shots / f"shot{seed}" / "masks" / "object0"])
                                  for seed in (3, 4)])
    results = {}
    for name, (srv, c, jobs) in running.items():  # all four jobs run at once
        out = results[name] = []
        for j in jobs:
            info = c.wait(j, timeout=400)
            assert info["state"] == "done", info
            assert info["placement"]["executor"] == name
            res = c.result(j)
            d = srv.workspace / "jobs" / j / "out"
            out.append((res["report"]["psnr"], res["atlases"], [(d / a).read_bytes() for a in res["atlases"]]))
    assert results["ray"] == results["local"]
    assert results["local"][0][0] != results["local"][1][0]  # two different shots


def test_killed_ray_worker_resumes_from_its_checkpoint(server_factory, ray_head, clip_dir):
    srv = _ray_server(server_factory, ray_head)
    c = srv.client(timeout=5.0)
    job = c.submit(clip_dir, preset="demo", overrides=fast(400, 50))
    ck = srv.workspace / "jobs" / job / "out" / "checkpoints" / "latest.json"
    info = _until(c, job, lambda i: (i.get("iteration") or 0) >= 120 and ck.exists() and i.get("placement"))
    pl = info["placement"]
    # the Ray worker dies, then the job's process under it (a node or worker loss): no report.
    # (The other order is a crash of the job's own process on a live host: that fails the job,
    # as under the local executor.)
    for pid in (pl["pid"], pl["worker_pid"]):
        os.kill(pid, signal.SIGKILL)
    at_kill = json.loads(ck.read_text())["iteration"]
    info = c.wait(job, timeout=120)
    assert info["state"] == "done" and info["iteration"] == 400, info
    assert info["attempts"] == 2 and info["resumed_from"] == at_kill and at_kill >= 100
    assert info["placement"]["pid"] != pl["pid"]  # a new actor
    rec = json.loads((srv.workspace / "jobs" / job / "job.json").read_text())
    assert rec["lost"] == 1  # one lost host, retried (at most --max-lost times)


def test_restarted_service_reattaches_to_running_ray_jobs(server_factory, ray_head, clip_dir):
    srv = _ray_server(server_factory, ray_head)
    c = srv.client(timeout=2.0, retries=1)
    job = c.submit(clip_dir, preset="demo", overrides=fast(600, 50))
    queued = c.submit(clip_dir, preset="demo", overrides=fast(10, 5))
    _until(c, job, _training)
    srv.kill9()  # the service only: the detached actor and its worker keep training
    port = srv.endpoint.rsplit(":", 1)[1]
    srv2 = _ray_server(server_factory, ray_head, workspace=srv.workspace, endpoint=f"tcp://127.0.0.1:{port}")
    events = []
    info = c.wait(job, timeout=120, on_event=events.append)
    assert info["state"] == "done" and info["iteration"] == 600
    assert any(e.kind == "restarted" for e in events) and c.session == srv2.session
    assert info["attempts"] == 1 and info["resumed_from"] is None  # followed, never restarted
    assert c.wait(queued, timeout=120)["state"] == "done"  # nothing lost from the queue either
    assert f"job {job}: re-attached (ray)" in srv2.read_log()


def test_fractional_gpu_shares_pack_two_jobs_per_gpu(server_factory, ray_head, clip_dir):
    """Each job asks for half of the cluster's one `fake_gpu`: Ray runs two at once and holds
    the third until a share is free (the service hands all three to Ray: --concurrency 3)."""
    srv = _ray_server(server_factory, ray_head, "--ray-resource", "fake_gpu=0.5", "--cpus-per-job", "0.5",
                      "--concurrency", "3")
    c = srv.client(timeout=5.0)
    a, b, third = (c.submit(clip_dir, preset="demo", overrides=fast(100_000, 1000)) for _ in range(3))
    for j in (a, b):
        info = _until(c, j, _training)
        assert info["placement"]["resources"] == {"CPU": 0.5, "fake_gpu": 0.5}
    t = c.status(third)
    assert t["state"] == "running" and t["phase"] == "queued" and "waiting for a Ray worker" in t["message"]
    assert "pid" not in (t["placement"] or {})  # Ray has not started its actor: no share is free
    c.cancel(a)
    assert c.wait(a, timeout=180)["state"] == "cancelled"
    info = _until(c, third, _training)  # the freed half goes to the waiting job
    assert info["placement"]["resources"]["fake_gpu"] == 0.5
    assert c.status(b)["state"] == "running"
    for j in (b, third):
        c.cancel(j)
        assert c.wait(j, timeout=180)["state"] == "cancelled"


def test_unreachable_ray_address_is_refused_at_start(server_factory, ray_head):
    from .ray_cluster import free_port
    srv = server_factory(extra=["--executor", "ray", "--ray-address", f"127.0.0.1:{free_port()}"],
                         env=ray_head.env, start=False)
    srv.start(wait=False)
    assert srv.wait_exit(60) == 2
    log = srv.read_log()
    assert "cannot reach the Ray cluster at 127.0.0.1:" in log and "ray start --head" in log
    assert not (srv.workspace / "server.json").exists()


def test_workspace_the_ray_nodes_cannot_see_is_refused_at_start(server_factory, tmp_path):
    """A Ray node in a mount namespace where the workspace's folder is hidden under an empty
    tmpfs: the service's token file is not there for it, and the service refuses to start."""
    import shutil
    import subprocess
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (mount namespaces) to hide the workspace from a Ray node")
    from .ray_cluster import RayHead
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    head = RayHead(prefix=["unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{hidden}" && exec "$0" "$@"'])
    try:
        srv = server_factory(workspace=hidden / "ws", extra=["--executor", "ray", "--ray-address", head.address],
                             env=head.env, start=False)
        srv.start(wait=False)
        assert srv.wait_exit(120) == 2
        log = srv.read_log()
        assert f"the workspace {hidden / 'ws'} is not usable on every Ray node" in log, log
        assert "shared filesystem mounted at the same path" in log and "FileNotFoundError" in log
    finally:
        head.stop()
