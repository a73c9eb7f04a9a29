"""Transfers for a backend that does not share this machine's files (a studio GPU server,
a Ray head node): what a job needs goes up (``core.remote.upload``: the strip's frames or
movie, rasterised masks, edit images, frame-paint images; only content the backend lacks),
what the add-on shows comes down into its workspace (atlases, the preview's maps, the
rendered shot; resumable, checked).

Whether the backend is remote is checked (``files_mode`` AUTO: a probe file in the
workspace the backend is asked to read, cached per endpoint and server session), or set in
the preferences (REMOTE / SHARED).

A transfer runs on a thread with its own client (sockets are never shared between
threads) and only writes its ``Progress``; the panel reads it and the timer (``tick``)
hands a finished transfer's result to its callback on the main thread. In background mode
(batch scripts, tests: timers never fire) a transfer runs to its end where it is started.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import bpy

from ..core import remote as R

DOWNLOADS = R.DOWNLOADS  # what the add-on reads of a finished job's output, by kind
LOCAL_SOURCE = "source.local"  # beside a downloaded report.json: the clip's path on this machine


@dataclass
class Task:
    key: str  # the job record's token (uploads) or job id (downloads)
    label: str
    kind: str  # upload | download
    work: Callable[[Any, R.Progress, threading.Event], Any]
    on_done: Callable[[Any], None]
    on_fail: Callable[[str, str], None]  # (message, hint)
    progress: R.Progress = field(default_factory=R.Progress)
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: Optional[threading.Thread] = None
    result: Any = None
    error: Optional[tuple[str, str, str]] = None  # (code, message, detail)
    finished: bool = False
    started: float = field(default_factory=time.monotonic)


THREADED: Optional[bool] = None  # None: a thread unless in background mode (tests set True)
TASKS: dict[str, Task] = {}
HISTORY: list[R.Progress] = []  # finished transfers, newest last (the panel, tests)


def files_mode(context: Optional[bpy.types.Context] = None) -> str:
    from .prefs import prefs

    return str(getattr(prefs(context), "files_mode", "AUTO"))


def is_remote(context: Optional[bpy.types.Context] = None) -> bool:
    """True when jobs must travel over the wire: set in the preferences, or (AUTO) the
    backend cannot read a probe file written in this add-on's workspace."""
    mode = files_mode(context)
    if mode in ("REMOTE", "SHARED"):
        return mode == "REMOTE"
    from . import runtime
    from .prefs import prefs

    c = runtime.session(context).ensure_client()
    try:
        return not c.shares_files(os.path.join(prefs(context).workspace_path(), "probe"))
    except Exception as e:  # noqa: BLE001 - an older backend without `probe`: shared, as before
        if getattr(e, "code", "") == "unreachable":
            raise_unreachable(e)
        return False


def raise_unreachable(e: Exception) -> None:
    from ..core import jobs as J
    from . import runtime

    s = runtime.get().session
    msg, hint = J.explain("unreachable", endpoint=s.endpoint if s else "")
    raise J.SessionError("unreachable", msg, hint) from None


def _client() -> Any:
    from . import runtime

    s = runtime.get().session
    if s is None:
        from ..core import jobs as J

        raise J.SessionError("not_connected", "not connected to a backend")
    c = s._make_client()
    c.timeout = max(c.timeout, 10.0)  # a chunk of 4 MB over a slow link
    return c


def _run(task: Task) -> None:
    c = None
    try:
        c = _client()
        task.result = task.work(c, task.progress, task.cancel)
        task.progress.state = "done"
    except R.TransferCancelled:
        task.progress.state = "cancelled"
        task.error = ("cancelled", "cancelled", "")
    except Exception as e:  # noqa: BLE001 - reported in the panel, never raised in a thread
        task.progress.state = "failed"
        task.error = (getattr(e, "code", "internal"), getattr(e, "message", str(e)), getattr(e, "detail", ""))
        task.progress.error = task.error[1]
    finally:
        if c is not None:
            c.close()
        task.finished = True


