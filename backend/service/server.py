"""The job server: a ZeroMQ ROUTER over the engine, with a durable queue and one GPU worker.

The main thread only moves messages and bookkeeping: it never waits on a job.
The engine runs in a child process (``backend.service.worker``), one job at a
time; a reader thread forwards the worker's events to the main loop through an
inproc socket, so the loop wakes on a network message or a worker event alike.
docs/protocol.md describes the protocol, the security model and restart semantics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

import backend
from neural_atlas.core import protocol as P
from neural_atlas.core.protocol import ProtocolError
from neural_atlas.core.signing import KeyFileError, ReplayCache, ensure_key
from neural_atlas.core.transport import Codec, Dropped, Rejected

from . import keys as keymod
from .security import AllowedRoots, pid_alive, within
from .store import FileLock, JobStore, atomic_write_json

log = logging.getLogger("neural_atlas.service")

WATCH_TTL_S = 30.0  # a client that sent nothing for this long stops getting pushes
PUSH_MIN_INTERVAL_S = 0.1  # progress pushes per job at most 10/s (phase changes at once)
SAVE_INTERVAL_S = 2.0  # running job's progress written to job.json at most this often
CANCEL_GRACE_S = 20.0  # a worker still alive this long after cancel is killed
UPLOAD_TTL_S = 3600.0  # an upload untouched this long is removed
MAX_OPEN_UPLOADS = 16
MAX_LIST = 200
MAX_RESULT_FILES = 2000


class StartupError(Exception):
    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ServerOptions:
    workspace: Path
    endpoint: str = P.DEFAULT_ENDPOINT
    keys_dir: Path | None = None
    parent_pid: int | None = None
    allow_roots: list[Path] = field(default_factory=list)
    curve: bool = False  # require CURVE even on loopback
    probe_device: bool = True
    heartbeat_s: float = P.HEARTBEAT_S
    cancel_grace_s: float = CANCEL_GRACE_S


class _Worker:
    """The running child process of one job."""

    def __init__(self, job_id: str, proc: subprocess.Popen, log_file) -> None:
        self.job_id = job_id
        self.proc = proc
        self.log_file = log_file
        self.finished = False  # a final event (done/cancelled/error) arrived
        self.eof = False
        self.cancel_reason: str | None = None  # "user" | "shutdown"
        self.cancel_deadline: float | None = None
        self.killed = False

    def send_cancel(self) -> None:
        try:
            self.proc.stdin.write(b"cancel\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass


class Server:
    def __init__(self, opts: ServerOptions) -> None:
        self.opts = opts
        self.workspace = Path(opts.workspace).expanduser().resolve()
        self.keys_dir = Path(opts.keys_dir).expanduser() if opts.keys_dir else None
        self.session = secrets.token_hex(8)
        self.started = time.time()
        self.counters: Counter[str] = Counter()
        self.store: JobStore | None = None
        self.uploads: dict[str, dict[str, Any]] = {}
        self.watchers: dict[bytes, dict[str, Any]] = {}
        self.worker: _Worker | None = None
        self.stopping = False
        self.stop_reason = ""
        self.endpoint = opts.endpoint
        self.device: dict[str, Any] = {"name": "probing", "type": "unknown"}
        self._device_lock = threading.Lock()
        self._push_state: dict[str, dict[str, float]] = {}
        self._next_heartbeat = 0.0
        self._next_parent_check = 0.0
        self._parent_was_ppid = opts.parent_pid is not None and opts.parent_pid == os.getppid()
        self._ctx: zmq.Context | None = None
        self._lock: FileLock | None = None
        self._auth = None
        self.curve = False

    # ================================================================ startup
    def start(self) -> None:
        from neural_atlas.core.signing import default_keys_dir
        ws = self.workspace
        ws.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(ws / "server.lock")
        if not self._lock.acquire():
            other = _read_json(ws / "server.json")
            raise StartupError(f"another backend is serving {ws} (pid {other.get('pid', '?')}, "
                               f"endpoint {other.get('endpoint', '?')}); stop it or use another --workspace",
                               exit_code=3)
        keys_dir = self.keys_dir or default_keys_dir()
        self.keys_dir = keys_dir
        loopback = P.is_loopback_endpoint(self.endpoint)
        curve = keymod.server_curve(keys_dir)
        if (not loopback or self.opts.curve) and curve is None:
            why = "a non-loopback endpoint" if not loopback else "--curve"
            raise StartupError(
                f"refusing to serve {self.endpoint}: {why} needs CURVE keys (a server certificate "
                f"and at least one allowed client) in {keys_dir}; {keymod.curve_help(keys_dir)}")
        try:
            key = ensure_key(keys_dir)
        except KeyFileError as e:
            raise StartupError(str(e)) from None
        roots = [ws, *self.opts.allow_roots]
        if loopback and not self.opts.allow_roots:
            roots.append(Path.home())
        self.roots = AllowedRoots(roots)
        self.codec = Codec(key, replay=ReplayCache(P.REPLAY_WINDOW_S), check_clock=True,
                           not_before=self.started - 5.0)
        self.store = JobStore(ws)
        self._recover()
        shutil.rmtree(ws / "uploads", ignore_errors=True)  # uploads do not survive a restart
        (ws / "uploads").mkdir(exist_ok=True)

        self._ctx = zmq.Context()
        self.router = self._ctx.socket(zmq.ROUTER)
        r = self.router
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        r.setsockopt(zmq.SNDHWM, 1000)
        r.setsockopt(zmq.RCVHWM, 1000)
        r.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        r.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        self._auth = None
        if curve is not None:
            from zmq.auth.thread import ThreadAuthenticator
            public, secret, clients = curve
            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("neural_atlas.zap"))
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(clients))
            r.curve_server = True
            r.curve_publickey = public
            r.curve_secretkey = secret
            self.curve = True
        self._monitor = r.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                             | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                             | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        try:
            r.bind(self.endpoint)
        except zmq.ZMQError as e:
            self._close_sockets()
            raise StartupError(f"cannot listen on {self.endpoint}: {e}. Is another backend running "
                               f"there? Choose another port with --endpoint, or check that no "
                               f"firewall/antivirus blocks local ports.", exit_code=3) from None
        self.endpoint = r.getsockopt_string(zmq.LAST_ENDPOINT)
        self._events = self._ctx.socket(zmq.PULL)
        self._events_addr = f"inproc://worker-events-{self.session}"
        self._events.bind(self._events_addr)
        atomic_write_json(ws / "server.json", {
            "endpoint": self.endpoint, "pid": os.getpid(), "session": self.session,
            "started": self.started, "curve": self.curve, "protocol": P.PROTOCOL_VERSION,
            "keys": str(keys_dir)})
        if self.opts.probe_device:
            threading.Thread(target=self._probe_device, name="device-probe", daemon=True).start()
        else:
            self.device = {"name": "not probed", "type": "unknown"}
        log.info("serving %s on %s (session %s, curve %s, workspace %s)", backend.__version__,
                 self.endpoint, self.session, self.curve, ws)

    def _recover(self) -> None:
        """Requeue jobs that were running when the previous server died."""
        for job in self.store.load():
            if job["state"] == "running":
                job["state"], job["phase"] = "queued", "queued"
                job["message"] = "backend restarted; resuming from the last checkpoint"
                self.store.save(job)
                log.info("job %s: requeued after restart", job["job_id"])
            elif job["state"] == "cancelling":
                self._finish(job, "cancelled", message="cancelled (backend restarted)")

    def _probe_device(self) -> None:
        from .device import probe_subprocess
        info = probe_subprocess(env=child_env())
        with self._device_lock:
            self.device = info

    # ============================================================== main loop
    def run(self) -> int:
        try:
            self.start()
        except BaseException:
            if self._lock:
                self._lock.release()
            raise
        self._install_signals()
        print(f"neural-atlas backend serving on {self.endpoint} (session {self.session})", flush=True)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while True:
                for sock, _ in poller.poll(100):
                    if sock is self.router:
                        self._drain_router()
                    elif sock is self._events:
                        self._drain_events()
                    else:
                        self._drain_monitor()
                self._tick()
                if self.stopping and self.worker is None:
                    break
        finally:
            self._shutdown()
        log.info("stopped (%s)", self.stop_reason or "shutdown")
        return 0

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in ("SIGTERM", "SIGINT", "SIGBREAK", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), lambda s, f: self.request_stop(f"signal {s}"))

    def request_stop(self, reason: str) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_reason = reason
            if self.worker is not None:
                self._cancel_worker("shutdown")

    def _shutdown(self) -> None:
        if self.worker is not None:  # should not happen: killed here as a last resort
            self.worker.proc.kill()
        try:
            (self.workspace / "server.json").unlink()
        except OSError:
            pass
        self._close_sockets()
        if self._lock:
            self._lock.release()

    def _close_sockets(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self.router.close(linger=500)  # let the last replies (e.g. to shutdown) leave
            self._ctx.destroy(linger=0)
            self._ctx = None

    # ============================================================== receiving
    def _drain_router(self) -> None:
        for _ in range(256):  # bounded: timers and worker events get their turn
            try:
                ident = self.router.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            frames: list = []
            excess = False
            while self.router.getsockopt(zmq.RCVMORE):
                f = self.router.recv(copy=False)
                if len(frames) < P.MAX_FRAMES:
                    frames.append(f.buffer)
                else:
                    excess = True
            self.counters["received"] += 1
            if excess:
                self.counters["dropped_oversize"] += 1
                continue
            self._handle(ident, frames)

    def _handle(self, ident: bytes, frames: list) -> None:
        try:
            msg = self.codec.decode(frames)
        except Dropped as d:
            self.counters["dropped_" + d.reason] += 1
            return
        except Rejected as r:
            self.counters["rejected_" + r.error.code] += 1
            if r.msg_id:
                self._send(ident, P.make_header(r.kind or "error", re=r.msg_id, ok=False,
                                                error=r.error.to_dict(), session=self.session))
            return
        w = self.watchers.get(ident)
        if w is not None:
            w["last"] = time.monotonic()
        try:
            if msg.is_reply or msg.kind not in P.REQUESTS:
                raise ProtocolError("unknown_kind", f"unknown request kind {msg.kind!r}",
                                    f"known kinds: {', '.join(sorted(P.REQUESTS))}")
            P.validate_body(msg.kind, msg.body)
            P.check_blobs(msg.kind, msg.blobs)
            if self.stopping and msg.kind not in P.READ_ONLY:
                raise ProtocolError("shutting_down", "the backend is shutting down")
            body, blobs = getattr(self, "_h_" + msg.kind)(ident, msg)
        except ProtocolError as e:
            self.counters["rejected_" + e.code] += 1
            self._send(ident, P.make_header(msg.kind, re=msg.id, ok=False, error=e.to_dict(),
                                            session=self.session))
            return
        except Exception as e:  # noqa: BLE001 - a bug must not stop the server
            log.exception("handling %s", msg.kind)
            self.counters["rejected_internal"] += 1
            self._send(ident, P.make_header(msg.kind, re=msg.id, ok=False, session=self.session,
                                            error=P.error_dict("internal", f"{type(e).__name__}: {e}",
                                                               "see the backend log")))
            return
        self.counters["handled_" + msg.kind] += 1
        self._send(ident, P.make_header(msg.kind, body, re=msg.id, ok=True, session=self.session), blobs)

    def _send(self, ident: bytes, header: dict, blobs=()) -> None:
        try:
            frames = self.codec.encode(header, blobs)
        except ProtocolError as e:  # a reply too large for the header: say so instead
            frames = self.codec.encode(P.make_header(header["kind"], re=header.get("re"), ok=False,
                                                     error=e.to_dict(), session=self.session))
        try:
            self.router.send_multipart([ident, *frames], flags=zmq.NOBLOCK, copy=False)
            self.counters["sent"] += 1
        except zmq.Again:
            self.counters["send_dropped"] += 1  # slow or gone client: never block on it
        except zmq.ZMQError:
            self.counters["send_dropped"] += 1

    def _drain_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message
        for _ in range(64):
            try:
                evt = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.counters["handshake_failed"] += 1
            log.warning("handshake failed from %s (event %s)", evt.get("endpoint"), evt.get("event"))

    # ================================================================ timers
    def _tick(self) -> None:
        now = time.monotonic()
        w = self.worker
        if w is not None:
            if w.cancel_deadline is not None and now > w.cancel_deadline and not w.killed:
                log.warning("job %s: worker did not stop in %.0f s; killing it", w.job_id,
                            self.opts.cancel_grace_s)
                w.killed = True
                w.proc.kill()
            if w.proc.poll() is not None and (w.eof or w.killed):
                self._worker_exited(w)
        if self.worker is None and not self.stopping:
            nxt = next(self.store.queued(), None)
            if nxt is not None:
                self._start_worker(nxt)
        self._flush_pushes(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.opts.heartbeat_s
            self._heartbeat(now)
        if self.opts.parent_pid and now >= self._next_parent_check:
            self._next_parent_check = now + 1.0
            gone = not pid_alive(self.opts.parent_pid)
            if self._parent_was_ppid and os.getppid() != self.opts.parent_pid:
                gone = True
            if gone:
                log.info("parent process %d is gone; stopping", self.opts.parent_pid)
                self.request_stop(f"parent {self.opts.parent_pid} exited")
        for uid, up in list(self.uploads.items()):
            if now - up["last"] > UPLOAD_TTL_S:
                self._drop_upload(uid)

    def _heartbeat(self, now: float) -> None:
        for ident, w in list(self.watchers.items()):
            if now - w["last"] > WATCH_TTL_S:
                del self.watchers[ident]
        if not self.watchers:
            return
        body = {"session": self.session, "time": time.time(),
                "running": self.worker.job_id if self.worker else None,
                "queued": sum(1 for _ in self.store.queued())}
        for ident in self.watchers:
            self._send(ident, P.make_header("heartbeat", body, session=self.session))

    # ================================================================ workers
    def _start_worker(self, job: dict[str, Any]) -> None:
        jdir = self.store.job_dir(job["job_id"])
        job["state"] = "running"
        job["phase"] = job.get("phase") if job.get("phase") not in (None, "queued") else "load"
        job["error"] = None
        self.store.save(job)
        logf = open(jdir / "worker.log", "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "backend.service.worker", str(jdir)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf,
                                    env=child_env(), cwd=str(jdir))
        except OSError as e:
            logf.close()
            self._finish(job, "failed", error=P.error_dict("internal", f"cannot start the worker: {e}"))
            return
        self.worker = _Worker(job["job_id"], proc, logf)
        threading.Thread(target=self._read_worker, args=(self.worker,), daemon=True,
                         name=f"worker-{job['job_id']}").start()
        self._push_job(job)
        log.info("job %s: started worker pid %d", job["job_id"], proc.pid)

    def _read_worker(self, w: _Worker) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._events_addr)
        try:
            for line in w.proc.stdout:
                if len(line) <= 1_000_000:
                    push.send_multipart([w.job_id.encode(), line])
            push.send_multipart([w.job_id.encode(), b""])  # end of stream
        except zmq.ZMQError:
            pass
        finally:
            push.close()

    def _drain_events(self) -> None:
        for _ in range(1024):
            try:
                job_id, line = self._events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            w = self.worker
            if w is None or w.job_id != job_id.decode():
                continue
            if not line:
                w.eof = True
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            self._worker_event(w, ev)

    def _worker_event(self, w: _Worker, ev: dict[str, Any]) -> None:
        job = self.store.jobs.get(w.job_id)
        if job is None:
            return
        kind = ev.get("event")
        if kind == "start":
            job["attempts"] = int(job.get("attempts") or 0) + 1
            ck = ev.get("checkpoint")
            if ck is not None:
                job["resumed_from"] = ck
            job["message"] = f"resuming from iteration {ck}" if ck else "started"
            self.store.save(job)
            self._push_job(job)
        elif kind == "progress":
            p = ev.get("progress") or {}
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
            st = self._push_entry(job["job_id"])
            if new_phase:
                self.store.save(job)
                st["save"] = time.monotonic()
                self._push_progress(job)
        elif kind == "done":
            w.finished = True
            job["result"] = ev.get("result")
            job["iteration"] = max(job.get("iteration") or 0, job.get("iterations") or 0)
            self._finish(job, "done", message=f"finished in {float(ev.get('seconds') or 0):.1f} s")
        elif kind == "cancelled":
            w.finished = True
            if w.cancel_reason == "shutdown":
                self._requeue(job, "interrupted by a backend shutdown; resumes on restart")
            else:
                self._finish(job, "cancelled", message="cancelled")
        elif kind == "error":
            w.finished = True
            err = ev.get("error") or {}
            self._finish(job, "failed", error=P.error_dict(err.get("code", "internal"),
                                                         err.get("message", "failed"),
                                                         err.get("detail", "")))

    def _worker_exited(self, w: _Worker) -> None:
        self.worker = None
        w.log_file.close()
        for s in (w.proc.stdin, w.proc.stdout):
            try:
                s.close()
            except OSError:
                pass
        job = self.store.jobs.get(w.job_id)
        if job is not None and not w.finished:
            if w.cancel_reason == "shutdown":
                self._requeue(job, "interrupted by a backend shutdown; resumes on restart")
            elif w.cancel_reason == "user":
                self._finish(job, "cancelled", message="cancelled (worker stopped)")
            else:
                tail = _tail(self.store.job_dir(w.job_id) / "worker.log")
                self._finish(job, "failed", error=P.error_dict(
                    "worker_crashed", f"the worker process exited with code {w.proc.returncode}",
                    tail))
        log.info("job %s: worker exited (%s)", w.job_id, w.proc.returncode)
        if self.opts.probe_device and self.device.get("type") == "cuda":
            threading.Thread(target=self._probe_device, daemon=True).start()

    def _cancel_worker(self, reason: str) -> None:
        w = self.worker
        if w is None or w.cancel_reason is not None:
            return  # a user's cancel stays a cancel when a shutdown follows
        w.cancel_reason = reason
        w.cancel_deadline = time.monotonic() + self.opts.cancel_grace_s
        w.send_cancel()

    def _requeue(self, job: dict[str, Any], message: str) -> None:
        job["state"], job["phase"], job["message"] = "queued", "queued", message
        self.store.save(job)
        self._push_job(job)

    def _finish(self, job: dict[str, Any], state: str, *, message: str = "",
                error: dict[str, str] | None = None) -> None:
        job["state"] = state
        if state == "done":
            job["phase"], job["fraction"], job["eta_s"] = "done", 1.0, 0.0
        if message:
            job["message"] = message
        if error is not None:
            job["error"] = error
            job["message"] = error["message"]
        job["seq"] = int(job.get("seq") or 0) + 1
        self.store.save(job)
        self._push_job(job)
        self._push_state.pop(job["job_id"], None)

    # ================================================================= pushes
    def _watching(self, job_id: str) -> list[bytes]:
        return [i for i, w in self.watchers.items() if w["all"] or job_id in w["jobs"]]

    def _watch(self, ident: bytes, job_ids=(), all_jobs: bool = False) -> None:
        w = self.watchers.setdefault(ident, {"last": time.monotonic(), "jobs": set(), "all": False})
        w["jobs"].update(job_ids)
        w["all"] = w["all"] or all_jobs
        w["last"] = time.monotonic()

    def _push_job(self, job: dict[str, Any]) -> None:
        info = P.job_summary(job)
        for ident in self._watching(job["job_id"]):
            self._send(ident, P.make_header("job", info, session=self.session))

    def _push_entry(self, job_id: str) -> dict[str, float]:
        """When a running job's progress was last pushed and saved (for throttling)."""
        return self._push_state.setdefault(job_id, {"push": 0.0, "save": 0.0, "pushed_seq": 0})

    def _push_progress(self, job: dict[str, Any]) -> None:
        st = self._push_entry(job["job_id"])
        st["push"], st["pushed_seq"] = time.monotonic(), job["seq"]
        body = {k: job.get(k) for k in ("job_id", "state", "phase", "iteration", "iterations", "fraction",
                                         "eta_s", "psnr", "message", "elapsed_s", "seq")}
        for ident in self._watching(job["job_id"]):
            self._send(ident, P.make_header("progress", body, session=self.session))

    def _flush_pushes(self, now: float) -> None:
        for jid, st in list(self._push_state.items()):
            job = self.store.jobs.get(jid)
            if job is None:
                self._push_state.pop(jid, None)
                continue
            if job["seq"] > st["pushed_seq"] and now - st["push"] >= PUSH_MIN_INTERVAL_S:
                self._push_progress(job)
            if now - st["save"] >= SAVE_INTERVAL_S and job["state"] in ("running", "cancelling"):
                st["save"] = now
                self.store.save(job)

    # =============================================================== handlers
    def _job(self, job_id: str) -> dict[str, Any]:
        job = self.store.jobs.get(job_id)
        if job is None:
            raise ProtocolError("not_found", f"no job {job_id!r}", "list shows the jobs this backend has")
        return job

    def _h_hello(self, ident: bytes, msg: P.Message):
        with self._device_lock:
            device = dict(self.device)
        return {
            "protocol": P.PROTOCOL_VERSION, "protocol_min": P.PROTOCOL_MIN,
            "backend_version": backend.__version__, "session": self.session, "pid": os.getpid(),
            "started": self.started, "server_time": time.time(), "device": device,
            "workspace": str(self.workspace), "allowed_roots": list(self.roots.roots),
            "curve": self.curve, "limits": dict(P.LIMITS), "counters": dict(self.counters),
            "running": self.worker.job_id if self.worker else None,
            "queued": sum(1 for _ in self.store.queued()),
        }, ()

    def _h_ping(self, ident: bytes, msg: P.Message):
        return {"session": self.session, "server_time": time.time()}, ()

    def _config(self, body: dict[str, Any]) -> dict[str, Any]:
        from backend.config import preset
        from backend.errors import ConfigError
        try:
            cfg = preset(body.get("preset") or "seed")
            overrides = body.get("overrides") or {}
            if overrides:
                cfg = cfg.replace(**overrides)
            return cfg.validate().to_dict()
        except ConfigError as e:
            raise ProtocolError("invalid_config", str(e)) from None
        except (TypeError, ValueError) as e:
            raise ProtocolError("invalid_config", f"invalid settings: {e}") from None

    def _resolve_sources(self, sources: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
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

    def _materialize(self, job: dict[str, Any], resolved: dict[str, Any], used: set[str]) -> dict[str, str]:
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

    def _h_submit(self, ident: bytes, msg: P.Message):
        b = msg.body
        old = self.store.by_token(b.get("token"))
        if old is not None:
            if b.get("watch", True):
                self._watch(ident, [old["job_id"]])
            return {"job_id": old["job_id"], "state": old["state"], "existing": True}, ()
        config = self._config(b)
        sources = {"source": b["source"]}
        for i, m in enumerate(b.get("masks") or []):
            sources[f"mask {i}"] = m
        resolved, used = self._resolve_sources(sources)
        spec = {"config": config, "frame_range": b.get("frame_range"), "preset": b.get("preset") or "seed"}
        job = self.store.create("decompose", spec, token=b.get("token"),
                                name=b.get("name") or _source_name(b["source"]))
        paths = self._materialize(job, resolved, used)
        spec["source"] = paths.pop("source")
        spec["masks"] = [paths[f"mask {i}"] for i in range(len(b.get("masks") or []))] or None
        self.store.save(job)
        if b.get("watch", True):
            self._watch(ident, [job["job_id"]])
        log.info("job %s: queued (%s)", job["job_id"], spec["source"])
        return {"job_id": job["job_id"], "state": job["state"], "existing": False}, ()

    def _h_render(self, ident: bytes, msg: P.Message):
        b = msg.body

        def place(spec, paths):
            spec["edits"] = {k: paths[f"edit {k}"] for k in b["edits"]}
        return self._child_job(ident, b, "render", {f"edit {k}": v for k, v in b["edits"].items()},
                               {"mode": b.get("mode", "delta"), "frame_range": b.get("frame_range"),
                                "formats": b.get("formats") or ["png", "mp4"], "opacity": b.get("opacity")},
                               "render of", place)

    def _h_paint_frame(self, ident: bytes, msg: P.Message):
        """Paint on a frame of a done decomposition: a job whose out/edits/ are the painted layers."""
        b = msg.body
        edits = b.get("edits") or {}

        def place(spec, paths):
            spec["image"] = paths["image"]
            spec["edits"] = {k: paths[f"edit {k}"] for k in edits}
        return self._child_job(ident, b, "paint_frame", {"image": b["image"], **{f"edit {k}": v for k, v in edits.items()}},
                               {"frame": b["frame"], "layer": b.get("layer")}, f"paint on frame {b['frame']} of", place)

    def _child_job(self, ident: bytes, b: dict, kind: str, sources: dict, spec: dict, name: str, place):
        """Queue a ``kind`` job on a finished decomposition (render, paint_frame), idempotent by
        token; ``place(spec, paths)`` puts the sources' materialized paths into the spec."""
        old = self.store.by_token(b.get("token"))
        if old is not None:
            if b.get("watch", True):
                self._watch(ident, [old["job_id"]])
            return {"job_id": old["job_id"], "state": old["state"], "existing": True}, ()
        parent = self._job(b["job_id"])
        if parent["kind"] != "decompose" or parent["state"] != "done":
            raise ProtocolError("bad_state", f"job {parent['job_id']} is a {parent['kind']} job in state "
                                f"{parent['state']}; {kind} needs a finished decomposition")
        resolved, used = self._resolve_sources(sources)
        spec = {"parent_out": str(self.store.out_dir(parent["job_id"])), **spec}
        job = self.store.create(kind, spec, token=b.get("token"), parent=parent["job_id"],
                                name=b.get("name") or f"{name} {parent.get('name') or parent['job_id']}")
        place(spec, self._materialize(job, resolved, used))
        self.store.save(job)
        if b.get("watch", True):
            self._watch(ident, [job["job_id"]])
        return {"job_id": job["job_id"], "state": job["state"], "existing": False}, ()

    def _h_status(self, ident: bytes, msg: P.Message):
        job = self._job(msg.body["job_id"])
        if msg.body.get("watch"):
            self._watch(ident, [job["job_id"]])
        return {"job": P.job_summary(job)}, ()

    def _h_watch(self, ident: bytes, msg: P.Message):
        ids = msg.body["job_ids"]
        known = [j for j in ids if j in self.store.jobs]
        self._watch(ident, known, all_jobs=bool(msg.body.get("all")))
        return {"watching": known, "unknown": [j for j in ids if j not in self.store.jobs],
                "jobs": [P.job_summary(self.store.jobs[j]) for j in known]}, ()

    def _h_list(self, ident: bytes, msg: P.Message):
        states = msg.body.get("states")
        jobs = sorted((j for j in self.store.jobs.values() if not states or j["state"] in states),
                      key=lambda j: j["order"])
        off = msg.body.get("offset") or 0
        lim = min(msg.body.get("limit") or MAX_LIST, MAX_LIST)
        return {"jobs": [P.job_summary(j) for j in jobs[off:off + lim]], "total": len(jobs)}, ()

    def _h_cancel(self, ident: bytes, msg: P.Message):
        job = self._job(msg.body["job_id"])
        if job["state"] == "queued":
            self._finish(job, "cancelled", message="cancelled before it started")
        elif job["state"] == "running" and self.worker and self.worker.job_id == job["job_id"]:
            job["state"], job["message"] = "cancelling", "cancelling"
            self.store.save(job)
            self._push_job(job)
            self._cancel_worker("user")
        return {"job_id": job["job_id"], "state": job["state"]}, ()

    def _h_delete(self, ident: bytes, msg: P.Message):
        job = self._job(msg.body["job_id"])
        if job["state"] in ("running", "cancelling"):
            raise ProtocolError("bad_state", f"job {job['job_id']} is {job['state']}; cancel it first")
        users = [j["job_id"] for j in self.store.jobs.values()
                 if j.get("parent") == job["job_id"] and not JobStore.is_terminal(j)]
        if users:
            raise ProtocolError("bad_state", f"render job(s) {', '.join(users)} still use this job")
        self.store.delete(job["job_id"])
        self._push_state.pop(job["job_id"], None)
        return {"job_id": job["job_id"], "deleted": True}, ()

    def _h_shutdown(self, ident: bytes, msg: P.Message):
        self.request_stop("shutdown requested by a client")
        return {"stopping": True, "running": self.worker.job_id if self.worker else None}, ()

    def _h_result(self, ident: bytes, msg: P.Message):
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

    def _h_fetch(self, ident: bytes, msg: P.Message):
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
    def _h_upload_begin(self, ident: bytes, msg: P.Message):
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

    def _h_upload(self, ident: bytes, msg: P.Message):
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

    def _h_upload_end(self, ident: bytes, msg: P.Message):
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


def child_env() -> dict[str, str]:
    """The environment of worker and probe processes: ours, with this backend importable."""
    env = dict(os.environ)
    root = str(Path(backend.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _source_name(src: Any) -> str:
    if isinstance(src, str):
        return os.path.basename(src.rstrip("/\\"))[:200]
    return (src.get("path") or f"upload {src['upload']}")[:200]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def serve(opts: ServerOptions) -> int:
    try:
        return Server(opts).run()
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
