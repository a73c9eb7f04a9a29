"""Files over the wire for a backend on another machine (no bpy, no torch).

* ``shares_files(client, folder)``: whether the backend reads this machine's files at the
  same paths. Checked, never guessed from the address: a random probe file is written in
  ``folder`` and the backend is asked (``probe``) whether it reads that path with that
  content. Cached per (endpoint, server session, folder).
* ``upload(client, paths)``: one upload session holding every file a job needs (a clip
  file or frames folder, mask folders, edit images), content-addressed: the backend's blob
  store is asked which sha256 digests it holds (``upload_have``) and those files are
  placed from it (``upload_link``) instead of sent, so a re-render after a few strokes
  sends only the edit images that changed. Chunks in flight in a window; after a lost
  connection the upload resumes from the offset the backend received (``upload_status``).
* ``download(client, job_id, rels, dest)``: files of a job's output into ``dest`` (never
  outside it), resumable: a ``.part`` file keeps what arrived and the next call continues
  from its size; each file is checked against the backend's sha256; a file already there
  with the same digest costs one round trip.

Both take a :class:`Progress` (bytes and files done, read by the UI from another thread)
and a cancel flag (``threading.Event`` or anything with ``is_set()``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from . import protocol as P

RETRIES = 4  # reconnect-and-resume attempts of one transfer after `unreachable`
DOWNLOADS = {  # what the add-on reads of a finished job's output, by job kind (path prefixes)
    "decompose": ("atlas/", "maps/", "maps_source/", "report.json"),  # atlases, the live preview's maps
    "paint_frame": ("edits/",),
    "render": ("",),  # the rendered shot
}


class TransferCancelled(Exception):
    pass


class TransferError(Exception):
    def __init__(self, code: str, message: str, detail: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.detail = code, message, detail


@dataclass
class Progress:
    """What a transfer has done; plain fields written by the transfer, read by the UI."""

    what: str = ""
    total_bytes: int = 0  # of every file the job needs
    done_bytes: int = 0  # of those, present on the far side (sent, linked or already there)
    sent_bytes: int = 0  # bytes that actually travelled (payload only)
    skipped_bytes: int = 0  # bytes not sent: the far side held the content
    files: int = 0
    files_done: int = 0
    resumed: int = 0  # times a transfer continued after a lost connection
    partial: int = 0  # bytes of the file being sent, counted in done_bytes (resume bookkeeping)
    state: str = "running"  # running | done | failed | cancelled
    error: str = ""

    @property
    def fraction(self) -> float:
        return 1.0 if self.total_bytes <= 0 else min(1.0, self.done_bytes / self.total_bytes)

    def text(self) -> str:
        mb = 1024 * 1024
        return (f"{self.what} {self.done_bytes / mb:.1f} / {self.total_bytes / mb:.1f} MB "
                f"({self.sent_bytes / mb:.1f} MB sent)")


def _check(cancel: Any) -> None:
    if cancel is not None and cancel.is_set():
        raise TransferCancelled("cancelled")


# ---------------------------------------------------------------- hashing
_HASHES: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256)
_HASH_LOCK = threading.Lock()


def file_sha256(path: str, cancel: Any = None) -> str:
    """The file's sha256, cached by (size, mtime): unchanged frames are hashed once."""
    st = os.stat(path)
    key = os.path.abspath(path)
    with _HASH_LOCK:
        hit = _HASHES.get(key)
    if hit and hit[:2] == (st.st_size, st.st_mtime_ns):
        return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            _check(cancel)
            h.update(block)
    with _HASH_LOCK:
        _HASHES[key] = (st.st_size, st.st_mtime_ns, h.hexdigest())
    return h.hexdigest()


# ------------------------------------------------------ shared filesystem
_SHARED: dict[tuple[str, str, str], bool] = {}


def shares_files(client: Any, folder: str, *, refresh: bool = False) -> bool:
    """True when the backend reads ``folder`` (a folder of this machine) at the same path."""
    if not client.session:
        client.hello()
    key = (client.endpoint, str(client.session), os.path.abspath(folder))
    if key in _SHARED and not refresh:
        return _SHARED[key]
    os.makedirs(folder, exist_ok=True)
    data = secrets.token_hex(32).encode()
    path = os.path.join(os.path.abspath(folder), f".neural_atlas_probe_{secrets.token_hex(6)}")
    with open(path, "wb") as f:
        f.write(data)
    try:
        r = client.call("probe", {"path": path, "sha256": hashlib.sha256(data).hexdigest()})
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    _SHARED[key] = bool(r.get("readable"))
    return _SHARED[key]