def start(key: str, label: str, kind: str, work: Callable[[Any, R.Progress, threading.Event], Any],
          on_done: Callable[[Any], None], on_fail: Callable[[str, str], None]) -> Task:
    """Run ``work(client, progress, cancel)``; ``on_done(result)`` or ``on_fail(message, hint)``
    follow on the main thread (at once in background mode)."""
    old = TASKS.get(key)
    if old is not None and not old.finished:
        old.cancel.set()
    task = Task(key, label, kind, work, on_done, on_fail)
    task.progress.what = kind
    TASKS[key] = task
    from . import runtime

    if not (THREADED if THREADED is not None else not bpy.app.background):
        _run(task)
        _finish(task)
    else:
        task.thread = threading.Thread(target=_run, args=(task,), name=f"neural_atlas-{kind}", daemon=True)
        task.thread.start()
        runtime.ensure_timer()
    runtime.note(f"{label}: {kind} {'done' if task.finished and not task.error else 'started'}")
    return task


def _finish(task: Task) -> None:
    TASKS.pop(task.key, None) if TASKS.get(task.key) is task else None
    HISTORY.append(task.progress)
    del HISTORY[:-32]
    if task.error is None:
        task.on_done(task.result)
        return
    code, message, detail = task.error
    if code == "cancelled":
        task.on_fail(f"{task.label}: {task.kind} cancelled", "")
        return
    from ..core import jobs as J

    msg, hint = J.explain(code, message, detail)
    if code == "quota_exceeded":
        hint = detail or hint
    task.on_fail(f"{task.label}: {task.kind} failed: {msg}", hint)


def tick() -> bool:
    """Hand finished transfers to their callbacks (main thread). True while any runs."""
    for task in [t for t in TASKS.values() if t.finished]:
        _finish(task)
    return bool(TASKS)


def cancel(key: str = "") -> int:
    n = 0
    for t in TASKS.values():
        if not key or t.key == key:
            t.cancel.set()
            n += 1
    return n


def reset() -> None:
    cancel()
    for t in list(TASKS.values()):
        if t.thread is not None:
            t.thread.join(5.0)
    TASKS.clear()


# ----------------------------------------------------------------- jobs
def upload_then(key: str, label: str, paths: list[str], submit: Callable[[list[dict]], None],
                on_fail: Callable[[str, str], None], ranges: Optional[list] = None) -> Task:
    """Upload ``paths`` (files or folders; of frame folders only the frames of ``ranges``, see
    ``core.remote.plan``) in one upload, then ``submit(sources)``."""
    return start(key, label, "upload", lambda c, prog, stop: R.upload(c, paths, prog, stop, ranges=ranges),
                 submit, on_fail)


def download_dir(job_id: str) -> str:
    from .actions import workspace

    return os.path.join(workspace(), "downloads", job_id)


def download_then(job_id: str, kind: str, label: str, local_source: str,
                  then: Callable[[str], None], on_fail: Callable[[str, str], None]) -> Task:
    """Download what the add-on reads of job ``job_id`` into the workspace, then ``then(folder)``."""
    dest = download_dir(job_id)
    prefixes = DOWNLOADS.get(kind, ("",))

    def work(c: Any, prog: R.Progress, stop: threading.Event) -> str:
        res = c.result(job_id)
        R.download(c, job_id, R.select(res["files"], prefixes), dest, prog, stop)
        if kind == "decompose" and local_source:
            with open(os.path.join(dest, LOCAL_SOURCE), "w", encoding="utf-8") as f:
                f.write(local_source)
        return dest

    return start(job_id, label, "download", work, then, on_fail)


def draw(layout: bpy.types.UILayout) -> None:
    """Running transfers: a progress bar each and a cancel button."""
    for t in list(TASKS.values()):
        p = t.progress
        row = layout.row(align=True)
        row.progress(factor=p.fraction, type="BAR", text=f"{t.label}: {p.text()}")
        op = row.operator("neural_atlas.transfer_cancel", text="", icon="X")
        op.key = t.key
