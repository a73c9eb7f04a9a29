"""The job server: a ZeroMQ ROUTER over the engine, with a durable queue and an executor.

The main thread only moves messages and bookkeeping: it never waits on a job. This
module owns the sockets, the poll loop and the dispatch of requests; the parts are

* ``handlers.py``  the job requests (hello, submit/render/..., status, cancel, ...)
* ``transfers.py`` uploads, sources, result listings and fetches
* ``pushes.py``    watchers and the progress/job/heartbeat pushes
* ``lifecycle.py`` the job lifecycle (launch, events, cancel, requeue, recover)
* ``executors/``   what runs a job: child processes here (``local``) or Ray actors (``ray``)
* ``store.py``     the durable job records; ``worker.py`` the process that runs one job

The executor's reader threads post the workers' events to a mailbox whose file
descriptor sits in the same ``zmq.Poller`` as the network, so the loop wakes on a
request or a worker event alike. docs/protocol.md describes the protocol, the security
model and restart semantics.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
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
from .executors import ExecutorOptions, make_executor
from .executors.base import ExecutorError, Mailbox, child_env
from .handlers import JobHandlers
from .lifecycle import CANCEL_GRACE_S, JobRunner
from .pushes import Pushes
from .security import AllowedRoots, pid_alive
from .store import FileLock, JobStore, atomic_write_json
from .transfers import Transfers

log = logging.getLogger("neural_atlas.service")


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
    job_quota: int = 0  # bytes one job's upload may hold on disk (0: the protocol's limit)
    store_quota: int = 0  # bytes the blob store of uploaded content may hold (0: the disk)
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)


class Server:
    log = log

    def __init__(self, opts: ServerOptions) -> None:
        self.opts = opts
        self.workspace = Path(opts.workspace).expanduser().resolve()
        self.keys_dir = Path(opts.keys_dir).expanduser() if opts.keys_dir else None
        self.session = secrets.token_hex(8)
        self.started = time.time()
        self.counters: Counter[str] = Counter()
        self.store: JobStore | None = None
        self.stopping = False
        self.stop_reason = ""
        self.endpoint = opts.endpoint
        self.device: dict[str, Any] = {"name": "probing", "type": "unknown"}
        self._device_lock = threading.Lock()
        self._next_heartbeat = 0.0
        self._next_parent_check = 0.0
        self._parent_was_ppid = opts.parent_pid is not None and opts.parent_pid == os.getppid()
        self._ctx: zmq.Context | None = None
        self._lock: FileLock | None = None
        self._auth = None
        self.curve = False
        self.mailbox = Mailbox()
        self.executor = None
        self.pushes = Pushes(self._send, self.session)

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
        try:
            self.executor = make_executor(self.opts.executor)
            self.executor.start(self.mailbox, ws)
        except ExecutorError as e:
            raise StartupError(str(e)) from None
        self.store = JobStore(ws)
        self.runner = JobRunner(self.store, self.executor, self.pushes, cancel_grace_s=self.opts.cancel_grace_s,
                                max_lost=self.opts.executor.max_lost, on_end=self._job_ended)
        self.runner.recover()
        self.transfers = Transfers(ws, self.store, self.roots, job_quota=self.opts.job_quota,
                                   store_quota=self.opts.store_quota)
        self._handlers = {**JobHandlers(self).handlers(), **self.transfers.handlers()}
        missing = set(P.REQUESTS) - set(self._handlers)
        assert not missing, f"requests without a handler: {missing}"

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
        atomic_write_json(ws / "server.json", {
            "endpoint": self.endpoint, "pid": os.getpid(), "session": self.session,
            "started": self.started, "curve": self.curve, "protocol": P.PROTOCOL_VERSION,
            "keys": str(keys_dir), "executor": self.executor.describe()})
        if self.opts.probe_device:
            threading.Thread(target=self._probe_device, name="device-probe", daemon=True).start()
        else:
            self.device = {"name": "not probed", "type": "unknown"}
        log.info("serving %s on %s (session %s, curve %s, workspace %s, executor %s)", backend.__version__,
                 self.endpoint, self.session, self.curve, ws, self.executor.describe())

    def _probe_device(self) -> None:
        from .device import probe_subprocess
        info = probe_subprocess(env=child_env())
        with self._device_lock:
            self.device = info

    def device_info(self) -> dict[str, Any]:
        with self._device_lock:
            return dict(self.device)

    def _job_ended(self, job: dict[str, Any]) -> None:
        if self.opts.probe_device and self.device.get("type") == "cuda":  # refresh free memory
            threading.Thread(target=self._probe_device, daemon=True).start()

    # ============================================================== main loop
    def run(self) -> int:
        try:
            self.start()
        except BaseException:
            if self.executor is not None:
                self.executor.close()
            if self._lock:
                self._lock.release()
            raise
        self._install_signals()
        print(f"neural-atlas backend serving on {self.endpoint} (session {self.session})", flush=True)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.mailbox.fileno(), zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while True:
                for sock, _ in poller.poll(100):
                    if sock is self.router:
                        self._drain_router()
                    elif sock is self._monitor:
                        self._drain_monitor()
                    else:
                        for job_id, ev in self.mailbox.drain():
                            self.runner.on_event(job_id, ev)
                self._tick()
                if self.stopping and self.runner.idle():
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
            self.runner.stop()

    def _shutdown(self) -> None:
        if self.executor is not None:
            self.executor.close()
        try:
            (self.workspace / "server.json").unlink()
        except OSError:
            pass
        self._close_sockets()
        self.mailbox.close()
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
        self.pushes.seen(ident)
        try:
            if msg.is_reply or msg.kind not in P.REQUESTS:
                raise ProtocolError("unknown_kind", f"unknown request kind {msg.kind!r}",
                                    f"known kinds: {', '.join(sorted(P.REQUESTS))}")
            P.validate_body(msg.kind, msg.body)
            P.check_blobs(msg.kind, msg.blobs)
            if self.stopping and msg.kind not in P.READ_ONLY:
                raise ProtocolError("shutting_down", "the backend is shutting down")
            body, blobs = self._handlers[msg.kind](ident, msg)
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
        self.runner.tick(now)
        self.pushes.flush(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.opts.heartbeat_s
            self.pushes.heartbeat(now, self.runner.running(), sum(1 for _ in self.store.queued()))
        if self.opts.parent_pid and now >= self._next_parent_check:
            self._next_parent_check = now + 1.0
            gone = not pid_alive(self.opts.parent_pid)
            if self._parent_was_ppid and os.getppid() != self.opts.parent_pid:
                gone = True
            if gone:
                log.info("parent process %d is gone; stopping", self.opts.parent_pid)
                self.request_stop(f"parent {self.opts.parent_pid} exited")
        self.transfers.expire(now)


def _read_json(path: Path) -> dict[str, Any]:
    import json
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def serve(opts: ServerOptions) -> int:
    try:
        return Server(opts).run()
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
