"""Files in and out of the service: uploads (a remote client's clip, masks or edits, in
checked chunks), sources (paths or uploads named by a request, checked and moved into
the job), and downloads (a finished job's file list and its files, in chunks).

Uploads live in ``WORKSPACE/uploads/<upload_id>/`` until a submit or render consumes
them (the folder moves into the job's ``input/``); they do not survive a restart and
expire after ``UPLOAD_TTL_S`` untouched.

Content-addressed: every verified upload file is also linked (hard link, else copied)
into ``WORKSPACE/blobs/<sha256>``, which survives restarts. ``upload_have`` tells a
client which digests are there, ``upload_link`` places one into a new upload without
sending it: a re-render after a few strokes sends only the edit images that changed.
Quotas: one upload (what one job gets) at most ``job_quota`` bytes, sent plus linked;
the blob store at most ``store_quota`` bytes (blobs no job uses go first). An untouched
blob no job uses expires after ``BLOB_TTL_S``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from neural_atlas.core import protocol as P
from neural_atlas.core.protocol import ProtocolError

from .security import AllowedRoots, within
from .store import JobStore

UPLOAD_TTL_S = 3600.0  # an upload untouched this long is removed
BLOB_TTL_S = 7 * 24 * 3600.0  # a blob no job uses, untouched this long, is removed
BLOB_SWEEP_S = 600.0
MAX_OPEN_UPLOADS = 16
MAX_RESULT_FILES = 2000

log = logging.getLogger("neural_atlas.service")


class Transfers:
    def __init__(self, workspace: Path, store: JobStore, roots: AllowedRoots, *,
                 job_quota: int = P.MAX_UPLOAD_BYTES, store_quota: int = 0) -> None:
        self.workspace, self.store, self.roots = workspace, store, roots
        self.job_quota = int(job_quota) if job_quota and job_quota > 0 else P.MAX_UPLOAD_BYTES
        self.store_quota = int(store_quota) if store_quota and store_quota > 0 else 0  # 0: the disk
        self.uploads: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, tuple[int, int, str]] = {}  # fetched file -> (size, mtime_ns, sha256)
        self._next_sweep = 0.0
        shutil.rmtree(workspace / "uploads", ignore_errors=True)  # uploads do not survive a restart
        (workspace / "uploads").mkdir(exist_ok=True)
        self.blobs = workspace / "blobs"
        self.blobs.mkdir(exist_ok=True)
        for tmp in self.blobs.glob(".*"):  # a link or copy interrupted by a crash
            tmp.unlink(missing_ok=True)

    def handlers(self) -> dict[str, Any]:
        return {"upload_begin": self.h_upload_begin, "upload": self.h_upload, "upload_end": self.h_upload_end,
                "upload_have": self.h_upload_have, "upload_link": self.h_upload_link,
                "upload_status": self.h_upload_status, "upload_abort": self.h_upload_abort,
                "probe": self.h_probe, "result": self.h_result, "fetch": self.h_fetch}

    def expire(self, now: float) -> None:
        for uid, up in list(self.uploads.items()):
            if now - up["last"] > UPLOAD_TTL_S:
                self._drop_upload(uid)
        if now >= self._next_sweep:
            self._next_sweep = now + BLOB_SWEEP_S
            self.sweep_blobs(max_age=BLOB_TTL_S)

    # ------------------------------------------------------------ blob store
    def _blob(self, sha: str) -> Path:
        return self.blobs / sha

    def _blob_entries(self) -> list[tuple[float, int, int, Path]]:
        out = []
        for p in self.blobs.iterdir():
            if p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((st.st_mtime, st.st_size, st.st_nlink, p))
        return out

    def blob_bytes(self) -> int:
        return sum(e[1] for e in self._blob_entries())

    def sweep_blobs(self, *, max_age: float | None = None, need: int = 0) -> int:
        """Remove blobs no job or upload uses (one link): those older than ``max_age``, and
        oldest first until ``need`` more bytes fit the store quota. Returns bytes freed."""
        entries = sorted(self._blob_entries())
        freed, now = 0, time.time()
        total = sum(e[1] for e in entries)
        for mtime, size, nlink, p in entries:
            old = max_age is not None and now - mtime > max_age
            over = bool(self.store_quota) and need > 0 and total - freed + need > self.store_quota
            if nlink <= 1 and (old or over):
                p.unlink(missing_ok=True)
                freed += size
        return freed

    def _to_store(self, path: Path, sha: str) -> bool:
        """Keep a verified upload file in the blob store (hard link; a copy where links fail).
        True when ``path`` is now the blob's own inode (a later write must copy it first)."""
        blob = self._blob(sha)
        if blob.exists():
            return False
        tmp = self.blobs / f".{sha}.{secrets.token_hex(4)}"
        try:
            try:
                os.link(path, tmp)
                linked = True
            except OSError:
                shutil.copyfile(path, tmp)
                linked = False
            os.replace(tmp, blob)
            return linked
        except OSError as e:
            tmp.unlink(missing_ok=True)  # the upload itself is fine; only the dedupe is lost
            log.warning("blob store: cannot keep %s: %s", sha, e)
            return False

    def h_upload_have(self, ident: bytes, msg: P.Message):
        have = [h for h in msg.body["hashes"] if self._blob(h).is_file()]
        return {"have": have, "job_quota": self.job_quota, "store_quota": self.store_quota}, ()

    def h_probe(self, ident: bytes, msg: P.Message):
        """Whether this backend reads the client's file at that path with that content (a
        shared filesystem). Paths outside the allowed roots read as not shared."""
        b = msg.body
        try:
            real = self.roots.resolve(b["path"], what="probe")
            with open(real, "rb") as f:
                data = f.read(P.MAX_PROBE_BYTES + 1)
        except (ProtocolError, OSError):
            return {"readable": False, "why": "cannot read the path"}, ()
        if len(data) > P.MAX_PROBE_BYTES:
            return {"readable": False, "why": "not a probe file"}, ()
        same = hashlib.sha256(data).hexdigest() == b["sha256"]
        return {"readable": same, "why": "" if same else "another file at that path"}, ()

    # ---------------------------------------------------------------- sources
    def resolve(self, sources: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        """Check every source now; returns {name: real path | (upload_id, rel)} and upload ids used."""
        out: dict[str, Any] = {}
        used: set[str] = set()
        for name, src in sources.items():
            if isinstance(src, str):
                out[name] = self.roots.resolve(src, what=name)
            else:
                uid, rel = src["upload"], src.get("path") or ""
                up = self.uploads.get(uid)
                if up is None:
                    raise ProtocolError("not_found", f"{name}: no upload {uid!r}",
                                        "uploads are consumed by one submit and do not survive a restart")
                if not up["complete"]:
                    raise ProtocolError("upload_error", f"{name}: upload {uid} is not finished (upload_end)")
                target = up["dir"] / rel if rel else up["dir"]
                if not target.exists() or not within(target, up["dir"]):
                    raise ProtocolError("not_found", f"{name}: {rel!r} is not in upload {uid}")
                out[name] = (uid, rel)
                used.add(uid)
        return out, used

    def materialize(self, job: dict[str, Any], resolved: dict[str, Any], used: set[str]) -> dict[str, str]:
        """Move the uploads a new job uses into its ``input/``; every source as a path."""
        inp = self.store.job_dir(job["job_id"]) / "input"
        for uid in used:
            inp.mkdir(exist_ok=True)
            os.replace(self.uploads[uid]["dir"], inp / uid)
            self.uploads.pop(uid)
        paths = {}
        for name, v in resolved.items():
            if isinstance(v, tuple):
                uid, rel = v
                paths[name] = str(inp / uid / rel) if rel else str(inp / uid)
            else:
                paths[name] = v
        return paths

    # -------------------------------------------------------------- downloads
    def _job(self, job_id: str) -> dict[str, Any]:
        job = self.store.jobs.get(job_id)
        if job is None:
            raise ProtocolError("not_found", f"no job {job_id!r}", "list shows the jobs this backend has")
        return job

    def h_result(self, ident: bytes, msg: P.Message):
        job = self._job(msg.body["job_id"])
        if job["state"] != "done":
            raise ProtocolError("bad_state", f"job {job['job_id']} is {job['state']}, not done",
                                json.dumps(job.get("error") or {}))
        out = self.store.out_dir(job["job_id"])
        files, truncated = [], False
        for full, rel in P.iter_files(str(out)) if out.is_dir() else ():
            if len(files) >= MAX_RESULT_FILES:
                truncated = True
                break
            files.append({"path": rel, "size": os.path.getsize(full)})
        report = None
        rp = out / "report.json"
        if rp.is_file() and rp.stat().st_size < 64 * 1024:
            try:
                report = json.loads(rp.read_text(encoding="utf-8"), parse_constant=lambda c: None)
            except ValueError:
                report = None
        atlases = sorted(f["path"] for f in files if f["path"].startswith("atlas/"))
        return {"job_id": job["job_id"], "kind": job["kind"], "state": job["state"],
                "out_dir": str(out), "files": files, "truncated": truncated, "atlases": atlases,
                "report": report, "outputs": job.get("result") or {}}, ()

    def h_fetch(self, ident: bytes, msg: P.Message):
        b = msg.body
        job = self._job(b["job_id"])
        out = self.store.out_dir(job["job_id"])
        path = out / b["path"]
        if not path.is_file() or not within(path, out):
            raise ProtocolError("not_found", f"no file {b['path']!r} in the output of job {job['job_id']}")
        offset, length = b.get("offset") or 0, min(b.get("length") or P.CHUNK_BYTES, P.MAX_BLOB_BYTES)
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        eof = offset + len(data) >= size
        reply = {"path": b["path"], "size": size, "offset": offset, "length": len(data), "eof": eof}
        if eof:  # the whole file's digest: the client checks what it assembled (resumed or not)
            reply["sha256"] = self._digest(path)
        return reply, (data,)

    def _digest(self, path: Path) -> str:
        st = path.stat()
        key = str(path)
        hit = self._digests.get(key)
        if hit and hit[:2] == (st.st_size, st.st_mtime_ns):
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if len(self._digests) > 50_000:
            self._digests.clear()
        self._digests[key] = (st.st_size, st.st_mtime_ns, h.hexdigest())
        return h.hexdigest()

    # ---------------------------------------------------------------- uploads
    def h_upload_begin(self, ident: bytes, msg: P.Message):
        size, linked = msg.body["size"], msg.body.get("linked") or 0
        if size > P.MAX_UPLOAD_BYTES:
            raise ProtocolError("too_large", f"an upload is limited to {P.MAX_UPLOAD_BYTES} bytes")
        if size + linked > self.job_quota:
            raise ProtocolError("quota_exceeded",
                                f"this job's files are {size + linked} bytes; the backend allows "
                                f"{self.job_quota} bytes per job",
                                "send fewer frames (a frame range) or a smaller clip, or start the backend "
                                "with a larger --job-quota")
        if self.store_quota:
            used = self.blob_bytes()
            if used + size > self.store_quota:
                used -= self.sweep_blobs(need=size)
            if used + size > self.store_quota:
                raise ProtocolError("quota_exceeded",
                                    f"the backend's upload store holds {used} of {self.store_quota} bytes "
                                    f"and files no job needs are gone; {size} more do not fit",
                                    "delete finished jobs you no longer need, or start the backend with a "
                                    "larger --store-quota")
        if (msg.body.get("files") or 0) > P.MAX_UPLOAD_FILES:
            raise ProtocolError("too_large", f"an upload is limited to {P.MAX_UPLOAD_FILES} files")
        free = shutil.disk_usage(self.workspace).free
        if size > free - 512 * 1024 * 1024:
            raise ProtocolError("too_large", f"not enough disk space on the backend for {size} bytes",
                                f"{free} bytes free in {self.workspace}")
        if len(self.uploads) >= MAX_OPEN_UPLOADS:
            raise ProtocolError("too_large", f"at most {MAX_OPEN_UPLOADS} uploads at once")
        uid = secrets.token_hex(8)
        d = self.workspace / "uploads" / uid
        d.mkdir(parents=True)
        self.uploads[uid] = {"dir": d, "limit": size, "linked_limit": linked, "received": 0, "linked": 0,
                             "files": {}, "complete": False, "last": time.monotonic()}
        return {"upload_id": uid, "chunk_bytes": P.CHUNK_BYTES, "max_blob_bytes": P.MAX_BLOB_BYTES}, ()

    def _upload(self, uid: str) -> dict[str, Any]:
        up = self.uploads.get(uid)
        if up is None:
            raise ProtocolError("not_found", f"no upload {uid!r}", "it expired, was used, or the backend restarted")
        up["last"] = time.monotonic()
        return up

    def h_upload(self, ident: bytes, msg: P.Message):
        b = msg.body
        up = self._upload(b["upload_id"])
        if up["complete"]:
            raise ProtocolError("upload_error", "the upload is already finished")
        rel, offset, data = b["path"], b["offset"], msg.blobs[0]
        f = up["files"].get(rel)
        if f is None:
            if len(up["files"]) >= P.MAX_UPLOAD_FILES:
                raise ProtocolError("too_large", "too many files in one upload")
            f = up["files"][rel] = {"size": 0, "sha": hashlib.sha256(), "hash_ok": True, "verified": False}
        if offset > f["size"]:
            raise ProtocolError("bad_request", f"offset {offset} is past the end ({f['size']}) of {rel}")
        new_size = max(f["size"], offset + len(data))
        grow = new_size - f["size"]
        if up["received"] + grow > up["limit"]:
            raise ProtocolError("too_large", f"the upload exceeds its declared size {up['limit']}")
        path = up["dir"] / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not within(path.parent, up["dir"]):
                raise ProtocolError("path_not_allowed", f"{rel} leaves the upload folder")
            if f.get("stored"):  # a link into the blob store: write to a private copy, never the blob
                tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
                shutil.copyfile(path, tmp)
                os.replace(tmp, path)
                f["stored"] = False
            with open(path, "r+b" if path.exists() else "wb") as fh:
                fh.seek(offset)
                fh.write(data)
        except OSError as e:
            raise ProtocolError("upload_error", f"cannot write {rel}: {e.strerror or e}") from None
        if offset == f["size"] and f["hash_ok"]:
            f["sha"].update(data)  # in-order chunks: hash on the fly, no re-read at the end
        else:
            f["hash_ok"] = False  # a resent chunk: re-hash the file when it is verified
        f["size"] = new_size
        up["received"] += grow
        f["verified"] = False
        if b.get("sha256"):
            if not f["hash_ok"]:
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                f["sha"], f["hash_ok"] = h, True
            if f["sha"].hexdigest() != b["sha256"]:
                raise ProtocolError("upload_error", f"checksum mismatch for {rel}",
                                    "send the file again from offset 0")
            f["verified"] = True
            f["stored"] = self._to_store(path, b["sha256"])
        return {"upload_id": b["upload_id"], "path": rel, "size": new_size, "verified": f["verified"]}, ()

    def h_upload_end(self, ident: bytes, msg: P.Message):
        b = msg.body
        up = self._upload(b["upload_id"])
        unverified = sorted(rel for rel, f in up["files"].items() if not f["verified"])
        if unverified:
            raise ProtocolError("upload_error", f"{len(unverified)} file(s) were not finished with a sha256",
                                ", ".join(unverified[:5]))
        if b["files"] != len(up["files"]) or b["size"] != up["received"] + up["linked"]:
            raise ProtocolError("upload_error", "the upload is incomplete",
                                f"received {len(up['files'])} files, {up['received'] + up['linked']} bytes; "
                                f"declared {b['files']} files, {b['size']} bytes")
        up["complete"] = True
        return {"upload_id": b["upload_id"], "files": len(up["files"]), "size": up["received"] + up["linked"],
                "sent": up["received"], "linked": up["linked"]}, ()

    def h_upload_link(self, ident: bytes, msg: P.Message):
        b = msg.body
        up = self._upload(b["upload_id"])
        if up["complete"]:
            raise ProtocolError("upload_error", "the upload is already finished")
        rel, sha = b["path"], b["sha256"]
        blob = self._blob(sha)
        if not blob.is_file():
            raise ProtocolError("not_found", f"the backend no longer holds {sha[:12]}... for {rel}",
                                "send the file itself (upload)")
        if rel in up["files"]:
            raise ProtocolError("upload_error", f"{rel} is already in the upload")
        if len(up["files"]) >= P.MAX_UPLOAD_FILES:
            raise ProtocolError("too_large", "too many files in one upload")
        size = blob.stat().st_size
        if up["linked"] + size > up["linked_limit"]:
            raise ProtocolError("too_large", f"the upload's linked files exceed their declared size "
                                f"{up['linked_limit']}")
        path = up["dir"] / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not within(path.parent, up["dir"]):
                raise ProtocolError("path_not_allowed", f"{rel} leaves the upload folder")
            try:
                os.link(blob, path)
            except OSError:
                shutil.copyfile(blob, path)
            os.utime(blob)  # recently used: the last to be swept
        except OSError as e:
            raise ProtocolError("upload_error", f"cannot place {rel}: {e.strerror or e}") from None
        up["files"][rel] = {"size": size, "sha": hashlib.sha256(), "hash_ok": False, "verified": True,
                            "stored": True}
        up["linked"] += size
        return {"upload_id": b["upload_id"], "path": rel, "size": size, "verified": True}, ()

    def h_upload_status(self, ident: bytes, msg: P.Message):
        b = msg.body
        up = self._upload(b["upload_id"])
        f = up["files"].get(b.get("path") or "")
        return {"upload_id": b["upload_id"], "received": up["received"], "linked": up["linked"],
                "files": len(up["files"]), "complete": up["complete"],
                "size": f["size"] if f else None, "verified": bool(f and f["verified"])}, ()

    def h_upload_abort(self, ident: bytes, msg: P.Message):
        uid = msg.body["upload_id"]
        known = uid in self.uploads
        self._drop_upload(uid)
        return {"upload_id": uid, "aborted": known}, ()

    def _drop_upload(self, uid: str) -> None:
        up = self.uploads.pop(uid, None)
        if up is not None:
            shutil.rmtree(up["dir"], ignore_errors=True)
