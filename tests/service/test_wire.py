"""The service over real loopback sockets, with the stand-in engine (fast).

Jobs, uploads, results, path policy, lifecycle (shutdown, parent death,
restart), CURVE. The real engine's runs are in test_engine_wire.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from neural_atlas.core import protocol as P
from neural_atlas.core.client import Client, CurveKeys, ServiceError

from .conftest import ROOT, fast


def _err(fn, *a, **kw) -> ServiceError:
    with pytest.raises(ServiceError) as e:
        fn(*a, **kw)
    return e.value


def test_hello_reports_protocol_device_and_session(server_factory):
    srv = server_factory(probe_device=True)
    c = srv.client()
    h = c.hello()
    assert h["protocol"] == P.PROTOCOL_VERSION and h["backend_version"]
    assert h["session"] == srv.session and c.session == srv.session
    assert h["curve"] is False and h["limits"]["max_blob_bytes"] == P.MAX_BLOB_BYTES
    deadline = time.monotonic() + 60  # the device probe imports torch in a child process
    while h["device"].get("name") == "probing" and time.monotonic() < deadline:
        time.sleep(0.2)
        h = c.hello()
    dev = h["device"]
    for k in ("name", "type", "memory_total", "memory_free", "torch", "triton", "tinycudann"):
        assert k in dev, k
    assert dev["torch"] and isinstance(dev["triton"], bool) and isinstance(dev["tinycudann"], bool)


def test_submit_progress_result_fetch_and_idempotent_token(server, clip_dir, tmp_path):
    c = server.client()
    events = []
    job = c.submit(clip_dir, preset="demo", overrides=fast(60, 20), token="tok-1")
    info = c.wait(job, timeout=180, on_event=events.append)
    assert info["state"] == "done" and info["iteration"] == 60
    prog = [e.body for e in events if e.kind == "progress" and e.job_id == job]
    assert prog, "no progress pushed"
    seqs = [p["seq"] for p in prog]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # how many pushes arrive depends on the machine's speed (coalesced to <= 10/s per job):
    # only their order is asserted; the final state carries the end
    its = [p["iteration"] for p in prog if p["phase"] == "train"]
    assert its == sorted(its) and all(1 <= i <= 60 for i in its)
    # the same token returns the same job, finished, without running it again
    assert c.submit(clip_dir, preset="demo", overrides=fast(60, 20), token="tok-1") == job
    res = c.result(job)
    assert res["atlases"] == ["atlas/layer_0.png"] and res["report"]["psnr"] == 30.0
    got = c.fetch(job, "atlas/layer_0.png", tmp_path / "dl" / "a.png")
    assert got.read_bytes() == (server.workspace / "jobs" / job / "out" / "atlas" / "layer_0.png").read_bytes()
    st = json.loads((server.workspace / "jobs" / job / "job.json").read_text())
    assert st["state"] == "done" and st["attempts"] == 1
    # render from the finished decomposition, edits by path
    edit = clip_dir / "edit0.png"
    edit.write_bytes(b"edit")
    rj = c.render(job, {0: edit})
    assert c.wait(rj, timeout=180)["state"] == "done"
    assert c.result(rj)["outputs"]["n_frames"] == 1


def test_upload_folder_and_file_then_submit(server, tmp_path):
    c = server.client()
    src = tmp_path / "outside" / "clip"  # not under an allowed root: must be uploaded
    src.mkdir(parents=True)
    payload = {f"f{i:03d}.png": os.urandom(1000 + i) for i in range(5)}
    for n, b in payload.items():
        (src / n).write_bytes(b)
    (src / "sub").mkdir()
    (src / "sub" / "mask.png").write_bytes(b"m" * 10)
    err = _err(c.submit, src)
    assert err.code == "path_not_allowed"
    job = c.submit(src, upload=True, preset="demo", overrides=fast(20, 10))
    assert c.wait(job, timeout=180)["state"] == "done"
    inp = server.workspace / "jobs" / job / "input"
    (up,) = list(inp.iterdir())
    for n, b in payload.items():
        assert (up / n).read_bytes() == b
    assert (up / "sub" / "mask.png").read_bytes() == b"m" * 10
    # a single (empty) file uploads too; a wrong checksum and a rogue offset are refused
    f = tmp_path / "outside" / "empty.mp4"
    f.write_bytes(b"")
    assert c.upload(f)["path"] == "empty.mp4"
    u = c.call("upload_begin", {"size": 10})["upload_id"]
    e = _err(c.call, "upload", {"upload_id": u, "path": "a", "offset": 0, "sha256": "0" * 64}, [b"12345"])
    assert e.code == "upload_error"
    assert _err(c.call, "upload", {"upload_id": u, "path": "b", "offset": 99}, [b"x"]).code == "bad_request"
    assert _err(c.call, "upload", {"upload_id": u, "path": "c", "offset": 0}, [b"x" * 11]).code == "too_large"
    assert _err(c.call, "upload_end", {"upload_id": u, "files": 1, "size": 5}).code == "upload_error"
    assert _err(c.call, "upload", {"upload_id": "nope", "path": "a", "offset": 0}, [b""]).code == "not_found"
    assert _err(c.submit, {"upload": u}).code == "upload_error"  # not finished
    assert _err(c.call, "upload_begin", {"size": P.MAX_UPLOAD_BYTES + 1}).code == "too_large"


def test_unknown_ids_bad_states_and_paths(server, clip_dir, tmp_path):
    c = server.client()
    for kind in ("status", "cancel", "result", "delete"):
        assert _err(c.call, kind, {"job_id": "no-such-job"}).code == "not_found"
    assert _err(c.call, "fetch", {"job_id": "nope", "path": "a"}).code == "not_found"
    assert _err(c.render, "nope", {0: clip_dir}).code == "not_found"
    ws = server.workspace
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "x.png").write_bytes(b"secret")
    link = ws / "clips" / "link-out"
    link.symlink_to(outside)
    for path in [str(ws / ".." / "secret"), str(link), str(link / "x.png"), "relative/clip", "/etc",
                 str(ws / "does-not-exist")]:
        with pytest.raises(ServiceError) as e:
            c.call("submit", {"source": path, "token": P.new_id()})
        assert e.value.code == "path_not_allowed", path
    # masks and edits go through the same policy
    with pytest.raises(ServiceError) as e:
        c.call("submit", {"source": str(clip_dir), "masks": [str(link)]})
    assert e.value.code == "path_not_allowed"
    # settings are validated by Config before anything is queued
    for bad in [{"train": {"iterations": "many"}}, {"nope": {"x": 1}}, {"train": {"bogus": 1}},
                {"train": {"batch_size": 1}}]:
        assert _err(c.submit, clip_dir, overrides=bad).code == "invalid_config"
    assert _err(c.submit, clip_dir, preset="ultra").code == "invalid_config"
    job = c.submit(clip_dir, preset="demo", overrides=fast(400, 100))
    assert _err(c.result, job).code == "bad_state"
    deadline = time.monotonic() + 120
    while c.status(job)["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _err(c.delete, job).code == "bad_state"
    # fetch cannot leave the output folder, even through a symlink placed there
    c.cancel(job)
    info = c.wait(job, timeout=180)
    assert info["state"] == "cancelled"
    assert _err(c.render, job, {0: clip_dir}).code == "bad_state"
    c.delete(job)
    assert _err(c.status, job).code == "not_found"
    assert not (ws / "jobs" / job).exists()


def test_fetch_refuses_symlinks_out_of_the_job(server, clip_dir, tmp_path):
    c = server.client()
    job = c.submit(clip_dir, preset="demo", overrides=fast(10, 5))
    assert c.wait(job, timeout=180)["state"] == "done"
    (tmp_path / "secret.txt").write_text("secret")
    (server.workspace / "jobs" / job / "out" / "leak").symlink_to(tmp_path / "secret.txt")
    assert _err(c.call, "fetch", {"job_id": job, "path": "leak"}).code == "not_found"
    assert _err(c.call, "fetch", {"job_id": job, "path": "../job.json"}).code == "bad_request"


def test_cancel_queued_and_running(server, clip_dir):
    c = server.client()
    a = c.submit(clip_dir, preset="demo", overrides=fast(100_000, 1000))
    b = c.submit(clip_dir, preset="demo", overrides=fast(10, 5))
    assert c.cancel(b) == "cancelled"  # still queued behind a
    deadline = time.monotonic() + 120
    while c.status(a)["state"] != "running" or not c.status(a)["iteration"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c.cancel(a)
    info = c.wait(a, timeout=120)  # a bound for a loaded machine, not a speed assert
    assert info["state"] == "cancelled"
    assert c.status(b)["state"] == "cancelled"


def test_shutdown_requeues_running_job_and_restart_resumes(server_factory, clip_dir):
    srv = server_factory()
    c = srv.client()
    job = c.submit(clip_dir, preset="demo", overrides=fast(400, 50))
    deadline = time.monotonic() + 120
    while (c.status(job)["iteration"] or 0) < 120:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert c.shutdown()["stopping"] is True
    assert srv.wait_exit(30) == 0
    rec = json.loads((srv.workspace / "jobs" / job / "job.json").read_text())
    assert rec["state"] == "queued"
    assert not (srv.workspace / "server.json").exists()
    srv2 = server_factory(workspace=srv.workspace)
    c2 = srv2.client()
    info = c2.wait(job, timeout=180)
    assert info["state"] == "done" and info["attempts"] == 2
    assert info["resumed_from"] >= 100  # the checkpoint the cancelled worker wrote on the way out


def test_parent_pid_exit(server_factory):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        srv = server_factory(extra=["--parent-pid", str(parent.pid)])
        srv.client().hello()
        parent.kill()
        parent.wait()
        assert srv.wait_exit(15) == 0
    finally:
        parent.kill()


def test_one_server_per_workspace(server_factory, server):
    other = server_factory(workspace=server.workspace, start=False)
    other.start(wait=False)
    assert other.wait_exit(30) == 3
    assert "another backend is serving" in other.read_log()
    assert server.client().hello()["session"] == server.session


def test_non_loopback_needs_curve_keys(server_factory, tmp_path):
    srv = server_factory(endpoint="tcp://0.0.0.0:*", start=False)
    srv.start(wait=False)
    assert srv.wait_exit(30) == 2
    log = srv.read_log()
    assert "needs CURVE keys" in log and "keys init" in log and "keys add-client" in log
    assert not (srv.workspace / "server.json").exists()


def test_curve_keys_good_wrong_and_missing(server_factory, tmp_path):
    keys = tmp_path / "keys"
    run = [sys.executable, "-m", "backend.service", "keys", "--keys", str(keys)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(run + ["init"], check=True, env=env, capture_output=True, cwd=ROOT)
    out = subprocess.run(run + ["add-client", "blender"], check=True, env=env, capture_output=True,
                         cwd=ROOT, text=True)
    issued = json.loads(out.stdout)
    assert (keys / "clients" / "blender.key").is_file()
    srv = server_factory(keys=keys, extra=["--curve"])
    good = CurveKeys.from_files(keys / "server.key", issued["client_secret"])
    c = srv.client(curve=good)
    assert c.hello()["curve"] is True
    # a stranger's certificate, and no CURVE at all: no answer, ever
    import zmq.auth
    zmq.auth.create_certificates(str(tmp_path), "stranger")
    bad = CurveKeys.from_files(keys / "server.key", tmp_path / "stranger.key_secret")
    for kw in ({"curve": bad}, {}):
        e = _err(srv.client(timeout=0.5, retries=1, **kw).hello)
        assert e.code == "unreachable"
    h = c.hello()
    assert h["counters"].get("handshake_failed", 0) >= 1
    # signing still applies inside CURVE: the right certificate with the wrong HMAC key is dropped
    e = _err(srv.client(curve=good, key=b"w" * 32, timeout=0.5, retries=0).hello)
    assert e.code == "unreachable"
    assert c.hello()["counters"]["dropped_bad_signature"] >= 1


def test_client_cli_exit_codes(server, clip_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), NEURAL_ATLAS_ENGINE="tests.service.fake_engine")
    base = [sys.executable, "-m", "backend.service", "client", "--endpoint", server.endpoint,
            "--keys", str(server.keys), "--timeout", "2", "--retries", "0"]

    def cli(*args):
        return subprocess.run(base + list(args), env=env, capture_output=True, text=True, cwd=ROOT,
                              timeout=60)

    r = cli("hello")
    assert r.returncode == 0 and json.loads(r.stdout)["session"] == server.session
    r = cli("submit", str(clip_dir), "--preset", "demo", "--set", "train.iterations=20",
            "--set", "train.checkpoint_every=10", "--wait")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)["job"]
    assert job["state"] == "done"
    assert cli("status", job["job_id"]).returncode == 0
    assert cli("status", "nope").returncode == 4
    assert cli("wait", job["job_id"]).returncode == 0
    assert cli("list").returncode == 0
    assert cli("submit", str(clip_dir), "--set", "train=5").returncode == 2  # bad arguments
    r = cli("submit", str(clip_dir), "--set", "train.iterations=many")
    assert r.returncode == 4 and "invalid_config" in r.stdout
    dead = base[:]
    dead[dead.index(server.endpoint)] = "tcp://127.0.0.1:9"
    r = subprocess.run(dead + ["hello"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 3 and "unreachable" in r.stdout


def test_nonblocking_use_from_a_timer(server, clip_dir):
    """The add-on's pattern: send, then poll(0) from a timer; replies and pushes arrive as events."""
    c = server.client()
    got = {}
    req = c.send("submit", {"source": str(clip_dir), "preset": "demo", "overrides": fast(30, 10),
                            "token": P.new_id()}, callback=lambda r: got.setdefault("submit", r))
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen.extend(c.poll(0))
        if req.done and c.jobs.get(req.reply["job_id"], {}).get("state") == "done":
            break
        time.sleep(0.02)  # the timer's interval
    assert got["submit"] is req and req.ok
    job = req.reply["job_id"]
    assert c.jobs[job]["state"] == "done" and c.jobs[job]["iteration"] == 30
    kinds = {e.kind for e in seen}
    assert {"reply", "progress", "job"} <= kinds


