"""The add-on's job model on top of the service client (no bpy).

``Session`` owns one :class:`~.client.Client` and turns its events into
:class:`Change` records the bpy shell applies to its job list:

* GUI: a ``bpy.app.timers`` callback calls ``session.pump(max_messages)``, which
  drains the socket with ``poll(0)`` (never blocks) and caps the work per tick;
* headless: ``session.wait(job_id)`` blocks (polling in short slices) and hands
  every change to the same callback the timer uses.

Both paths share ``_on_event``. Finished jobs get their ``result`` fetched once
(non-blocking request) so the shell can import atlases or place a render.

Also here: error texts that say what to do (``explain``), progress/ETA text,
and the mapping of backend states to what the panel shows.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from . import protocol as P
from .strips import format_duration

ACTIVE_STATES = ("queued", "running", "cancelling")

STATE_LABELS = {
    "queued": "Queued", "running": "Running", "cancelling": "Cancelling",
    "done": "Done", "failed": "Failed", "cancelled": "Cancelled",
    "submitting": "Submitting", "lost": "Unknown to backend", "uploading": "Uploading",
}

PHASE_LABELS = {
    "queued": "waiting", "load": "reading clip", "flow": "optical flow", "pretrain": "pretraining",
    "train": "training", "export": "writing atlases", "bake": "baking maps", "render": "rendering",
    "paint": "painting", "done": "done",
}


@dataclass
class Change:
    """Something the shell must reflect: kind is ``job`` (fields changed), ``finished``
    (a job reached a terminal state; ``result`` is filled for ``done`` jobs when
    available), ``submitted`` (a submit/render got its job id), ``connection``,
    ``error`` (a request failed; ``info`` holds code/message/hint)."""

    kind: str
    job_id: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    token: str = ""


@dataclass
class Connection:
    state: str = "disconnected"  # disconnected | connecting | connected | unreachable | error
    message: str = ""
    hint: str = ""
    server: dict[str, Any] = field(default_factory=dict)
    since: float = 0.0

    @property
    def device_text(self) -> str:
        return device_text(self.server.get("device") or {})


def device_text(device: Mapping[str, Any]) -> str:
    """'NVIDIA H100 (cuda), 71.2 / 79.6 GB free' from the hello reply's device."""
    if not device:
        return "unknown device"
    name = str(device.get("name") or device.get("type") or "unknown")
    kind = str(device.get("type") or "")
    text = f"{name} ({kind})" if kind and kind not in name.lower() else name
    total = _num(device.get("memory_total") or device.get("vram_total") or device.get("total_memory"))
    free = _num(device.get("memory_free") or device.get("vram_free") or device.get("free_memory"))
    if total:
        gb = 1024 ** 3 if total > 1e6 else 1.0
        text += f", {free / gb:.1f} / {total / gb:.1f} GB free" if free is not None else f", {total / gb:.1f} GB"
    return text


def gpu_missing(device: Mapping[str, Any]) -> bool:
    return str(device.get("type") or "").lower() == "cpu"


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ------------------------------------------------------------------- errors
def explain(code: str, message: str = "", detail: str = "", *, endpoint: str = "",
            log_path: str = "") -> tuple[str, str]:
    """A (message, what to do) pair for an error code from the client or backend."""
    log = f" Backend log: {log_path}" if log_path else ""
    port = endpoint.rsplit(":", 1)[-1] if endpoint.startswith("tcp://") else ""
    if code == "unreachable":
        return (f"Cannot reach the backend at {endpoint or 'the endpoint'}",
                "Is it running? Start it from the add-on preferences ('Start a local backend'), "
                "or check the endpoint. A firewall or antivirus may block local port "
                f"{port or '(see endpoint)'}; a wrong signing key looks the same." + log)
    if code == "key_missing":
        return (message or "The signing key is missing",
                "Start the backend once (it creates signing.key), or copy signing.key from the "
                "backend machine into the add-on's Keys folder (Preferences).")
    if code == "path_not_allowed":
        return (message or "The backend may not read that file",
                "The backend only reads files under its allowed folders: start it with "
                "--allow-root <folder> or move the clip under its workspace or home folder.")
    if code == "invalid_input":
        return (message or "The backend could not use the clip",
                "Check that the clip plays in Blender, that every mask folder has one image per "
                "frame of the clip, and that the frame range lies inside the clip." + log)
    if code == "invalid_config":
        return (message or "Invalid settings", "Pick another preset or fix the overridden values.")
    if code == "worker_crashed":
        return (message or "The backend's worker process died",
                "Out of GPU or system memory? Try the 'demo' preset, fewer frames or a "
                "smaller clip; the job's worker.log in the backend workspace says more." + log)
    if code == "unsupported_version":
        return (message or "The add-on and the backend speak different protocol versions",
                "Update the add-on or the backend so that both are the same release.")
    if code == "stale":
        return (message or "The backend rejected a message as stale",
                "Check that both machines' clocks are right.")
    if code == "bad_state":
        return (message or "The job is not in a state that allows this", "Wait for the job to finish.")
    if code == "not_found":
        return (message or "The backend does not know this job",
                "It was deleted or the backend uses another workspace; decompose again.")
    if code == "gpu_missing":
        return ("No GPU: the backend runs on the CPU",
                "Decomposition will be slow. Install a CUDA (or ROCm/MPS) build of PyTorch in the "
                "backend's environment, or connect to a backend on a machine with a GPU.")
    if code == "cancelled":
        return (message or "Cancelled", "")
    if code == "launch_failed":
        return (message or "The local backend did not start", "Check the backend Python in the "
                "preferences." + log)
    return (message or code or "error", (detail if detail and "\n" not in detail else "") + log)