def forget_shared() -> None:
    _SHARED.clear()


# ----------------------------------------------------------------- upload
@dataclass
class _File:
    full: str
    rel: str
    size: int
    sha: str = ""


@dataclass
class UploadPlan:
    files: list[_File] = field(default_factory=list)
    sources: list[dict[str, str]] = field(default_factory=list)  # one per input path


FrameRange = Optional[tuple[int, int]]


def frames_in_range(folder: str, frame_range: tuple[int, int]) -> list[tuple[str, str]]:
    """(absolute path, name) of the frames ``[start, stop)`` of a frame folder, counted in the
    order the backend reads them (``strips.list_frames``: image files in natural order)."""
    from .strips import StripError, list_frames

    a, b = int(frame_range[0]), int(frame_range[1])
    try:
        names = list_frames(folder)
    except StripError as e:
        raise TransferError("bad_request", str(e)) from None
    if not 0 <= a < b <= len(names):
        raise TransferError("bad_request", f"frames {a}-{b - 1} are not all in {folder} ({len(names)} frames)")
    return [(os.path.join(folder, n), n) for n in names[a:b]]


def plan(paths: Sequence[str], cancel: Any = None, ranges: Optional[Sequence[FrameRange]] = None) -> UploadPlan:
    """Every file under ``paths`` (a file or a folder each) as ``s<i>/<relative path>``
    (without the ``s<i>/`` for a single path). ``ranges[i]`` (a frame folder's ``(start,
    stop)``): only those frames of folder ``i`` go, so a shot cut from a long sequence sends its
    own frames; the backend then reads them as frames ``0 .. stop - start - 1``."""
    out = UploadPlan()
    for i, path in enumerate(paths):
        path = os.path.abspath(os.fspath(path))
        rng = ranges[i] if ranges and i < len(ranges) else None
        if rng is not None and os.path.isdir(path):
            found = frames_in_range(path, rng)
        else:
            found = list(P.iter_files(path))
        if not found:
            raise TransferError("bad_request", f"nothing to upload at {path}")
        pre = f"s{i}/" if len(paths) > 1 else ""
        for full, rel in found:
            out.files.append(_File(full, pre + rel, os.path.getsize(full)))
        out.sources.append({"path": pre + found[0][1]} if os.path.isfile(path) else
                           {"path": pre.rstrip("/")} if pre else {})
    for f in out.files:
        f.sha = file_sha256(f.full, cancel)
    return out


def upload(client: Any, paths: Sequence[str], progress: Optional[Progress] = None, cancel: Any = None,
           *, window: int = 4, ranges: Optional[Sequence[FrameRange]] = None) -> list[dict[str, str]]:
    """Send what the backend lacks of ``paths`` (of frame folders, only the frames of
    ``ranges``: see ``plan``); returns one source ({"upload", "path"}) per path."""
    prog = progress or Progress()
    prog.what = prog.what or "upload"
    p = plan(paths, cancel, ranges)
    prog.total_bytes, prog.files = sum(f.size for f in p.files), len(p.files)
    digests = sorted({f.sha for f in p.files})
    have: set[str] = set()
    for i in range(0, len(digests), P.MAX_ARRAY_LEN):
        have.update(client.call("upload_have", {"hashes": digests[i:i + P.MAX_ARRAY_LEN]})["have"])
    send: list[_File] = []
    link: list[_File] = []
    first: set[str] = set()
    for f in p.files:
        if f.sha in have or f.sha in first:
            link.append(f)  # content the store holds, or a duplicate of a file sent first
        else:
            first.add(f.sha)
            send.append(f)
    size, linked = sum(f.size for f in send), sum(f.size for f in link)
    try:
        begin = client.call("upload_begin", {"size": size, "files": len(p.files), "linked": linked})
    except Exception as e:  # noqa: BLE001 - ServiceError, without importing zmq here
        raise _as_error(e) from None
    uid, chunk = begin["upload_id"], int(begin.get("chunk_bytes") or P.CHUNK_BYTES)
    try:
        for f in send:
            _send_file(client, uid, f, chunk, window, prog, cancel)
        for f in link:
            _check(cancel)
            _retrying(client, prog, lambda f=f: client.call(
                "upload_link", {"upload_id": uid, "path": f.rel, "sha256": f.sha}), uid, f.rel)
            prog.done_bytes += f.size
            prog.skipped_bytes += f.size
            prog.files_done += 1
        client.call("upload_end", {"upload_id": uid, "files": len(p.files), "size": size + linked})
    except BaseException:
        try:  # partial uploads do not stay on the backend's disk
            client.call("upload_abort", {"upload_id": uid}, retries=0)
        except Exception:  # noqa: BLE001 - the TTL removes it when the backend is gone
            pass
        raise
    return [{"upload": uid, **s} for s in p.sources]


