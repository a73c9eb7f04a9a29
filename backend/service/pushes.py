"""Who watches which job, and the pushes they get: ``job`` (every state change, at once),
``progress`` (at most ``PUSH_MIN_INTERVAL_S`` apart per job, phase changes at once) and
``heartbeat``. A client that sent nothing for ``WATCH_TTL_S`` stops getting pushes."""

from __future__ import annotations

import time
from typing import Any, Callable

from neural_atlas.core import protocol as P

WATCH_TTL_S = 30.0
PUSH_MIN_INTERVAL_S = 0.1
PROGRESS_FIELDS = ("job_id", "state", "phase", "iteration", "iterations", "fraction", "eta_s", "psnr",
                   "message", "elapsed_s", "seq")


class Pushes:
    def __init__(self, send: Callable[[bytes, dict], None], session: str) -> None:
        self._send, self.session = send, session
        self.watchers: dict[bytes, dict[str, Any]] = {}
        self._throttle: dict[str, dict[str, float]] = {}  # job id -> last push time and seq
        self._jobs: dict[str, dict[str, Any]] = {}  # jobs with unpushed progress

    # ------------------------------------------------------------ watchers
    def watch(self, ident: bytes, job_ids=(), all_jobs: bool = False) -> None:
        w = self.watchers.setdefault(ident, {"last": time.monotonic(), "jobs": set(), "all": False})
        w["jobs"].update(job_ids)
        w["all"] = w["all"] or all_jobs
        w["last"] = time.monotonic()

    def seen(self, ident: bytes) -> None:
        w = self.watchers.get(ident)
        if w is not None:
            w["last"] = time.monotonic()

    def _watching(self, job_id: str) -> list[bytes]:
        return [i for i, w in self.watchers.items() if w["all"] or job_id in w["jobs"]]

    def forget(self, job_id: str) -> None:
        self._throttle.pop(job_id, None)
        self._jobs.pop(job_id, None)

    # ---------------------------------------------------- Notify (lifecycle)
    def job(self, job: dict[str, Any]) -> None:
        info = P.job_summary(job)
        for ident in self._watching(job["job_id"]):
            self._send(ident, P.make_header("job", info, session=self.session))
        if job["state"] in P.TERMINAL_STATES:
            self.forget(job["job_id"])

    def progress(self, job: dict[str, Any], urgent: bool) -> None:
        self._jobs[job["job_id"]] = job
        if urgent:
            self._push_progress(job)

    def _push_progress(self, job: dict[str, Any]) -> None:
        st = self._throttle.setdefault(job["job_id"], {"push": 0.0, "seq": 0})
        st["push"], st["seq"] = time.monotonic(), job["seq"]
        body = {k: job.get(k) for k in PROGRESS_FIELDS}
        for ident in self._watching(job["job_id"]):
            self._send(ident, P.make_header("progress", body, session=self.session))

    # --------------------------------------------------------------- timers
    def flush(self, now: float) -> None:
        for jid, job in list(self._jobs.items()):
            st = self._throttle.get(jid, {"push": 0.0, "seq": 0})
            if job["seq"] > st["seq"] and now - st["push"] >= PUSH_MIN_INTERVAL_S:
                self._push_progress(job)
            if job["seq"] <= self._throttle.get(jid, st)["seq"]:
                self._jobs.pop(jid, None)

    def heartbeat(self, now: float, running: list[str], queued: int) -> None:
        for ident, w in list(self.watchers.items()):
            if now - w["last"] > WATCH_TTL_S:
                del self.watchers[ident]
        if not self.watchers:
            return
        body = {"session": self.session, "time": time.time(), "running": running[0] if running else None,
                "running_jobs": running, "queued": queued}
        for ident in self.watchers:
            self._send(ident, P.make_header("heartbeat", body, session=self.session))
