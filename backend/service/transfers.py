"""Files in and out of the service: uploads (a remote client's clip, masks or edits, in
checked chunks), sources (paths or uploads named by a request, checked and moved into
the job), and downloads (a finished job's file list and its files, in chunks).

Uploads live in ``WORKSPACE/uploads/<upload_id>/`` until a submit or render consumes
them (the folder moves into the job's ``input/``); they do not survive a restart and
expire after ``UPLOAD_TTL_S`` untouched.
"""

from __future__ import annotations

import hashlib
import json
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
MAX_OPEN_UPLOADS = 16
MAX_RESULT_FILES = 2000


class Transfers:
    def __init__(self, workspace: Path, store: JobStore, roots: AllowedRoots) -> None:
        self.workspace, self.store, self.roots = workspace, store, roots
        self.uploads: dict[str, dict[str, Any]] = {}
        shutil.rmtree(workspace / "uploads", ignore_errors=True)  # uploads do not survive a restart
        (workspace / "uploads").mkdir(exist_ok=True)

    def handlers(self) -> dict[str, Any]:
        return {"upload_begin": self.h_upload_begin, "upload": self.h_upload, "upload_end": self.h_upload_end,
                "result": self.h_result, "fetch": self.h_fetch}

    def expire(self, now: float) -> None:
        for uid, up in list(self.uploads.items()):
            if now - up["last"] > UPLOAD_TTL_S:
                self._drop_upload(uid)

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
        return {"path": b["path"], "size": size, "offset": offset, "length": len(data),
                "eof": offset + len(data) >= size}, (data,)

    # ---------------------------------------------------------------- uploads
    def h_upload_begin(self, ident: bytes, msg: P.Message):
        size = msg.body["size"]
        if size > P.MAX_UPLOAD_BYTES:
            raise ProtocolError("too_large", f"an upload is limited to {P.MAX_UPLOAD_BYTES} bytes")
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
        self.uploads[uid] = {"dir": d, "limit": size, "received": 0, "files": {}, "complete": False,
                             "last": time.monotonic()}
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
        return {"upload_id": b["upload_id"], "path": rel, "size": new_size, "verified": f["verified"]}, ()

    def h_upload_end(self, ident: bytes, msg: P.Message):
        b = msg.body
        up = self._upload(b["upload_id"])
        unverified = sorted(rel for rel, f in up["files"].items() if not f["verified"])
        if unverified:
            raise ProtocolError("upload_error", f"{len(unverified)} file(s) were not finished with a sha256",
                                ", ".join(unverified[:5]))
        if b["files"] != len(up["files"]) or b["size"] != up["received"]:
            raise ProtocolError("upload_error", "the upload is incomplete",
                                f"received {len(up['files'])} files, {up['received']} bytes; "
                                f"declared {b['files']} files, {b['size']} bytes")
        up["complete"] = True
        return {"upload_id": b["upload_id"], "files": len(up["files"]), "size": up["received"]}, ()

    def _drop_upload(self, uid: str) -> None:
        up = self.uploads.pop(uid, None)
        if up is not None:
            shutil.rmtree(up["dir"], ignore_errors=True)