def _as_error(e: BaseException) -> TransferError:
    return TransferError(getattr(e, "code", "internal"), getattr(e, "message", str(e)), getattr(e, "detail", ""))


def _retrying(client: Any, prog: Progress, fn: Any, uid: str, rel: str) -> Any:
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if getattr(e, "code", "") != "unreachable" or attempt == RETRIES:
                raise _as_error(e) from None
            prog.resumed += 1
    return None


def _send_file(client: Any, uid: str, f: _File, chunk: int, window: int, prog: Progress, cancel: Any) -> None:
    """Chunks of one file, ``window`` in flight; after `unreachable`, ask where the backend
    stands and go on from there."""
    offset = 0
    for attempt in range(RETRIES + 1):
        try:
            _send_from(client, uid, f, offset, chunk, window, prog, cancel)
            prog.files_done += 1
            return
        except TransferCancelled:
            raise
        except Exception as e:  # noqa: BLE001
            if getattr(e, "code", "") != "unreachable" or attempt == RETRIES:
                raise _as_error(e) from None
            prog.resumed += 1
            st = _retrying(client, prog, lambda: client.call("upload_status", {"upload_id": uid, "path": f.rel}),
                           uid, f.rel)
            if st.get("verified"):
                prog.files_done += 1
                return
            got = int(st.get("size") or 0)
            # the backend keeps every byte it wrote; what we counted past it goes again
            offset = got
            prog.done_bytes = prog.done_bytes - prog.partial + got
            prog.partial = got


def _send_from(client: Any, uid: str, f: _File, offset: int, chunk: int, window: int, prog: Any,
               cancel: Any) -> None:
    inflight: deque = deque()
    prog.partial = offset

    def settle(limit: int) -> None:
        while len(inflight) > limit:
            r = inflight[0]
            while not r.done:
                client.poll(0.05)
            inflight.popleft().raise_for_error()

    with open(f.full, "rb") as fh:
        fh.seek(offset)
        if f.size == 0:
            settle(0)
            client.call("upload", {"upload_id": uid, "path": f.rel, "offset": 0, "sha256": f.sha}, [b""])
            return
        while offset < f.size:
            _check(cancel)
            data = fh.read(chunk)
            if not data:
                raise TransferError("upload_error", f"{f.full} shrank while it was sent")
            last = offset + len(data) >= f.size
            if last:
                settle(0)  # the digest is checked against the whole file
            inflight.append(client.send("upload", {"upload_id": uid, "path": f.rel, "offset": offset,
                                                   "sha256": f.sha if last else None}, [data]))
            settle(window - 1)
            offset += len(data)
            prog.sent_bytes += len(data)
            prog.done_bytes += len(data)
            prog.partial = offset
        settle(0)


# --------------------------------------------------------------- download
def safe_dest(dest_dir: str, rel: str) -> str:
    """``dest_dir/rel``, refusing anything that would land outside ``dest_dir``."""
    err = P.REQUESTS["fetch"]["path"][2](rel)
    if err:
        raise TransferError("path_not_allowed", f"download path {rel!r} {err}")
    root = os.path.realpath(dest_dir)
    full = os.path.realpath(os.path.join(root, *rel.split("/")))
    if os.path.commonpath([full, root]) != root:
        raise TransferError("path_not_allowed", f"download path {rel!r} leaves {dest_dir}")
    return full


def select(files: Iterable[dict[str, Any]], prefixes: Sequence[str]) -> list[dict[str, Any]]:
    return [f for f in files if any(f["path"].startswith(p) for p in prefixes)]


