"""Durable job records: one folder per job, state written atomically.

    workspace/
      server.json            endpoint, pid and session of the running server (atomic)
      server.lock            held (flock) by the one server serving this workspace
      uploads/<upload_id>/   files being uploaded by a remote client
      jobs/<job_id>/
        job.json             the job record (write-then-rename, fsync'd)
        input/               uploaded clip, masks or edits, moved here at submit
        out/                 the engine's output folder (checkpoints/, atlas/, ...)
        worker.log           the worker process's stderr
        .lock                held by the worker process while it runs the job
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from neural_atlas.core.protocol import TERMINAL_STATES

log = logging.getLogger("neural_atlas.service")

JOB_FILE = "job.json"


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = json.dumps(data, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if os.name == "posix":
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class FileLock:
    """An exclusive advisory lock on a file, released by the OS when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if os.name == "nt":
                    import msvcrt
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _finite(v: Any) -> Any:
    """JSON without NaN/inf: replace non-finite floats by None."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


class JobStore:
    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.root = workspace / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, dict[str, Any]] = {}
        self._tokens: dict[str, str] = {}
        self._order = 0

    # ----------------------------------------------------------------- paths
    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def out_dir(self, job_id: str) -> Path:
        """The engine's output folder: ``jobs/<id>/out``, or the spec's ``out_dir`` (batch
        shots write where the shot list says)."""
        job = self.jobs.get(job_id)
        out = (job.get("spec") or {}).get("out_dir") if job else None
        return Path(out) if out else self.root / job_id / "out"

    # ------------------------------------------------------------------ load
    def load(self) -> list[dict[str, Any]]:
        """Read every job record. Unreadable records are renamed aside and logged."""
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".deleted-"):  # a delete interrupted by a crash
                shutil.rmtree(d, ignore_errors=True)
                continue
            f = d / JOB_FILE
            if not d.is_dir() or not f.is_file():
                continue
            try:
                job = json.loads(f.read_text(encoding="utf-8"))
                if not isinstance(job, dict) or job.get("job_id") != d.name:
                    raise ValueError("record does not match its folder")
            except (OSError, ValueError) as e:
                log.error("job %s: unreadable record (%s); moved to job.json.corrupt", d.name, e)
                try:
                    os.replace(f, d / (JOB_FILE + ".corrupt"))
                except OSError:
                    pass
                continue
            self.jobs[job["job_id"]] = job
            if job.get("token"):
                self._tokens[job["token"]] = job["job_id"]
            self._order = max(self._order, int(job.get("order", 0)))
        return list(self.jobs.values())

    # ---------------------------------------------------------------- create
    def create(self, kind: str, spec: dict[str, Any], *, token: str | None, name: str,
               parent: str | None = None) -> dict[str, Any]:
        job_id = new_job_id()
        while job_id in self.jobs or self.job_dir(job_id).exists():
            job_id = new_job_id()
        self._order += 1
        now = time.time()
        job = {
            "job_id": job_id, "kind": kind, "state": "queued", "name": name, "parent": parent,
            "token": token, "created": now, "updated": now, "order": self._order,
            "phase": "queued", "iteration": 0, "iterations": 0, "fraction": 0.0, "eta_s": None,
            "psnr": None, "message": "", "error": None, "attempts": 0, "resumed_from": None,
            "seq": 0, "spec": spec, "result": None, "placement": None,
        }
        self.job_dir(job_id).mkdir(parents=True)
        self.jobs[job_id] = job
        if token:
            self._tokens[token] = job_id
        self.save(job)
        return job

    def by_token(self, token: str | None) -> dict[str, Any] | None:
        jid = self._tokens.get(token) if token else None
        return self.jobs.get(jid) if jid else None

    # ------------------------------------------------------------------ save
    def save(self, job: dict[str, Any]) -> None:
        job["updated"] = time.time()
        atomic_write_json(self.job_dir(job["job_id"]) / JOB_FILE, _finite(job))

    def delete(self, job_id: str) -> None:
        job = self.jobs.pop(job_id)
        if job.get("token"):
            self._tokens.pop(job["token"], None)
        d = self.job_dir(job_id)
        # rename first so a crash mid-delete never leaves a half-deleted job that loads
        trash = self.root / f".deleted-{job_id}-{secrets.token_hex(2)}"
        os.replace(d, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def queued(self) -> Iterator[dict[str, Any]]:
        return iter(sorted((j for j in self.jobs.values() if j["state"] == "queued"),
                           key=lambda j: j["order"]))

    @staticmethod
    def is_terminal(job: dict[str, Any]) -> bool:
        return job["state"] in TERMINAL_STATES
