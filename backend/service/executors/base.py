"""The executor seam: what starts, watches, cancels and re-attaches the process that runs a job.

The job store (``store.py``) and the lifecycle (``lifecycle.py``) are the same whatever
runs the job; an executor only turns "run this job folder" into a worker process
somewhere (a child process here, a Ray actor on some node) and hands that worker's
event stream back. Events are the worker's JSON lines (``start``, ``progress``,
``done``, ``cancelled``, ``error``; see ``worker.py``) plus one the executor adds when
an attempt is over::

    {"event": "exit", "code": int | None, "lost": bool, "reason": str}

``lost`` means the infrastructure went away under the job (a Ray worker or node died):
the lifecycle retries the job from its last checkpoint. A worker that exits without a
final event on a live host (segfault, OOM kill) is a crash: the job fails.

Events arrive from reader threads through a :class:`Mailbox`, whose file descriptor the
service's poll loop (or the batch loop) waits on next to its sockets.
"""

from __future__ import annotations

import os
import queue
import socket
from pathlib import Path
from typing import Any


class ExecutorError(Exception):
    """An executor cannot start (unreachable cluster, workspace not shared) or run a job."""


class Mailbox:
    """A thread-safe queue of ``(job_id, event)`` with a wake-up file descriptor."""

    def __init__(self) -> None:
        self._q: "queue.SimpleQueue[tuple[str, dict[str, Any]]]" = queue.SimpleQueue()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def put(self, job_id: str, event: dict[str, Any]) -> None:
        self._q.put((job_id, event))
        try:
            self._w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the reader is already awake (buffer full) or closing

    def fileno(self) -> int:
        return self._r.fileno()

    def drain(self, limit: int = 4096) -> list[tuple[str, dict[str, Any]]]:
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        out = []
        while len(out) < limit:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                break
        return out

    def wait(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        """Block up to ``timeout`` s for events (loops without a poller: batch)."""
        import select
        select.select([self._r], [], [], max(0.0, timeout))
        return self.drain()

    def close(self) -> None:
        self._r.close()
        self._w.close()


class Executor:
    """One way of running jobs. Every method is called from the service's main thread."""

    name = "executor"

    def start(self, mailbox: Mailbox, workspace: Path) -> None:
        """Check that jobs can run (raise ExecutorError with what to do) and remember where
        to post events."""
        raise NotImplementedError

    def free_slots(self) -> int:
        """How many more jobs may be launched now."""
        raise NotImplementedError

    def launch(self, job: dict[str, Any], job_dir: Path) -> dict[str, Any]:
        """Start the worker of ``job``; returns its placement (where and with which share
        it runs, JSON). Raises ExecutorError when it cannot."""
        raise NotImplementedError

    def cancel(self, job_id: str) -> None:
        """Ask the worker to stop at its next step (it saves a checkpoint)."""
        raise NotImplementedError

    def kill(self, job_id: str) -> None:
        """Stop the worker now (a cancel that was not honoured in time)."""
        raise NotImplementedError

    def reattach(self, job: dict[str, Any], job_dir: Path) -> bool:
        """After a service restart: follow ``job``'s worker again if it still runs (True), or
        say that it is gone (False: the lifecycle requeues the job)."""
        return False

    def recovered(self) -> None:
        """Every job of the store has been re-attached or requeued (clean up leftovers)."""

    def release(self, job_id: str) -> None:
        """The lifecycle has recorded the job's end: free what the executor still holds."""

    def running(self) -> list[str]:
        """Ids of the jobs whose workers this executor follows."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What hello reports about the executor."""
        return {"name": self.name}

    def close(self) -> None:
        """The service stops (every job has ended or been handed back)."""


def read_events(stream, post) -> None:
    """Read a worker's JSON-line events from ``stream`` until it closes; ``post(event)`` each
    (over-long or malformed lines are dropped)."""
    import json
    for line in stream:
        if len(line) > 1_000_000:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            post(ev)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of worker and probe processes: ours, with this backend importable."""
    import backend
    env = dict(os.environ)
    root = str(Path(backend.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def worker_command(job_dir: Path) -> list[str]:
    import sys
    return [sys.executable, "-m", "backend.service.worker", str(job_dir)]
