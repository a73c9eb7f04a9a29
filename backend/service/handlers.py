"""The request handlers for jobs: hello/ping, the job-creating requests (one per kind in
``kinds.py``: submit, render, ...), status, watch, list, cancel, delete, shutdown.

Each handler takes ``(ident, msg)`` (the body already checked against the protocol's
schema) and returns ``(reply body, blobs)`` or raises ``ProtocolError``. Files in and
out are in ``transfers.py``; state changes go through the ``JobRunner``.
"""

from __future__ import annotations

import functools
import os
import time
from typing import TYPE_CHECKING, Any

import backend
from neural_atlas.core import protocol as P
from neural_atlas.core.protocol import ProtocolError

from .kinds import KINDS, JobKind
from .store import JobStore

if TYPE_CHECKING:
    from .server import Server

MAX_LIST = 200


class JobHandlers:
    def __init__(self, server: "Server") -> None:
        self.srv = server

    def handlers(self) -> dict[str, Any]:
        table = {k: getattr(self, "h_" + k) for k in
                 ("hello", "ping", "status", "watch", "list", "cancel", "delete", "shutdown")}
        for kind in KINDS.values():
            table[kind.request] = functools.partial(self.create, kind)
        return table

    def _job(self, job_id: str) -> dict[str, Any]:
        job = self.srv.store.jobs.get(job_id)
        if job is None:
            raise ProtocolError("not_found", f"no job {job_id!r}", "list shows the jobs this backend has")
        return job

    # ------------------------------------------------------------- session
    def h_hello(self, ident: bytes, msg: P.Message):
        s = self.srv
        running = s.runner.running()
        return {
            "protocol": P.PROTOCOL_VERSION, "protocol_min": P.PROTOCOL_MIN,
            "backend_version": backend.__version__, "session": s.session, "pid": os.getpid(),
            "started": s.started, "server_time": time.time(), "device": s.device_info(),
            "workspace": str(s.workspace), "allowed_roots": list(s.roots.roots),
            "curve": s.curve, "limits": dict(P.LIMITS), "counters": dict(s.counters),
            "running": running[0] if running else None, "running_jobs": running,
            "queued": sum(1 for _ in s.store.queued()), "executor": s.executor.describe(),
        }, ()

    def h_ping(self, ident: bytes, msg: P.Message):
        return {"session": self.srv.session, "server_time": time.time()}, ()

    # ---------------------------------------------------------- create jobs
    def create(self, kind: JobKind, ident: bytes, msg: P.Message):
        """submit, render, ...: check everything, then create the job (idempotent by token)."""
        s, b = self.srv, msg.body
        old = s.store.by_token(b.get("token"))
        if old is not None:
            if b.get("watch", True):
                s.pushes.watch(ident, [old["job_id"]])
            return {"job_id": old["job_id"], "state": old["state"], "existing": True}, ()
        parent = None
        if kind.parent:
            parent = self._job(b["job_id"])
            if parent["kind"] != kind.parent or parent["state"] != "done":
                raise ProtocolError("bad_state", f"job {parent['job_id']} is a {parent['kind']} job in state "
                                    f"{parent['state']}; {kind.request} needs a finished {kind.parent} job")
        spec = kind.settings(b)
        resolved, used = s.transfers.resolve(kind.sources(b))
        if parent is not None:
            spec["parent_out"] = str(s.store.out_dir(parent["job_id"]))
        job = s.store.create(kind.name, spec, token=b.get("token"),
                             parent=parent["job_id"] if parent else None,
                             name=b.get("name") or kind.default_name(b, parent))
        paths = s.transfers.materialize(job, resolved, used)
        kind.place(spec, b, paths)
        s.store.save(job)
        if b.get("watch", True):
            s.pushes.watch(ident, [job["job_id"]])
        s.log.info("job %s: queued (%s)", job["job_id"], kind.name)
        return {"job_id": job["job_id"], "state": job["state"], "existing": False}, ()

    # -------------------------------------------------------------- queries
    def h_status(self, ident: bytes, msg: P.Message):
        job = self._job(msg.body["job_id"])
        if msg.body.get("watch"):
            self.srv.pushes.watch(ident, [job["job_id"]])
        return {"job": P.job_summary(job)}, ()

    def h_watch(self, ident: bytes, msg: P.Message):
        jobs = self.srv.store.jobs
        ids = msg.body["job_ids"]
        known = [j for j in ids if j in jobs]
        self.srv.pushes.watch(ident, known, all_jobs=bool(msg.body.get("all")))
        return {"watching": known, "unknown": [j for j in ids if j not in jobs],
                "jobs": [P.job_summary(jobs[j]) for j in known]}, ()

    def h_list(self, ident: bytes, msg: P.Message):
        states = msg.body.get("states")
        jobs = sorted((j for j in self.srv.store.jobs.values() if not states or j["state"] in states),
                      key=lambda j: j["order"])
        off = msg.body.get("offset") or 0
        lim = min(msg.body.get("limit") or MAX_LIST, MAX_LIST)
        return {"jobs": [P.job_summary(j) for j in jobs[off:off + lim]], "total": len(jobs)}, ()

    # ------------------------------------------------------------- changes
    def h_cancel(self, ident: bytes, msg: P.Message):
        job = self._job(msg.body["job_id"])
        return {"job_id": job["job_id"], "state": self.srv.runner.cancel(job)}, ()

    def h_delete(self, ident: bytes, msg: P.Message):
        s = self.srv
        job = self._job(msg.body["job_id"])
        if job["state"] in ("running", "cancelling"):
            raise ProtocolError("bad_state", f"job {job['job_id']} is {job['state']}; cancel it first")
        users = [j["job_id"] for j in s.store.jobs.values()
                 if j.get("parent") == job["job_id"] and not JobStore.is_terminal(j)]
        if users:
            raise ProtocolError("bad_state", f"job(s) {', '.join(users)} still use this job")
        s.store.delete(job["job_id"])
        s.pushes.forget(job["job_id"])
        return {"job_id": job["job_id"], "deleted": True}, ()

    def h_shutdown(self, ident: bytes, msg: P.Message):
        self.srv.request_stop("shutdown requested by a client")
        running = self.srv.runner.running()
        return {"stopping": True, "running": running[0] if running else None}, ()