def progress_text(info: Mapping[str, Any]) -> str:
    """'training 1200/1500, ETA 1m 05s, 31.2 dB'."""
    state = str(info.get("state") or "")
    if state not in ACTIVE_STATES:
        return STATE_LABELS.get(state, state)
    parts = [PHASE_LABELS.get(str(info.get("phase") or ""), str(info.get("phase") or state))]
    it, its = info.get("iteration"), info.get("iterations")
    if isinstance(it, int) and isinstance(its, int) and its > 0 and info.get("phase") in ("train", "pretrain"):
        parts[0] += f" {it}/{its}"
    eta = info.get("eta_s")
    if isinstance(eta, (int, float)) and eta >= 0:
        parts.append(f"ETA {format_duration(float(eta))}")
    psnr = info.get("psnr")
    if isinstance(psnr, (int, float)) and psnr > 0:
        parts.append(f"{psnr:.1f} dB")
    return ", ".join(parts)


def new_token() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------ session
class Session:
    """One connection to a backend plus the jobs this Blender watches."""

    def __init__(self, endpoint: str = P.DEFAULT_ENDPOINT, *, keys_dir: Optional[str] = None,
                 timeout: float = 5.0, retries: int = 2, log_path: str = "",
                 client_factory: Optional[Callable[..., Any]] = None) -> None:
        self.endpoint = endpoint
        self.keys_dir = keys_dir or None
        self.timeout, self.retries = timeout, retries
        self.log_path = log_path
        self._factory = client_factory
        self.client: Any = None
        self.conn = Connection()
        self.jobs: dict[str, dict[str, Any]] = {}  # job id -> latest JobInfo (+ "result")
        self._finished: set[str] = set()  # terminal jobs already reported
        self._result_pending: set[str] = set()
        self._hello_req: Any = None
        self.changes: list[Change] = []
        self.force_curve = False  # CURVE on a loopback endpoint too (an SSH tunnel, `serve --curve`)

    # -------------------------------------------------------------- client
    def _make_client(self) -> Any:
        from .client import Client, CurveKeys  # needs zmq: imported lazily
        from .signing import KeyFileError

        curve = None
        if self.keys_dir and (self.force_curve or not P.is_loopback_endpoint(self.endpoint)):
            try:
                curve = CurveKeys.from_dir(self.keys_dir)
            except (OSError, ValueError) as e:
                if self.force_curve:  # asked for (an SSH tunnel, a --curve server): say what is missing
                    raise SessionError("key_missing", f"CURVE is on but the keys folder lacks a certificate: {e}",
                                       "Copy server.key and client.key_secret from the backend machine") from None
                curve = None  # the server says so if it needs CURVE
        try:
            factory = self._factory or Client
            return factory(self.endpoint, keys_dir=self.keys_dir, curve=curve, timeout=self.timeout,
                           retries=self.retries)
        except KeyFileError as e:
            raise SessionError("key_missing", str(e)) from None

    def ensure_client(self) -> Any:
        if self.client is None:
            try:
                self.client = self._make_client()
            except SessionError as e:
                self._set_conn("error", *explain(e.code, e.message))
                raise
        return self.client

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - closing must not fail unregister
                pass
        self.client = None
        self.conn = Connection()

    def reconfigure(self, endpoint: str, keys_dir: Optional[str], force_curve: Optional[bool] = None) -> None:
        curve = self.force_curve if force_curve is None else bool(force_curve)
        if endpoint != self.endpoint or (keys_dir or None) != self.keys_dir or curve != self.force_curve:
            self.close()
            self.endpoint, self.keys_dir, self.force_curve = endpoint, keys_dir or None, curve

    def _set_conn(self, state: str, message: str = "", hint: str = "") -> None:
        if (state, message) != (self.conn.state, self.conn.message):
            self.conn.state, self.conn.message, self.conn.hint = state, message, hint
            self.conn.since = time.time()
            self.changes.append(Change("connection", info={"state": state, "message": message,
                                                           "hint": hint}))

    # ---------------------------------------------------- non-blocking API
    def connect(self, force: bool = False) -> None:
        """Send hello (non-blocking); the reply arrives through pump(). Without ``force``
        nothing is sent while connected."""
        c = self.ensure_client()
        if self._hello_req is not None and not self._hello_req.done:
            return
        if self.conn.state == "connected" and not force:
            return
        if self.conn.state != "connected":  # a refresh keeps showing the connection
            self._set_conn("connecting", f"Connecting to {self.endpoint}")
        self._hello_req = c.send("hello", {"client": "neural_atlas blender"}, callback=self._on_hello)

    def _on_hello(self, req: Any) -> None:
        if req.ok:
            self.conn.server = dict(req.reply or {})
            dev = self.conn.server.get("device") or {}
            self._set_conn("connected", f"Connected: {device_text(dev)}",
                           explain("gpu_missing")[1] if gpu_missing(dev) else "")
        else:
            err = req.error or {}
            state = "unreachable" if err.get("code") == "unreachable" else "error"
            self._set_conn(state, *explain(err.get("code", ""), err.get("message", ""),
                                           err.get("detail", ""), endpoint=self.endpoint,
                                           log_path=self.log_path))

    def submit(self, source: Any, *, masks: Optional[list] = None, frame_range: Optional[tuple[int, int]] = None,
               preset: Optional[str] = None, overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
               name: Optional[str] = None, token: Optional[str] = None) -> str:
        """Queue a decomposition without waiting; returns the token that the ``submitted``
        change carries with the job id."""
        token = token or new_token()
        body = {"source": source, "masks": masks or None,
                "frame_range": list(frame_range) if frame_range else None, "preset": preset,
                "overrides": {k: dict(v) for k, v in overrides.items()} if overrides else None,
                "token": token, "name": name, "watch": True}
        self.ensure_client().send("submit", body, callback=self._on_submitted, timeout=max(self.timeout, 10.0))
        return token

    def render(self, job_id: str, edits: Mapping[int, str], *, frame_range: Optional[tuple[int, int]] = None,
               formats: Iterable[str] = ("png",), mode: str = "delta", name: Optional[str] = None,
               token: Optional[str] = None, opacity: Optional[Mapping[str, list[float]]] = None) -> str:
        """Queue an edit render; ``opacity`` is the per-frame opacity of edit layers
        (``core.lifetime.render_field``), left out when None."""
        token = token or new_token()
        body = {"job_id": job_id, "edits": {str(int(k)): v for k, v in edits.items()}, "mode": mode,
                "frame_range": list(frame_range) if frame_range else None, "formats": list(formats),
                "token": token, "name": name, "watch": True}
        if opacity:
            body["opacity"] = {str(k): [float(x) for x in v] for k, v in opacity.items()}
        self.ensure_client().send("render", body, callback=self._on_submitted, timeout=max(self.timeout, 10.0))
        return token

    def paint_frame(self, job_id: str, frame: int, image: str, *, layer: Optional[int] = None,
                    edits: Optional[Mapping[int, str]] = None, name: Optional[str] = None,
                    token: Optional[str] = None) -> str:
        """Queue painting ``image`` (RGBA over decomposition frame ``frame``) into the edit layers,
        over ``edits`` (the current edit images); the job's ``edits/layer_<i>.png`` are the result."""
        token = token or new_token()
        body = {"job_id": job_id, "frame": int(frame), "image": image,
                "layer": None if layer is None or layer < 0 else int(layer),
                "edits": {str(int(k)): v for k, v in edits.items()} if edits else None,
                "token": token, "name": name, "watch": True}
        self.ensure_client().send("paint_frame", body, callback=self._on_submitted, timeout=max(self.timeout, 10.0))
        return token

    def _on_submitted(self, req: Any) -> None:
        token = req.body.get("token", "")
        if req.ok:
            jid = (req.reply or {}).get("job_id", "")
            kind = {"submit": "decompose"}.get(req.kind, req.kind)  # render, paint_frame
            self.jobs.setdefault(jid, {"job_id": jid, "kind": kind})
            self.jobs[jid].update({"state": (req.reply or {}).get("state", "queued")})
            self.changes.append(Change("submitted", jid, dict(self.jobs[jid]), token))
        else:
            err = req.error or {}
            msg, hint = explain(err.get("code", ""), err.get("message", ""), err.get("detail", ""),
                                endpoint=self.endpoint, log_path=self.log_path)
            self.changes.append(Change("error", "", {"code": err.get("code", ""), "message": msg,
                                                     "hint": hint, "request": req.kind}, token))

    def cancel(self, job_id: str) -> None:
        self.ensure_client().send("cancel", {"job_id": job_id}, callback=self._on_simple)

    def delete(self, job_id: str) -> None:
        self.ensure_client().send("delete", {"job_id": job_id}, callback=self._on_simple)
        self.jobs.pop(job_id, None)

    def _on_simple(self, req: Any) -> None:
        if not req.ok:
            err = req.error or {}
            msg, hint = explain(err.get("code", ""), err.get("message", ""), err.get("detail", ""),
                                endpoint=self.endpoint, log_path=self.log_path)
            self.changes.append(Change("error", req.body.get("job_id", ""),
                                       {"code": err.get("code", ""), "message": msg, "hint": hint,
                                        "request": req.kind}))

    def attach(self, job_ids: Iterable[str]) -> None:
        """Re-attach to jobs known from a saved .blend (or after a restart): ask their
        status and watch them."""
        c = self.ensure_client()
        for jid in job_ids:
            if jid and jid not in self._finished:
                c.watched.add(jid)
                c.send("status", {"job_id": jid, "watch": True}, callback=self._on_status)

    def _on_status(self, req: Any) -> None:
        if req.ok:
            job = (req.reply or {}).get("job") or {}
            if job.get("job_id"):
                self._job_update(job)
        elif (req.error or {}).get("code") == "not_found":
            jid = req.body.get("job_id", "")
            self.jobs.setdefault(jid, {"job_id": jid})["state"] = "lost"
            msg, hint = explain("not_found", (req.error or {}).get("message", ""))
            self.changes.append(Change("finished", jid, {"job_id": jid, "state": "lost",
                                                         "error": {"code": "not_found", "message": msg},
                                                         "hint": hint}))
            self._finished.add(jid)

    # ------------------------------------------------------------- driving
    def pump(self, max_messages: int = 64) -> list[Change]:
        """Handle what arrived, without blocking. Returns the changes since the last call."""
        if self.client is not None:
            for e in self.client.poll(0, max_messages):
                self._on_event(e)
        out, self.changes = self.changes, []
        return out

    def wait(self, job_id: str, *, timeout: Optional[float] = None,
             on_change: Optional[Callable[[Change], None]] = None, slice_s: float = 0.2,
             status_every: float = 5.0) -> dict[str, Any]:
        """Block until ``job_id`` is finished and its result fetched; every change goes
        to ``on_change`` (the same handler the GUI timer uses). Returns the JobInfo."""
        c = self.ensure_client()
        end = None if timeout is None else time.monotonic() + timeout
        self.attach([job_id]) if job_id not in self._finished else None
        last_status = time.monotonic()
        while True:
            for e in c.poll(slice_s, 256):
                self._on_event(e)
            changes, self.changes = self.changes, []
            for ch in changes:
                if on_change is not None:
                    on_change(ch)
            info = self.jobs.get(job_id, {})
            if job_id in self._finished and job_id not in self._result_pending:
                return info
            now = time.monotonic()
            if end is not None and now > end:
                raise SessionError("timeout", f"job {job_id} did not finish within {timeout:.0f} s")
            if now - last_status > status_every and job_id not in self._finished:
                c.send("status", {"job_id": job_id, "watch": True}, callback=self._on_status)
                last_status = now

    def wait_submitted(self, token: str, *, timeout: float = 60.0,
                       on_change: Optional[Callable[[Change], None]] = None) -> str:
        """Block until the submit/render with ``token`` has its job id (or failed)."""
        c = self.ensure_client()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in c.poll(0.1, 256):
                self._on_event(e)
            changes, self.changes = self.changes, []
            found: Optional[Change] = None
            for ch in changes:
                if on_change is not None:
                    on_change(ch)
                if ch.token == token and ch.kind in ("submitted", "error"):
                    found = ch
            if found is not None:
                if found.kind == "error":
                    raise SessionError(found.info.get("code", "error"), found.info.get("message", ""),
                                       found.info.get("hint", ""))
                return found.job_id
        raise SessionError("timeout", "the backend did not accept the job in time")

    def _on_event(self, e: Any) -> None:
        if e.kind in ("progress", "job"):
            self._job_update(e.body)
        elif e.kind == "disconnected":
            msg, hint = explain("unreachable", endpoint=self.endpoint, log_path=self.log_path)
            self._set_conn("unreachable", msg, hint)
        elif e.kind in ("reconnected", "restarted"):
            if self.conn.state != "connected":
                self._set_conn("connected", "Reconnected" + (" (backend restarted)" if e.kind == "restarted"
                                                             else ""))
            if e.kind == "restarted":
                self.connect(force=True)  # refresh device info
                live = [j for j, i in self.jobs.items() if i.get("state") in ACTIVE_STATES]
                self.attach(live)
        elif e.kind == "heartbeat":
            if self.conn.state in ("unreachable",):
                self._set_conn("connected", "Reconnected")

    def _job_update(self, info: Mapping[str, Any]) -> None:
        jid = str(info.get("job_id") or "")
        if not jid:
            return
        cur = self.jobs.setdefault(jid, {"job_id": jid})
        seq, cseq = info.get("seq"), cur.get("seq")
        if isinstance(seq, int) and isinstance(cseq, int) and seq < cseq and \
                info.get("state") == cur.get("state"):
            return
        cur.update({k: v for k, v in info.items() if v is not None or k in ("eta_s", "psnr")})
        state = cur.get("state")
        if state in P.TERMINAL_STATES and jid not in self._finished:
            self._finished.add(jid)
            if state == "done":
                self._result_pending.add(jid)
                self.ensure_client().send("result", {"job_id": jid}, callback=self._on_result)
            else:
                err = cur.get("error") or {}
                msg, hint = explain(err.get("code", state), err.get("message", ""), err.get("detail", ""),
                                    endpoint=self.endpoint, log_path=self.log_path)
                self.changes.append(Change("finished", jid, {**cur, "message_text": msg, "hint": hint}))
        else:
            self.changes.append(Change("job", jid, dict(cur)))

    def _on_result(self, req: Any) -> None:
        jid = req.body.get("job_id", "")
        self._result_pending.discard(jid)
        info = self.jobs.setdefault(jid, {"job_id": jid})
        if req.ok:
            info["result"] = dict(req.reply or {})
            self.changes.append(Change("finished", jid, dict(info)))
        else:
            err = req.error or {}
            msg, hint = explain(err.get("code", ""), err.get("message", ""), endpoint=self.endpoint,
                                log_path=self.log_path)
            self.changes.append(Change("finished", jid, {**info, "result_error": err,
                                                         "message_text": msg, "hint": hint}))

    def refresh_device(self, min_age: float = 2.0) -> None:
        """Ask again while the backend is still probing its device (first seconds)."""
        dev = self.conn.server.get("device") or {}
        if self.conn.state == "connected" and dev.get("name") == "probing" and \
                time.time() - self.conn.since > min_age:
            self.conn.since = time.time()
            self.connect(force=True)

    def active(self) -> list[str]:
        return [j for j, i in self.jobs.items() if i.get("state") in ACTIVE_STATES]

    def busy(self) -> bool:
        c = self.client
        return bool(self.active() or self._result_pending or (c is not None and getattr(c, "_pending", None)))


class SessionError(Exception):
    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.hint = code, message, hint