def test_kill9_server_queued_jobs_stay_queued_and_orphan_worker_checkpoints(server_factory, clip_dir):
    srv = server_factory()
    c = srv.client(timeout=3.0, retries=1)
    a = c.submit(clip_dir, preset="demo", overrides=fast(600, 50))
    b = c.submit(clip_dir, preset="demo", overrides=fast(10, 5))
    c.status(a, watch=True)
    deadline = time.monotonic() + 120
    while (c.jobs.get(a, {}).get("iteration") or 0) < 120:
        assert time.monotonic() < deadline
        c.poll(0.05)
    srv.kill9()  # the server only: its worker sees stdin close, checkpoints and exits
    lock = srv.workspace / "jobs" / a / ".lock"
    from backend.service.store import FileLock
    fl = FileLock(lock)
    assert fl.acquire(timeout=60), "the orphaned worker did not stop"
    fl.release()
    ck = json.loads((srv.workspace / "jobs" / a / "out" / "checkpoints" / "latest.json").read_text())
    assert ck["iteration"] >= 120
    assert json.loads((srv.workspace / "jobs" / b / "job.json").read_text())["state"] == "queued"
    port = srv.endpoint.rsplit(":", 1)[1]
    srv2 = server_factory(workspace=srv.workspace, endpoint=f"tcp://127.0.0.1:{port}")
    events = []
    info = c.wait(a, timeout=180, on_event=events.append)
    assert info["state"] == "done" and info["attempts"] == 2 and info["resumed_from"] == ck["iteration"]
    assert any(e.kind == "restarted" for e in events) and c.session == srv2.session
    assert c.wait(b, timeout=180)["state"] == "done"
    # finished results are never rewritten by a later restart
    out = srv.workspace / "jobs" / a / "out" / "report.json"
    mtime = out.stat().st_mtime_ns
    c.shutdown()
    srv2.wait_exit(30)
    srv3 = server_factory(workspace=srv.workspace)
    c3 = srv3.client()
    assert c3.status(a)["state"] == "done" and out.stat().st_mtime_ns == mtime
    assert c3.hello()["running"] is None


def test_client_options_before_or_after_the_sub_command(server):
    """`client status --endpoint EP` as well as `client --endpoint EP status` (python -m backend)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ep, keys = server.endpoint, str(server.keys)
    forms = [["client", "status", "--endpoint", ep, "--keys", keys],
             ["client", "--endpoint", ep, "--keys", keys, "status"],
             ["client", "--keys", keys, "hello", "--endpoint", ep, "--timeout", "10"]]
    for argv in forms:
        r = subprocess.run([sys.executable, "-m", "backend", *argv], env=env, capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, (argv, r.stderr)
        out = json.loads(r.stdout)
        assert out.get("jobs") == [] or out.get("session") == server.session, (argv, out)
