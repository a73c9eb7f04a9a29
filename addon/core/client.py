"""Client for the backend service: pyzmq + msgpack only (no torch, no bpy).

Two ways to drive it, one message handler (``Client._apply``) behind both:

* non-blocking (Blender's UI): ``req = client.send("status", {"job_id": j})``,
  then call ``client.poll(0)`` from a ``bpy.app.timers`` callback; it returns the
  events that arrived (replies, progress, job state changes, connection changes)
  and keeps ``client.jobs`` up to date. ``send(..., callback=fn)`` calls ``fn(req)``.
* blocking (batch scripts): ``client.hello()``, ``client.submit(...)``,
  ``client.wait(job_id)`` ... poll internally until the reply comes.

Reliability (the "Lazy Pirate" pattern): every request has a deadline; when one
passes, the socket is closed and reopened and every pending request is sent
again (under a fresh message id; submit and render carry a token so a resend
never makes a second job). After ``retries`` attempts a request fails with code
``unreachable``. A change of the server's session id (a restart) is noticed on
the next message; the client then re-attaches to the jobs it was watching.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import zmq

from . import protocol as P
from .protocol import ProtocolError
from .signing import ReplayCache, load_key
from .transport import Codec, Dropped, Rejected


class ServiceError(Exception):
    """An error reply from the backend, or ``unreachable``/``timeout`` from the client."""

    def __init__(self, code: str, message: str, detail: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.detail = code, message, detail

    @classmethod
    def from_dict(cls, d: Mapping[str, str] | None) -> "ServiceError":
        d = d or {}
        return cls(d.get("code", "internal"), d.get("message", "error"), d.get("detail", ""))

    def to_dict(self) -> dict[str, str]:
        return P.error_dict(self.code, self.message, self.detail)


@dataclass
class CurveKeys:
    """CURVE keys of a client: the server's public key and this client's key pair (Z85 bytes)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_cert: str | Path, client_secret_cert: str | Path) -> "CurveKeys":
        import zmq.auth
        server_public, _ = zmq.auth.load_certificate(str(server_cert))
        public, secret = zmq.auth.load_certificate(str(client_secret_cert))
        if not secret:
            raise ValueError(f"{client_secret_cert} holds no secret key")
        return cls(server_public, public, secret)

    @classmethod
    def from_dir(cls, keys_dir: str | Path) -> "CurveKeys":
        """``server.key`` and ``client.key_secret`` from a client's keys folder."""
        d = Path(keys_dir)
        return cls.from_files(d / "server.key", d / "client.key_secret")


@dataclass
class Request:
    """One logical request; its wire id changes when it is resent."""

    kind: str
    body: dict[str, Any]
    blobs: Sequence[bytes] = ()
    callback: Callable[["Request"], None] | None = None
    timeout: float = 5.0
    retries: int = 2
    id: str = field(default_factory=P.new_id)
    msg_id: str = ""
    sent_at: float = 0.0  # monotonic, last attempt
    deadline: float = 0.0
    attempts: int = 0
    done: bool = False
    ok: bool = False
    reply: dict[str, Any] | None = None
    reply_blobs: list[bytes] = field(default_factory=list)
    error: dict[str, str] | None = None

    def raise_for_error(self) -> dict[str, Any]:
        if not self.done:
            raise ServiceError("timeout", f"{self.kind}: no reply yet")
        if not self.ok:
            raise ServiceError.from_dict(self.error)
        return self.reply or {}


@dataclass
class Event:
    """Something that happened, as returned by ``poll``.

    kind: ``reply`` (a request completed, see ``request``), ``progress``, ``job``
    (a job record changed), ``heartbeat``, ``restarted`` (new server session),
    ``disconnected`` (requests timed out; reconnecting), ``reconnected``.
    """

    kind: str
    body: dict[str, Any]
    request: Request | None = None

    @property
    def job_id(self) -> str | None:
        return self.body.get("job_id")