def download(client: Any, job_id: str, files: Sequence[dict[str, Any]], dest_dir: str,
             progress: Optional[Progress] = None, cancel: Any = None, *, window: int = 4,
             max_chunks: Optional[int] = None) -> list[str]:
    """Fetch ``files`` (``result``'s entries: path, size) of job ``job_id`` into ``dest_dir``.
    ``max_chunks`` (tests): stop after that many chunks, as a lost connection would."""
    prog = progress or Progress()
    prog.what = prog.what or "download"
    prog.total_bytes += sum(int(f.get("size") or 0) for f in files)
    prog.files += len(files)
    budget = [max_chunks]
    out = []
    for f in files:
        _check(cancel)
        dest = safe_dest(dest_dir, f["path"])
        _fetch_retrying(client, job_id, f["path"], dest, window, prog, cancel, budget)
        prog.files_done += 1
        out.append(dest)
    return out


def fetch_file(client: Any, job_id: str, rel: str, dest: str, progress: Optional[Progress] = None,
               cancel: Any = None) -> str:
    """One file of a job's output to the path ``dest`` (resumable, checked)."""
    prog = progress or Progress(what="download")
    _fetch_retrying(client, job_id, rel, os.path.abspath(dest), 4, prog, cancel, [None])
    return dest


def _fetch_retrying(client: Any, job_id: str, rel: str, dest: str, window: int, prog: Progress,
                    cancel: Any, budget: list) -> None:
    """``_fetch``, resumed from its ``.part`` file up to ``RETRIES`` times after a lost
    connection (``unreachable``); any other failure is raised as a TransferError at once."""
    for attempt in range(RETRIES + 1):
        try:
            _fetch(client, job_id, rel, dest, window, prog, cancel, budget)
            return
        except (TransferCancelled, TransferError):
            raise
        except Exception as e:  # noqa: BLE001
            if getattr(e, "code", "") != "unreachable" or attempt == RETRIES:
                raise _as_error(e) from None
            prog.resumed += 1


class _Interrupted(TransferError):
    pass


def _fetch(client: Any, job_id: str, rel: str, dest: str, window: int, prog: Progress, cancel: Any,
           budget: list) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + ".part"
    if os.path.isfile(dest) and not os.path.isfile(part):
        # already here: one zero-length read at the end asks for the backend's digest
        size = os.path.getsize(dest)
        r = client.request("fetch", {"job_id": job_id, "path": rel, "offset": size, "length": 1})
        info = r.raise_for_error()
        if info.get("eof") and not r.reply_blobs[0] and info.get("sha256") == file_sha256(dest):
            prog.done_bytes += size
            prog.skipped_bytes += size
            return
    start = os.path.getsize(part) if os.path.isfile(part) else 0
    counted = start
    prog.done_bytes += start
    prog.skipped_bytes += start
    if start:
        prog.resumed += 1
    if True:  # on any error the .part file stays: the next download continues from its size
        with open(part, "r+b" if start else "wb") as out:
            inflight: deque = deque()
            nxt, size, sha = start, None, None
            offset = start
            while True:
                _check(cancel)
                while len(inflight) < window and (size is None and not inflight or
                                                  size is not None and nxt < size):
                    inflight.append(client.send("fetch", {"job_id": job_id, "path": rel, "offset": nxt}))
                    nxt += P.CHUNK_BYTES
                if not inflight:
                    break
                r = inflight.popleft()
                while not r.done:
                    client.poll(0.05)
                info = r.raise_for_error()
                if budget[0] is not None:
                    if budget[0] <= 0:
                        raise _Interrupted("interrupted", "the test's chunk budget ran out")
                    budget[0] -= 1
                data = r.reply_blobs[0]
                if r.body["offset"] != offset:
                    raise TransferError("internal", f"{rel}: chunk at {r.body['offset']}, expected {offset}")
                out.seek(offset)
                out.write(data)
                offset += len(data)
                size = int(info["size"])
                prog.sent_bytes += len(data)
                prog.done_bytes += len(data)
                counted += len(data)
                if info.get("eof"):
                    sha = info.get("sha256")
                    break
                if not data:
                    raise TransferError("internal", f"{rel}: empty chunk before the end")
    if sha and file_sha256(part) != sha:
        os.remove(part)
        prog.done_bytes -= counted
        raise TransferError("upload_error", f"{rel}: the downloaded file does not match the backend's "
                            "checksum (it changed meanwhile?)", "download it again")
    os.replace(part, dest)
