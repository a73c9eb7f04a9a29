"""The GPU worker: a child process that runs one job through the engine.

    python -m backend.service.worker JOB_DIR

An executor (``executors/``) starts it: as a child process of the service, or on a Ray
node under a Ray actor. The worker reads ``JOB_DIR/job.json`` (the
server's record, including the resolved spec), holds ``JOB_DIR/.lock`` while it
runs, and talks to the server over its standard streams:

* stdout: JSON lines, one per event (``start``, ``progress``, ``done``,
  ``cancelled``, ``error``). The engine's own prints are moved to stderr first so
  they cannot corrupt the event stream; stderr goes to ``JOB_DIR/worker.log``.
* stdin: the line ``cancel`` cancels the job; end-of-file (the server exited or
  was killed) cancels it too, so an orphaned worker saves a checkpoint and exits
  instead of training on with no one listening.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ENGINE_ENV = "NEURAL_ATLAS_ENGINE"  # dev/test hook: a module with decompose/render_edit
LOCK_WAIT_S = 120.0


class _Events:
    def __init__(self, fd: int, cancel) -> None:
        self._f = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()
        self._cancel = cancel

    def send(self, event: str, **data: Any) -> None:
        line = json.dumps({"event": event, **data}, allow_nan=False, default=str)
        with self._lock:
            try:
                self._f.write(line + "\n")
                self._f.flush()
            except (BrokenPipeError, OSError, ValueError):
                self._cancel.cancel("backend stopped")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def _checkpoint_iteration(out_dir: Path) -> int | None:
    """The iteration of out_dir/checkpoints/latest.json, when there is one."""
    try:
        meta = json.loads((out_dir / "checkpoints" / "latest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict):
        for key in ("iteration", "step", "it"):
            v = meta.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _engine():
    name = os.environ.get(ENGINE_ENV)
    if name:
        import importlib
        return importlib.import_module(name)
    from backend import pipeline
    return pipeline


def _error(code: str, e: BaseException, tb: bool = False) -> dict[str, str]:
    detail = traceback.format_exc() if tb else type(e).__name__
    return {"code": code, "message": str(e) or type(e).__name__, "detail": detail}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m backend.service.worker JOB_DIR", file=sys.stderr)
        return 2
    # the event channel is the original stdout; everything printed goes to stderr
    event_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    guard = None
    if hasattr(signal, "SIGINT"):
        # the server decides; Ctrl-C reaches it. A native library (libtriton's LLVM at the first
        # Triton compile) may install its own C-level SIGINT handler, which would let a Ctrl-C
        # on the server's terminal kill this worker mid-step: the cancel token's polls put
        # SIG_IGN back (backend/signals.py)
        from backend.signals import SignalGuard
        guard = SignalGuard(signal.SIG_IGN, [signal.SIGINT])

    from backend.errors import Cancelled, ConfigError, NeuralAtlasError
    from backend.progress import CancelToken
    from backend.service.store import FileLock

    cancel = CancelToken()
    if guard is not None:
        cancel.on_poll = guard.check
    events = _Events(event_fd, cancel)

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "cancel":
                cancel.cancel("cancelled")
        cancel.cancel("backend stopped")  # EOF: the server is gone

    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()

    job_dir = Path(argv[0])
    lock = FileLock(job_dir / ".lock")
    if not lock.acquire(timeout=LOCK_WAIT_S):
        events.send("error", error={"code": "internal", "message":
                    f"another worker still holds {job_dir / '.lock'}", "detail": ""})
        return 1
    try:
        job = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
        spec = job["spec"]
        out_dir = Path(spec["out_dir"]) if spec.get("out_dir") else job_dir / "out"
        t0 = time.monotonic()

        def progress(p) -> None:
            d = p.to_dict() if hasattr(p, "to_dict") else dict(p)
            events.send("progress", progress=_clean(d))

        try:
            from backend.service.kinds import KINDS
            kind = KINDS.get(job["kind"])
            if kind is None:
                raise ValueError(f"unknown job kind {job['kind']!r}")
            engine = _engine()
            events.send("start", checkpoint=_checkpoint_iteration(out_dir) if kind.resumable else None,
                        pid=os.getpid())
            result = _clean(kind.run(engine, spec, out_dir, progress, cancel))
        except Cancelled as e:
            events.send("cancelled", reason=cancel.reason or str(e))
            return 0
        except ConfigError as e:
            events.send("error", error=_error("invalid_config", e))
            return 0
        except NeuralAtlasError as e:
            events.send("error", error=_error("invalid_input", e))
            return 0
        except Exception as e:  # noqa: BLE001 - reported to the client, logged in worker.log
            traceback.print_exc()
            events.send("error", error=_error("internal", e, tb=True))
            return 0
        events.send("done", result=result, seconds=time.monotonic() - t0)
        return 0
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
