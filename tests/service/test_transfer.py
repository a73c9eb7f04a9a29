"""Files over the wire for a backend on another machine: content-addressed uploads (a
re-render after a small edit sends only that edit, bytes counted), resumable checked
downloads, the shared-files probe, quotas, paths kept inside their folders, partial
uploads removed. Real server processes (stand-in engine), real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from neural_atlas.core import protocol as P
from neural_atlas.core import remote as R
from neural_atlas.core.client import ServiceError

from .conftest import ROOT, fast


def _clip(d, n=6, size=3000):
    d.mkdir(parents=True)
    for i in range(n):
        (d / f"{i:05d}.png").write_bytes(os.urandom(size))
    return d


def _uploads(ws):
    return [p for p in (ws / "uploads").iterdir()]


def test_probe_tells_shared_from_remote(server_factory, tmp_path):
    # the backend may read only its own workspace: this machine's folder is not shared
    srv = server_factory(extra=["--allow-root", str(tmp_path / "ws")])
    c = srv.client()
    assert c.shares_files(tmp_path / "client") is False
    assert c.shares_files(tmp_path / "ws" / "shared") is True  # a folder the backend reads
    assert not [p for p in (tmp_path / "client").iterdir()]  # the probe file is gone
    # another file at the path (not what the client wrote) is not "shared"
    f = tmp_path / "ws" / "x.txt"
    f.write_bytes(b"abc")
    assert c.call("probe", {"path": str(f), "sha256": "0" * 64})["readable"] is False


def test_rerender_after_small_edit_sends_only_that_edit(server, tmp_path):
    c = server.client()
    clip = _clip(tmp_path / "outside" / "clip")
    masks = tmp_path / "outside" / "masks" / "obj0"
    masks.mkdir(parents=True)
    blank = os.urandom(500)
    for i in range(6):  # identical blank mask frames: sent once
        (masks / f"{i:05d}.png").write_bytes(blank)
    prog = R.Progress()
    src, msrc = c.upload_many([clip, masks], prog)
    assert prog.sent_bytes == 6 * 3000 + 500 and prog.done_bytes == prog.total_bytes == 6 * 3500
    job = c.submit(src, masks=[msrc], preset="demo", overrides=fast(10, 5))
    assert c.wait(job, timeout=120)["state"] == "done"
    inp = server.workspace / "jobs" / job / "input"
    assert sorted(p.name for p in (inp / src["upload"] / "s1").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    # the same clip again (a re-decompose): nothing travels
    again = R.Progress()
    unused = c.upload_many([clip, masks], again)
    assert again.sent_bytes == 0 and again.skipped_bytes == 6 * 3500
    c.call("upload_abort", {"upload_id": unused[0]["upload"]})

    e0, e1 = tmp_path / "edits" / "layer_0.png", tmp_path / "edits" / "layer_1.png"
    e0.parent.mkdir()
    e0.write_bytes(os.urandom(20000))
    e1.write_bytes(os.urandom(30000))
    first = R.Progress()
    edits = dict(zip(("0", "1"), c.upload_many([e0, e1], first)))
    assert first.sent_bytes == 50000
    r1 = c.call("render", {"job_id": job, "edits": edits, "formats": ["png"], "token": P.new_id()})["job_id"]
    assert c.wait(r1, timeout=60)["state"] == "done"
    # a few strokes on layer 1: only its bytes travel
    data = bytearray(e1.read_bytes())
    data[100:110] = b"\xff" * 10
    e1.write_bytes(bytes(data))
    second = R.Progress()
    edits2 = dict(zip(("0", "1"), c.upload_many([e0, e1], second)))
    assert second.sent_bytes == 30000 and second.skipped_bytes == 20000
    r2 = c.call("render", {"job_id": job, "edits": edits2, "formats": ["png"], "token": P.new_id()})["job_id"]
    assert c.wait(r2, timeout=60)["state"] == "done"
    got = server.workspace / "jobs" / r2 / "input" / edits2["1"]["upload"] / "s1" / "layer_1.png"
    assert got.read_bytes() == bytes(data)
    assert (server.workspace / "jobs" / r2 / "input" / edits2["0"]["upload"] / "s0" / "layer_0.png"
            ).read_bytes() == e0.read_bytes()
    assert not _uploads(server.workspace)  # every upload was consumed by its job


def test_interrupted_download_resumes_and_is_checked(server, clip_dir, tmp_path):
    c = server.client()
    job = c.submit(clip_dir, preset="demo", overrides=fast(10, 5))
    assert c.wait(job, timeout=120)["state"] == "done"
    big = os.urandom(2 * P.CHUNK_BYTES + 12345)  # three chunks
    (server.workspace / "jobs" / job / "out" / "maps").mkdir()
    (server.workspace / "jobs" / job / "out" / "maps" / "big.exr").write_bytes(big)
    files = R.select(c.result(job)["files"], ("maps/", "atlas/"))
    dest = tmp_path / "downloads"
    first = R.Progress()
    with pytest.raises(R.TransferError):  # the connection "drops" after one chunk
        R.download(c, job, files, str(dest), first, max_chunks=2)  # the atlas, one chunk of big
    part = dest / "maps" / "big.exr.part"
    assert part.is_file() and not (dest / "maps" / "big.exr").exists()
    kept = part.stat().st_size
    assert 0 < kept < len(big)
    second = R.Progress()
    R.download(c, job, files, str(dest), second)
    assert (dest / "maps" / "big.exr").read_bytes() == big and not part.exists()
    atlas = sum(f["size"] for f in files if f["path"].startswith("atlas/"))
    assert second.sent_bytes == len(big) - kept  # only the rest travelled (the atlas was there)
    assert second.skipped_bytes == kept + atlas and second.resumed >= 1
    third = R.Progress()
    R.download(c, job, files, str(dest), third)  # all there: nothing travels
    assert third.sent_bytes == 0 and third.skipped_bytes == len(big) + atlas
    # a corrupt leftover .part is caught by the checksum and thrown away
    (dest / "maps" / "big.exr").unlink()
    part.write_bytes(b"\0" * 100)
    with pytest.raises(R.TransferError, match="checksum"):
        R.download(c, job, files, str(dest))
    assert not part.exists()
    R.download(c, job, files, str(dest))
    assert (dest / "maps" / "big.exr").read_bytes() == big


def test_quota_paths_and_partial_uploads(server_factory, tmp_path):
    srv = server_factory(extra=["--job-quota", "10K"])
    c = srv.client()
    clip = _clip(tmp_path / "outside" / "clip", n=4, size=3000)  # 12000 bytes > 10 KiB
    with pytest.raises(ServiceError) as e:
        c.upload_many([clip])
    assert e.value.code == "quota_exceeded" and "10240 bytes per job" in e.value.message
    assert "--job-quota" in e.value.detail
    # a download never lands outside its folder
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(R.TransferError):
            R.safe_dest(str(tmp_path / "dl"), bad)
    (tmp_path / "dl").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "dl" / "atlas")
    with pytest.raises(R.TransferError, match="leaves"):
        R.safe_dest(str(tmp_path / "dl"), "atlas/layer_0.png")

    # cancelled mid-upload: the partial upload is removed from the backend at once
    class CancelAfter:
        def __init__(self, n):
            self.n = n

        def is_set(self):
            self.n -= 1
            return self.n < 0

    small = _clip(tmp_path / "outside" / "small", n=3, size=2000)
    prog = R.Progress()
    with pytest.raises(R.TransferCancelled):
        R.upload(c, [str(small)], prog, CancelAfter(4))  # hashing 3 files, one file, then cancelled
    assert prog.sent_bytes == 2000 and not _uploads(srv.workspace)
    assert c.call("upload_have", {"hashes": [R.file_sha256(str(small / "00001.png"))]})["have"] == []
    # what was verified before the cancel is kept by content: the retry sends only the rest
    again = R.Progress()
    src = R.upload(c, [str(small)], again)
    assert again.sent_bytes == 4000 and again.skipped_bytes == 2000 and "upload" in src[0]


def test_blob_store_quota_keeps_what_jobs_use(server_factory, tmp_path):
    srv = server_factory(extra=["--store-quota", "5000"])
    c = srv.client()
    a = tmp_path / "a.bin"
    a.write_bytes(os.urandom(3000))
    c.call("upload_abort", {"upload_id": c.upload_many([a])[0]["upload"]})  # no job uses its blob now
    b = tmp_path / "b.bin"
    b.write_bytes(os.urandom(3000))
    c.upload_many([b])  # fits only once a's blob is swept
    have = c.call("upload_have", {"hashes": [R.file_sha256(str(a)), R.file_sha256(str(b))]})["have"]
    assert have == [R.file_sha256(str(b))]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6000))
    with pytest.raises(ServiceError) as e:
        c.upload_many([big])
    assert e.value.code == "quota_exceeded" and "--store-quota" in e.value.detail


def _objects(text: str) -> list:
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return out
        obj, i = dec.raw_decode(text, i)
        out.append(obj)


def test_client_cli_submit_and_render_through_uploads(server_factory, tmp_path):
    """`client submit --upload` and `client render --upload --download` against a backend that
    may read only its own workspace."""
    srv = server_factory(extra=["--allow-root", str(tmp_path / "ws")])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "backend.service", "client", "--endpoint", srv.endpoint,
            "--keys", str(srv.keys), "--timeout", "5"]

    def cli(*args):
        r = subprocess.run(base + list(args), env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
        return r.returncode, r

    clip = _clip(tmp_path / "outside" / "clip", n=2, size=100)
    code, r = cli("submit", str(clip), "--preset", "demo", "--set", "train.iterations=10", "--wait")
    assert code == 4 and "path_not_allowed" in r.stdout  # not shared: must be uploaded
    code, r = cli("submit", str(clip), "--preset", "demo", "--set", "train.iterations=10", "--upload", "--wait")
    assert code == 0, r.stderr
    job = _objects(r.stdout)[-1]["job"]["job_id"]
    edit = tmp_path / "outside" / "layer_1.png"
    edit.write_bytes(os.urandom(800))
    dl = tmp_path / "got"
    code, r = cli("render", job, "--edit", f"1={edit}", "--upload", "--download", str(dl))
    assert code == 0, r.stderr
    lines = _objects(r.stdout)
    assert {"downloaded": 1, "folder": str(dl)} in lines and lines[-1]["job"]["state"] == "done"
    assert (dl / "frames" / "edit_1.txt").is_file()  # the stand-in engine's "frame"
    code, r = cli("render", job, "--edit", "1")
    assert code == 2 and "LAYER=PNG" in r.stderr


def test_stalled_upload_resumes_after_reconnect(server, tmp_path):
    """The backend stalls mid-file (SIGSTOP); the chunk's request gives up (`unreachable`), the
    client reconnects, asks where the upload stands and sends the rest. No timing: the
    backend is woken when the client reports the disconnect."""
    woke = []

    def on_event(e):
        if e.kind == "disconnected" and not woke:
            woke.append(True)
            os.kill(server.proc.pid, signal.SIGCONT)

    c = server.client(timeout=0.5, retries=0, on_event=on_event)
    big = tmp_path / "clip.mov"
    data = os.urandom(2 * P.CHUNK_BYTES + 777)
    big.write_bytes(data)

    prog = R.Progress()

    class StallAfterFirstChunk:
        done = False

        def is_set(self):
            if prog.sent_bytes >= P.CHUNK_BYTES and not self.done:
                self.done = True
                os.kill(server.proc.pid, signal.SIGSTOP)
            return False

    try:
        (src,) = R.upload(c, [str(big)], prog, StallAfterFirstChunk())
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert woke and prog.resumed >= 1 and prog.done_bytes == len(data)
    c2 = server.client()
    job = c2.call("submit", {"source": src, "preset": "demo", "overrides": fast(5, 5), "token": P.new_id()})["job_id"]
    assert c2.wait(job, timeout=60)["state"] == "done"
    assert (server.workspace / "jobs" / job / "input" / src["upload"] / "clip.mov").read_bytes() == data


def test_a_shot_cut_from_a_long_sequence_sends_only_its_frames(server, tmp_path):
    # frames 3..6 of a 10-frame folder (natural order: 2 before 10), with their mask frames
    seq = tmp_path / "outside" / "seq"
    seq.mkdir(parents=True)
    for i in range(10):
        (seq / f"f{i}.png").write_bytes(os.urandom(1000))
    (seq / "notes.txt").write_text("not a frame")
    masks = tmp_path / "outside" / "masks" / "obj0"
    masks.mkdir(parents=True)
    for i in range(10):
        (masks / f"m{i}.png").write_bytes(os.urandom(200))
    c = server.client()
    prog = R.Progress()
    src, msrc = c.upload_many([seq, masks], prog, ranges=[(3, 7), (3, 7)])
    assert prog.files == 8 and prog.sent_bytes == prog.total_bytes == 4 * 1200
    job = c.submit(src, masks=[msrc], frame_range=(0, 4), preset="demo", overrides=fast(10, 5))
    assert c.wait(job, timeout=120)["state"] == "done"
    inp = server.workspace / "jobs" / job / "input" / src["upload"]
    assert sorted(p.name for p in (inp / "s0").iterdir()) == [f"f{i}.png" for i in range(3, 7)]
    assert sorted(p.name for p in (inp / "s1").iterdir()) == [f"m{i}.png" for i in range(3, 7)]
    # a range the folder does not hold is refused before anything is sent
    with pytest.raises(ServiceError, match="frames 8-11 are not all in"):
        c.upload_many([seq], R.Progress(), ranges=[(8, 12)])
    # the client's submit (the command line's `client submit --upload --frames 3:7`) does the same
    job2 = c.submit(seq, masks=[masks], frame_range=(3, 7), upload=True, preset="demo", overrides=fast(10, 5))
    assert c.wait(job2, timeout=120)["state"] == "done"
    ups = [p for p in (server.workspace / "jobs" / job2 / "input").iterdir()]
    assert len(ups) == 1 and sorted(p.name for p in (ups[0] / "s0").iterdir()) == [f"f{i}.png" for i in range(3, 7)]
    # a file (a movie) ignores its range: it goes whole
    movie = tmp_path / "outside" / "shot.mp4"
    movie.write_bytes(os.urandom(3000))
    assert R.plan([str(movie)], ranges=[(3, 7)]).files[0].size == 3000