def _frame_folders(paths: Sequence[Any]) -> bool:
    """Every path a plain folder of frames (images directly in it, as a strip's frames or an
    object's masks), none a mapping, a movie or a seed layout: a frame range can cut them."""
    from .strips import IMAGE_EXTENSIONS

    for p in paths:
        if isinstance(p, Mapping) or not os.path.isdir(p) or os.path.isdir(os.path.join(p, "video_frames")):
            return False
        if not any(n.lower().endswith(IMAGE_EXTENSIONS) for n in os.listdir(p)):
            return False
    return True


class Client:
    def __init__(self, endpoint: str = P.DEFAULT_ENDPOINT, *, key: bytes | None = None,
                 keys_dir: str | Path | None = None, curve: CurveKeys | None = None,
                 timeout: float = 5.0, retries: int = 2, heartbeat: float = P.HEARTBEAT_S,
                 on_event: Callable[[Event], None] | None = None,
                 context: zmq.Context | None = None) -> None:
        """``key``: the signing key (default: read from ``keys_dir``/signing.key, whose
        default is ``signing.default_keys_dir()``). ``curve``: needed when the server
        uses CURVE (non-loopback). ``timeout`` per attempt and ``retries`` resends
        before a request fails as ``unreachable``."""
        self.endpoint = endpoint
        self.codec = Codec(key if key is not None else load_key(keys_dir),
                           replay=ReplayCache(P.REPLAY_WINDOW_S, 20_000))
        self.curve = curve
        self.timeout, self.retries, self.heartbeat = timeout, retries, heartbeat
        self.on_event = on_event
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket | None = None
        self._pending: dict[str, Request] = {}  # wire msg id -> request
        self._last_sent = 0.0
        self._last_status_sweep = 0.0
        self.clock_offset = 0.0  # server wall clock minus ours, learnt from hello/ping
        self.session: str | None = None
        self.server: dict[str, Any] = {}  # the last hello reply
        self.jobs: dict[str, dict[str, Any]] = {}  # latest JobInfo per job seen
        self.watched: set[str] = set()
        self.connected: bool | None = None  # None until the first message
        self.last_heard = 0.0
        self.counters: dict[str, int] = {}
        self._connect()

    # ============================================================ connection
    def _connect(self) -> None:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        s.setsockopt(zmq.SNDHWM, 1000)
        s.setsockopt(zmq.RCVHWM, 1000)
        if self.curve is not None:
            s.curve_serverkey = self.curve.server_public
            s.curve_publickey = self.curve.public
            s.curve_secretkey = self.curve.secret
        s.connect(self.endpoint)
        self._sock = s

    def _reconnect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._connect()
        self.counters["reconnects"] = self.counters.get("reconnects", 0) + 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ============================================================== sending
    def send(self, kind: str, body: Mapping[str, Any] | None = None, blobs: Sequence[bytes] = (), *,
             callback: Callable[[Request], None] | None = None, timeout: float | None = None,
             retries: int | None = None) -> Request:
        """Queue a request without waiting. Its reply arrives through ``poll``."""
        body = {k: v for k, v in dict(body or {}).items() if v is not None}
        try:  # fail here, not after a round trip
            P.validate_body(kind, body)
            P.check_blobs(kind, list(blobs))
        except ProtocolError as e:
            raise ServiceError(e.code, e.message, e.detail) from None
        req = Request(kind, body, tuple(blobs), callback,
                      self.timeout if timeout is None else timeout,
                      self.retries if retries is None else retries)
        self._transmit(req)
        return req

    def _transmit(self, req: Request) -> None:
        req.msg_id = P.new_id()
        req.attempts += 1
        req.sent_at = time.monotonic()
        req.deadline = req.sent_at + req.timeout
        header = P.make_header(req.kind, req.body, msg_id=req.msg_id, ts=time.time() + self.clock_offset)
        frames = self.codec.encode(header, req.blobs)
        self._pending[req.msg_id] = req
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # queue full: the deadline passes and the request is resent
        self._last_sent = req.sent_at

    # ============================================================== polling
    def poll(self, timeout: float = 0.0, max_messages: int = 256) -> list[Event]:
        """Handle what arrived (waiting up to ``timeout`` s for the first message),
        resend timed-out requests, send heartbeats. Returns the events, in order."""
        events: list[Event] = []
        wait_ms = max(0, int(timeout * 1000))
        n = 0
        while n < max_messages and self._sock.poll(wait_ms, zmq.POLLIN):
            wait_ms = 0
            while n < max_messages:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                n += 1
                events.extend(self._apply(frames))
        events.extend(self._timers())
        if self.on_event is not None:
            for e in events:
                self.on_event(e)
        return events

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _apply(self, frames: list[bytes]) -> list[Event]:
        """The one message handler: update client state from a server message."""
        if len(frames) > P.MAX_FRAMES:
            self._count("dropped_oversize")
            return []
        try:
            msg = self.codec.decode(frames)
        except Dropped as d:
            self._count("dropped_" + d.reason)
            return []
        except Rejected:
            self._count("dropped_malformed")
            return []
        now = time.monotonic()
        self.last_heard = now
        events: list[Event] = []
        if self.connected is False:
            events.append(Event("reconnected", {"endpoint": self.endpoint}))
        self.connected = True
        if msg.session and msg.session != self.session:
            old, self.session = self.session, msg.session
            if old is not None:
                events.append(Event("restarted", {"old_session": old, "session": msg.session}))
                self._rewatch()
        if msg.re is not None:
            req = self._pending.pop(msg.re, None)
            if req is None or req.done:
                return events  # a late reply to an attempt already given up
            req.done, req.ok = True, bool(msg.ok) and msg.error is None
            req.reply, req.reply_blobs = msg.body, msg.blobs
            req.error = None if req.ok else (msg.error or P.error_dict("internal", "error reply"))
            if req.ok:
                self._learn(req, now)
            events.append(Event("reply", req.reply if req.ok else {"error": req.error}, req))
            if req.callback is not None:
                req.callback(req)
        elif msg.kind in ("progress", "job"):
            jid = msg.body.get("job_id")
            if isinstance(jid, str):
                self._update_job(msg.body)
                events.append(Event(msg.kind, msg.body))
        elif msg.kind == "heartbeat":
            events.append(Event("heartbeat", msg.body))
        else:
            self._count("unknown_push")
        return events

    def _update_job(self, info: Mapping[str, Any]) -> None:
        jid = info["job_id"]
        cur = self.jobs.get(jid)
        seq = info.get("seq")
        if cur is not None and isinstance(seq, int) and isinstance(cur.get("seq"), int) and seq < cur["seq"]:
            return  # older than what we have
        merged = dict(cur or {})
        merged.update(info)
        self.jobs[jid] = merged

    def _learn(self, req: Request, now: float) -> None:
        r = req.reply or {}
        if req.kind in ("hello", "ping") and isinstance(r.get("server_time"), (int, float)):
            rtt = now - req.sent_at
            self.clock_offset = float(r["server_time"]) - (time.time() - rtt / 2)
        if req.kind == "hello":
            self.server = dict(r)
        elif req.kind in ("submit", "render", "paint_frame"):
            if req.body.get("watch", True) and isinstance(r.get("job_id"), str):
                self.watched.add(r["job_id"])
                self._update_job({"job_id": r["job_id"], "state": r.get("state")})
        elif req.kind == "status" and isinstance(r.get("job"), dict):
            self._update_job(r["job"])
            if req.body.get("watch"):
                self.watched.add(r["job"]["job_id"])
        elif req.kind == "watch":
            for j in r.get("jobs") or ():
                if isinstance(j, dict) and isinstance(j.get("job_id"), str):
                    self._update_job(j)
        elif req.kind == "list":
            for j in r.get("jobs") or ():
                if isinstance(j, dict) and isinstance(j.get("job_id"), str):
                    self._update_job(j)
        elif req.kind == "delete":
            self.jobs.pop(req.body["job_id"], None)
            self.watched.discard(req.body["job_id"])

    def _rewatch(self) -> None:
        live = [j for j in self.watched if self.jobs.get(j, {}).get("state") not in P.TERMINAL_STATES]
        if live:
            self.send("watch", {"job_ids": sorted(live)[:1024]})

    def _timers(self) -> list[Event]:
        now = time.monotonic()
        events: list[Event] = []
        expired = [r for r in self._pending.values() if now > r.deadline]
        if expired:
            resend = []
            for r in expired:
                self._pending.pop(r.msg_id, None)
                if r.attempts > r.retries:
                    r.done, r.ok = True, False
                    r.error = P.error_dict(
                        "unreachable", f"no answer from the backend at {self.endpoint} "
                        f"after {r.attempts} attempt(s) of {r.timeout:.0f} s",
                        "is the backend running? A firewall or antivirus may block local ports; "
                        "a wrong signing or CURVE key looks the same (see the backend log)")
                    events.append(Event("reply", {"error": r.error}, r))
                    if r.callback is not None:
                        r.callback(r)
                else:
                    resend.append(r)
            if self.connected is not False:
                events.append(Event("disconnected", {"endpoint": self.endpoint}))
            self.connected = False
            self._reconnect()
            # everything still pending went out on the old socket: send it again
            resend.extend(self._pending.values())
            self._pending.clear()
            for r in sorted(resend, key=lambda r: r.sent_at):
                self._transmit(r)
            self._rewatch()
        live = [j for j in self.watched if self.jobs.get(j, {}).get("state") not in P.TERMINAL_STATES]
        if live and now - self._last_sent >= self.heartbeat and not self._pending:
            self.send("ping")  # keeps this client a watcher; detects a dead backend
        return events

    # ============================================================= blocking
    def request(self, kind: str, body: Mapping[str, Any] | None = None, blobs: Sequence[bytes] = (), *,
                timeout: float | None = None, retries: int | None = None) -> Request:
        """Send and wait for the reply (or ``unreachable``). Returns the finished Request."""
        req = self.send(kind, body, blobs, timeout=timeout, retries=retries)
        while not req.done:
            self.poll(min(0.05, max(0.0, req.deadline - time.monotonic())) or 0.001)
        return req

    def call(self, kind: str, body: Mapping[str, Any] | None = None, blobs: Sequence[bytes] = (), *,
             timeout: float | None = None, retries: int | None = None) -> dict[str, Any]:
        """Send, wait, and return the reply body; raise ServiceError for an error reply."""
        return self.request(kind, body, blobs, timeout=timeout, retries=retries).raise_for_error()

    # -------------------------------------------------------- conveniences
    def hello(self, **kw: Any) -> dict[str, Any]:
        r = self.call("hello", {"client": "neural_atlas.core.client"}, **kw)
        if r.get("protocol", 0) < P.PROTOCOL_MIN:
            raise ServiceError("unsupported_version", f"the backend speaks protocol {r.get('protocol')}")
        return r

    def ping(self, **kw: Any) -> dict[str, Any]:
        return self.call("ping", **kw)

    def submit(self, source: str | Path | Mapping[str, str], *, masks: Iterable[Any] | None = None,
               preset: str | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
               frame_range: tuple[int, int] | None = None, token: str | None = None,
               name: str | None = None, upload: bool = False, watch: bool = True) -> str:
        """Queue a decomposition; returns its job id. ``upload=True`` sends the clip
        (and masks) over the wire first, for a backend on another machine."""
        if name is None and not isinstance(source, Mapping):
            name = os.path.basename(os.path.abspath(os.fspath(source)))
        masks = list(masks) if masks else []
        ranges = None
        if upload and frame_range and frame_range[1] is not None and _frame_folders([source, *masks]):
            # a shot cut from a frame folder: only its frames (and mask frames) travel, and the
            # backend reads them as frames 0 .. n - 1
            ranges = [(int(frame_range[0]), int(frame_range[1]))] * (1 + len(masks))
            frame_range = (0, int(frame_range[1]) - int(frame_range[0]))
        srcs = self._sources([source, *masks], upload, ranges)
        src, mask_src = srcs[0], srcs[1:] or None
        body = {"source": src, "masks": mask_src, "preset": preset,
                "overrides": {k: dict(v) for k, v in overrides.items()} if overrides else None,
                "frame_range": list(frame_range) if frame_range else None,
                "token": token or uuid.uuid4().hex, "name": name, "watch": watch}
        return self.call("submit", body)["job_id"]

    def render(self, job_id: str, edits: Mapping[int, str | Path], *, mode: str = "delta",
               frame_range: tuple[int, int] | None = None, formats: Sequence[str] | None = None,
               token: str | None = None, name: str | None = None, upload: bool = False,
               opacity: Mapping[int, Any] | None = None) -> str:
        """Queue a re-render of ``job_id`` with edited atlases; returns the render job id.
        ``opacity``: per edit layer a list of per-frame opacities (or {frame: opacity})."""
        keys = [str(int(k)) for k in edits]
        body = {"job_id": job_id, "edits": dict(zip(keys, self._sources(list(edits.values()), upload))),
                "mode": mode, "frame_range": list(frame_range) if frame_range else None,
                "formats": list(formats) if formats else None, "token": token or uuid.uuid4().hex,
                "name": name}
        if opacity:
            body["opacity"] = {str(int(k)): ({str(int(f)): float(o) for f, o in v.items()} if isinstance(v, Mapping)
                                             else [float(o) for o in v]) for k, v in opacity.items()}
        return self.call("render", body)["job_id"]

    def paint_frame(self, job_id: str, frame: int, image: str | Path, *, layer: int | None = None,
                    edits: Mapping[int, str | Path] | None = None, token: str | None = None,
                    name: str | None = None, upload: bool = False) -> str:
        """Queue painting ``image`` (RGBA over frame ``frame``) into the edit layers of decomposition
        ``job_id``, over ``edits`` when given; the job's ``edits/layer_<i>.png`` are the result."""
        edits = dict(edits or {})
        srcs = self._sources([image, *edits.values()], upload)
        body = {"job_id": job_id, "frame": int(frame), "image": srcs[0],
                "layer": None if layer is None else int(layer),
                "edits": dict(zip((str(int(k)) for k in edits), srcs[1:])) or None,
                "token": token or uuid.uuid4().hex, "name": name}
        return self.call("paint_frame", body)["job_id"]

    def status(self, job_id: str, *, watch: bool = False) -> dict[str, Any]:
        return self.call("status", {"job_id": job_id, "watch": watch})["job"]

    def watch(self, job_ids: Iterable[str]) -> dict[str, Any]:
        ids = list(job_ids)
        self.watched.update(ids)
        return self.call("watch", {"job_ids": ids})

    def cancel(self, job_id: str) -> str:
        return self.call("cancel", {"job_id": job_id})["state"]

    def list_jobs(self, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        return self.call("list", {"states": list(states) if states else None})["jobs"]

    def result(self, job_id: str) -> dict[str, Any]:
        return self.call("result", {"job_id": job_id})

    def delete(self, job_id: str) -> None:
        self.call("delete", {"job_id": job_id})

    def shutdown(self) -> dict[str, Any]:
        return self.call("shutdown", retries=0)

    def wait(self, job_id: str, *, timeout: float | None = None,
             on_event: Callable[[Event], None] | None = None, status_every: float = 5.0) -> dict[str, Any]:
        """Block until the job is done/failed/cancelled; returns its final JobInfo.

        Survives backend restarts: pushes are re-attached on a new session, and a
        status request every ``status_every`` s covers lost pushes. Raises
        ServiceError("timeout") after ``timeout`` s.
        """
        end = None if timeout is None else time.monotonic() + timeout
        self.watched.add(job_id)
        st = self.send("status", {"job_id": job_id, "watch": True})
        last_status = time.monotonic()
        while True:
            info = self.jobs.get(job_id)
            if info and info.get("state") in P.TERMINAL_STATES:
                return info
            if st.done and not st.ok and st.error and st.error.get("code") == "not_found":
                raise ServiceError.from_dict(st.error)
            now = time.monotonic()
            if end is not None and now > end:
                raise ServiceError("timeout", f"job {job_id} did not finish within {timeout} s")
            if st.done and now - last_status >= status_every:
                st = self.send("status", {"job_id": job_id, "watch": True})
                last_status = now
            for e in self.poll(0.2):
                if on_event is not None:
                    on_event(e)

    # --------------------------------------------------------------- files
    def _sources(self, srcs: Sequence[Any], upload: bool,
                 ranges: Optional[Sequence[Optional[tuple[int, int]]]] = None) -> list[Any]:
        """Paths as the backend names them: absolute paths, or (``upload``) one upload
        session holding every path that is not already a source mapping (of frame folders
        only the frames of ``ranges``, parallel to ``srcs``)."""
        out: list[Any] = [dict(s) if isinstance(s, Mapping) else os.path.abspath(os.fspath(s)) for s in srcs]
        if upload:
            idx = [i for i, s in enumerate(srcs) if not isinstance(s, Mapping)]
            if idx:
                sent = self.upload_many([out[i] for i in idx], ranges=[ranges[i] for i in idx] if ranges else None)
                for i, src in zip(idx, sent):
                    out[i] = src
        return out

    def upload_many(self, paths: Sequence[str | Path], progress: Any = None, cancel: Any = None,
                    ranges: Optional[Sequence[Optional[tuple[int, int]]]] = None) -> list[dict[str, str]]:
        """Send files and folders in one upload, only the content the backend lacks
        (``remote.upload``; ``ranges``: of frame folders, only those frames); returns one
        source per path."""
        from . import remote
        try:
            return remote.upload(self, [os.fspath(p) for p in paths], progress, cancel, ranges=ranges)
        except remote.TransferError as e:
            raise ServiceError(e.code, e.message, e.detail) from None

    def upload(self, path: str | Path) -> dict[str, str]:
        """Send a file or folder to the backend; returns a source for submit/render."""
        return self.upload_many([path])[0]

    def shares_files(self, folder: str | Path, refresh: bool = False) -> bool:
        """Whether the backend reads this machine's ``folder`` at the same path (a probe file)."""
        from . import remote
        return remote.shares_files(self, os.fspath(folder), refresh=refresh)

    def fetch(self, job_id: str, rel: str, dest: str | Path) -> Path:
        """Download one file of a finished job's output folder to ``dest`` (resumable)."""
        from . import remote
        try:
            remote.fetch_file(self, job_id, rel, os.fspath(dest))
        except remote.TransferError as e:
            raise ServiceError(e.code, e.message, e.detail) from None
        return Path(dest)

    def download_result(self, job_id: str, dest_dir: str | Path,
                        prefixes: Sequence[str] = ("atlas/", "report.json", "config.toml"),
                        progress: Any = None, cancel: Any = None) -> list[Path]:
        """Fetch the files of a finished job whose paths start with one of ``prefixes`` into
        ``dest_dir`` (resumable, checked against the backend's sha256)."""
        from . import remote
        res = self.result(job_id)
        try:
            got = remote.download(self, job_id, remote.select(res["files"], prefixes), os.fspath(dest_dir),
                                  progress, cancel)
        except remote.TransferError as e:
            raise ServiceError(e.code, e.message, e.detail) from None
        return [Path(p) for p in got]


def is_error(req: Request, code: str | None = None) -> bool:
    """True when ``req`` finished with an error (of ``code``, if given)."""
    return req.done and not req.ok and (code is None or (req.error or {}).get("code") == code)


__all__ = ["Client", "CurveKeys", "Event", "Request", "ServiceError", "ProtocolError", "is_error"]
