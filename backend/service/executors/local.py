"""The local executor: each job in a child process on this machine (the default).

``concurrency`` jobs run at once. With more than one, each worker is given one GPU
through ``CUDA_VISIBLE_DEVICES``: the visible GPU with the fewest jobs of this executor,
so N jobs spread over the GPUs and several share a GPU when N exceeds them. With one
slot the worker sees what the service sees (today's behaviour).

A worker is ``python -m backend.service.worker JOB_DIR``; it reads ``cancel`` lines on
stdin and stops when stdin closes, so a worker never outlives its service for long: it
saves a checkpoint and exits, and a restarted service requeues the job (``reattach``
is always False here).
"""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from .base import Executor, ExecutorError, Mailbox, child_env, read_events, worker_command


class _Worker:
    def __init__(self, job_id: str, proc: subprocess.Popen, gpu: str | None, slot: int) -> None:
        self.job_id, self.proc, self.gpu, self.slot = job_id, proc, gpu, slot


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, concurrency: int = 1, gpus: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        if concurrency < 1:
            raise ExecutorError(f"--concurrency must be at least 1, got {concurrency}")
        self.concurrency = concurrency
        self.gpus = gpus  # None: detect at start
        self.env = dict(env or {})
        self._workers: dict[str, _Worker] = {}
        self.mailbox: Mailbox | None = None

    def start(self, mailbox: Mailbox, workspace: Path) -> None:
        self.mailbox = mailbox
        if self.gpus is None:
            from ..device import visible_gpus
            self.gpus = visible_gpus() if self.concurrency > 1 else []

    def free_slots(self) -> int:
        return self.concurrency - len(self._workers)

    def _pick_gpu(self) -> str | None:
        if self.concurrency == 1 or not self.gpus:
            return None
        load = {g: 0 for g in self.gpus}
        for w in self._workers.values():
            if w.gpu in load:
                load[w.gpu] += 1
        return min(self.gpus, key=lambda g: (load[g], self.gpus.index(g)))

    def launch(self, job: dict[str, Any], job_dir: Path) -> dict[str, Any]:
        gpu = self._pick_gpu()
        used = {w.slot for w in self._workers.values()}
        slot = next(i for i in range(self.concurrency) if i not in used)
        extra = dict(self.env)
        if gpu is not None:
            extra["CUDA_VISIBLE_DEVICES"] = gpu
        with open(job_dir / "worker.log", "ab") as logf:
            try:
                proc = subprocess.Popen(worker_command(job_dir), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=logf, env=child_env(extra),
                                        cwd=str(job_dir))
            except OSError as e:
                raise ExecutorError(f"cannot start the worker: {e}") from None
        w = _Worker(job["job_id"], proc, gpu, slot)
        self._workers[w.job_id] = w
        threading.Thread(target=self._read, args=(w,), daemon=True, name=f"worker-{w.job_id}").start()
        return {"executor": self.name, "host": socket.gethostname(), "gpu": gpu, "slot": slot,
                "pid": proc.pid}

    def _read(self, w: _Worker) -> None:
        """Forward the worker's JSON lines; when its stdout closes, wait for it and post ``exit``."""
        assert self.mailbox is not None
        read_events(w.proc.stdout, lambda ev: self.mailbox.put(w.job_id, ev))
        code = w.proc.wait()
        self.mailbox.put(w.job_id, {"event": "exit", "code": code, "lost": False, "reason": ""})

    def cancel(self, job_id: str) -> None:
        w = self._workers.get(job_id)
        if w is None:
            return
        try:
            w.proc.stdin.write(b"cancel\n")
            w.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def kill(self, job_id: str) -> None:
        w = self._workers.get(job_id)
        if w is not None:
            w.proc.kill()

    def release(self, job_id: str) -> None:
        w = self._workers.pop(job_id, None)
        if w is None:
            return
        for s in (w.proc.stdin, w.proc.stdout):
            try:
                s.close()
            except OSError:
                pass

    def running(self) -> list[str]:
        return list(self._workers)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "concurrency": self.concurrency, "gpus": list(self.gpus or [])}

    def close(self) -> None:
        for w in list(self._workers.values()):  # only after a failed stop: the last resort
            w.proc.kill()
