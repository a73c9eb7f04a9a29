"""The job lifecycle: queued jobs onto the executor, the worker's events into job records.

One code path for the service and for ``python -m backend batch``: both own a
``JobStore``, an executor (``executors/``) and a ``JobRunner``, and call ``tick()``
and ``on_event()`` from one thread. What changes a job's state lives here:

* ``tick``: launch queued jobs (submission order; requeued jobs keep their place at the
  head) while the executor has free slots; kill workers that ignore a cancel for
  ``cancel_grace_s``; save running jobs' progress every ``SAVE_INTERVAL_S``.
* ``on_event``: ``start`` (resumed_from), ``progress``, ``done``/``cancelled``/``error``
  (the final state, at once) and ``exit`` (the attempt is over: free the slot; without a
  final event it is a crash, a lost host, or the end of a cancel).
* ``recover``: at start, jobs that were running are re-attached (when the executor still
  runs them: Ray) or requeued to resume from their checkpoint.

``Notify`` is how the owner hears of changes: the service pushes them to watching
clients, the batch command redraws its table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from neural_atlas.core import protocol as P

from .executors.base import Executor, ExecutorError
from .store import JobStore

log = logging.getLogger("neural_atlas.service")

SAVE_INTERVAL_S = 2.0  # a running job's progress is written to job.json at most this often
CANCEL_GRACE_S = 20.0  # a worker still alive this long after cancel is killed
MAX_LOST = 2  # retries of a job whose host died under it (Ray worker or node lost)


class Notify(Protocol):
    def job(self, job: dict[str, Any]) -> None:
        """A state change (started, resumed, cancelling, done, failed, cancelled, requeued)."""

    def progress(self, job: dict[str, Any], urgent: bool) -> None:
        """Progress fields changed; ``urgent`` on a phase change."""


def tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class _Cancel:
    def __init__(self, reason: str, deadline: float) -> None:
        self.reason, self.deadline, self.killed = reason, deadline, False


class JobRunner:
    def __init__(self, store: JobStore, executor: Executor, notify: Notify, *,
                 cancel_grace_s: float = CANCEL_GRACE_S, max_lost: int = MAX_LOST,
                 on_end: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.store, self.executor, self.notify = store, executor, notify
        self.cancel_grace_s, self.max_lost = cancel_grace_s, max_lost
        self.on_end = on_end
        self.stopping = False
        self._cancels: dict[str, _Cancel] = {}
        self._final: set[str] = set()  # a final event arrived for the current attempt
        self._saved: dict[str, float] = {}

    # ------------------------------------------------------------- start
    def recover(self) -> None:
        """Load the store; re-attach or requeue what was running when the last owner died."""
        for job in self.store.load():
            state = job["state"]
            if state not in ("running", "cancelling"):
                continue
            jdir = self.store.job_dir(job["job_id"])
            try:
                alive = self.executor.reattach(job, jdir)
            except ExecutorError as e:
                log.warning("job %s: cannot re-attach (%s)", job["job_id"], e)
                alive = False
            if alive:
                job["message"] = "re-attached after a backend restart"
                self.store.save(job)
                log.info("job %s: re-attached (%s)", job["job_id"], self.executor.name)
                if state == "cancelling":
                    self._cancel(job["job_id"], "user")
            elif state == "running":
                job["state"], job["phase"] = "queued", "queued"
                job["message"] = "backend restarted; resuming from the last checkpoint"
                self.store.save(job)
                log.info("job %s: requeued after restart", job["job_id"])
            else:
                self._finish(job, "cancelled", message="cancelled (backend restarted)")
        self.executor.recovered()

    # ------------------------------------------------------------- timers
    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for jid, c in list(self._cancels.items()):
            if not c.killed and now > c.deadline:
                log.warning("job %s: worker did not stop in %.0f s; killing it", jid, self.cancel_grace_s)
                c.killed = True
                self.executor.kill(jid)
        while not self.stopping and self.executor.free_slots() > 0:
            nxt = next(self.store.queued(), None)
            if nxt is None:
                break
            self._launch(nxt)
        for jid in self.executor.running():
            job = self.store.jobs.get(jid)
            if job is not None and now - self._saved.get(jid, 0.0) >= SAVE_INTERVAL_S:
                self._saved[jid] = now
                self.store.save(job)

    def _launch(self, job: dict[str, Any]) -> None:
        jid = job["job_id"]
        job["state"], job["error"] = "running", None
        job["attempts"] = int(job.get("attempts") or 0) + 1
        job.setdefault("started_at", time.time())  # wall clock of the first launch (batch summary)
        self._final.discard(jid)
        try:
            placement = self.executor.launch(job, self.store.job_dir(jid))
        except ExecutorError as e:
            self._finish(job, "failed", error=P.error_dict("internal", f"cannot start the job: {e}"))
            return
        waiting = placement.pop("waiting", None)
        job["placement"] = placement
        if waiting:
            job["phase"], job["message"] = "queued", f"waiting for {waiting}"
        else:
            job["phase"] = job.get("phase") if job.get("phase") not in (None, "queued") else "load"
        job["seq"] = int(job.get("seq") or 0) + 1
        self.store.save(job)
        self.notify.job(job)
        log.info("job %s: launched on %s", jid, placement)

    # ------------------------------------------------------------- events
    def on_event(self, job_id: str, ev: dict[str, Any]) -> None:
        job = self.store.jobs.get(job_id)
        if job is None or job_id not in self.executor.running():
            return
        kind = ev.get("event")
        if kind == "start":
            ck = ev.get("checkpoint")
            if ck is not None:
                job["resumed_from"] = ck
            if isinstance(ev.get("placement"), dict):  # what the host learnt when it started (Ray)
                job["placement"] = {**(job.get("placement") or {}), **ev["placement"]}
            if job.get("phase") == "queued":
                job["phase"] = "load"
            job["message"] = f"resuming from iteration {ck}" if ck else "started"
            job["seq"] = int(job.get("seq") or 0) + 1
            self.store.save(job)
            self.notify.job(job)
        elif kind == "progress":
            self._progress(job, ev.get("progress") or {})
        elif kind == "done":
            self._final.add(job_id)
            job["result"] = ev.get("result")
            job["iteration"] = max(job.get("iteration") or 0, job.get("iterations") or 0)
            self._finish(job, "done", message=f"finished in {float(ev.get('seconds') or 0):.1f} s")
        elif kind == "cancelled":
            self._final.add(job_id)
            c = self._cancels.get(job_id)
            if c is not None and c.reason == "shutdown":
                self._requeue(job, "interrupted by a backend shutdown; resumes on restart")
            else:
                self._finish(job, "cancelled", message="cancelled")
        elif kind == "error":
            self._final.add(job_id)
            err = ev.get("error") or {}
            self._finish(job, "failed", error=P.error_dict(err.get("code", "internal"),
                                                         err.get("message", "failed"),
                                                         err.get("detail", "")))
        elif kind == "exit":
            self._exited(job, ev)

    def _progress(self, job: dict[str, Any], p: dict[str, Any]) -> None:
        if job["state"] not in ("running", "cancelling"):
            return
        new_phase = p.get("phase") != job.get("phase")
        keys = ["phase", "fraction", "eta_s", "message"]
        if p.get("iterations"):  # phases without iterations (load, flow, export) keep the count
            keys += ["iteration", "iterations"]
        for k in keys:
            if k in p:
                job[k] = p[k]
        if p.get("psnr") is not None:  # the last running PSNR stays when a phase has none
            job["psnr"] = p["psnr"]
        job["elapsed_s"] = p.get("elapsed_s")
        job["losses"] = p.get("losses") if isinstance(p.get("losses"), dict) else None
        job["seq"] = int(job.get("seq") or 0) + 1
        if new_phase:
            self.store.save(job)
            self._saved[job["job_id"]] = time.monotonic()
        self.notify.progress(job, new_phase)

    def _exited(self, job: dict[str, Any], ev: dict[str, Any]) -> None:
        jid = job["job_id"]
        self.executor.release(jid)
        c = self._cancels.pop(jid, None)
        self._saved.pop(jid, None)
        final = jid in self._final
        self._final.discard(jid)
        reason = c.reason if c is not None else None
        if not final:
            if reason == "shutdown":
                self._requeue(job, "interrupted by a backend shutdown; resumes on restart")
            elif reason == "user":
                self._finish(job, "cancelled", message="cancelled (worker stopped)")
            elif ev.get("lost"):
                lost = int(job.get("lost") or 0) + 1
                job["lost"] = lost
                why = ev.get("reason") or "the worker's host went away"
                if lost <= self.max_lost:
                    self._requeue(job, f"{why}; retrying from the last checkpoint "
                                       f"(retry {lost} of {self.max_lost})")
                else:
                    self._finish(job, "failed", error=P.error_dict(
                        "worker_crashed", f"{why} ({lost} times); giving up", ev.get("detail", "")))
            else:
                self._finish(job, "failed", error=P.error_dict(
                    "worker_crashed", f"the worker process exited with code {ev.get('code')}",
                    ev.get("detail") or tail(self.store.job_dir(jid) / "worker.log")))
        log.info("job %s: worker exited (%s)", jid, ev.get("code"))
        if self.on_end is not None:
            self.on_end(job)

    # ------------------------------------------------------------ requests
    def cancel(self, job: dict[str, Any]) -> str:
        if job["state"] == "queued":
            self._finish(job, "cancelled", message="cancelled before it started")
        elif job["state"] == "running" and job["job_id"] in self.executor.running():
            job["state"], job["message"] = "cancelling", "cancelling"
            job["seq"] = int(job.get("seq") or 0) + 1
            self.store.save(job)
            self.notify.job(job)
            self._cancel(job["job_id"], "user")
        return job["state"]

    def stop(self) -> None:
        """Stop launching; running jobs are cancelled with reason "shutdown" (requeued)."""
        self.stopping = True
        for jid in self.executor.running():
            self._cancel(jid, "shutdown")

    def idle(self) -> bool:
        return not self.executor.running()

    def running(self) -> list[str]:
        return self.executor.running()

    def _cancel(self, job_id: str, reason: str) -> None:
        if job_id in self._cancels:
            return  # a user's cancel stays a cancel when a shutdown follows
        self._cancels[job_id] = _Cancel(reason, time.monotonic() + self.cancel_grace_s)
        self.executor.cancel(job_id)

    # ------------------------------------------------------------- states
    def _requeue(self, job: dict[str, Any], message: str) -> None:
        job["state"], job["phase"], job["message"] = "queued", "queued", message
        job["seq"] = int(job.get("seq") or 0) + 1
        self.store.save(job)
        self.notify.job(job)

    def _finish(self, job: dict[str, Any], state: str, *, message: str = "",
                error: dict[str, str] | None = None) -> None:
        job["state"] = state
        job["ended_at"] = time.time()
        if state == "done":
            job["phase"], job["fraction"], job["eta_s"] = "done", 1.0, 0.0
        if message:
            job["message"] = message
        if error is not None:
            job["error"] = error
            job["message"] = error["message"]
        job["seq"] = int(job.get("seq") or 0) + 1
        self.store.save(job)
        self.notify.job(job)
