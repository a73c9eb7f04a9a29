"""The wire protocol between the Blender add-on (and other tools) and the backend.

One definition used by both sides: message kinds, their fields, limits, error
codes and the framing. Standard library and msgpack only (no zmq, no torch, no
bpy), so the backend imports it as ``neural_atlas.core.protocol`` and the add-on
ships the same file. docs/protocol.md is the human reference.

A message is one ZeroMQ multipart message::

    [MAGIC, signature, header, blob_0, ..., blob_n]      (a ROUTER sees [identity, ...] first)

* ``MAGIC`` names the protocol family and framing (``b"NATLAS/1"``).
* ``signature`` is HMAC-SHA256 over the header and every blob (``signing.py``).
* ``header`` is msgpack: ``{"v", "kind", "id", "ts", "body", ["re", "ok", "error", "session"]}``.
* blobs are raw bytes (upload chunks, fetched file chunks): never inside msgpack.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import msgpack

# ------------------------------------------------------------------ versions
PROTOCOL_VERSION = 1
PROTOCOL_MIN = 1  # oldest version a peer of this version still accepts
MAGIC = b"NATLAS/1"

# -------------------------------------------------------------------- limits
MAX_HEADER_BYTES = 256 * 1024  # msgpack header (Unpacker max_buffer_size)
MAX_STR_LEN = 8 * 1024  # any string inside a header
MAX_ARRAY_LEN = 4096
MAX_MAP_LEN = 512
MAX_DEPTH = 12  # nesting of maps/arrays inside a header
MAX_BLOBS = 2  # raw frames after the header
CHUNK_BYTES = 4 * 1024 * 1024  # default upload/fetch chunk
MAX_BLOB_BYTES = 8 * 1024 * 1024  # one raw frame
MAX_FRAME_BYTES = MAX_BLOB_BYTES + 1024  # zmq.MAXMSGSIZE (libzmq checks each frame)
MAX_FRAMES = 3 + MAX_BLOBS  # magic, signature, header, blobs
MAX_UPLOAD_BYTES = 64 * 1024 * 1024 * 1024  # one upload session (all files)
MAX_UPLOAD_FILES = 20_000
MAX_PATH_LEN = 4096
MAX_PROBE_BYTES = 4096  # the shared-files probe reads at most this much
SIGNATURE_BYTES = 32
REPLAY_WINDOW_S = 120.0  # a request's ts must be within this of the server's clock
HEARTBEAT_S = 2.0  # server -> watching clients
DEFAULT_PORT = 5557
DEFAULT_ENDPOINT = f"tcp://127.0.0.1:{DEFAULT_PORT}"

LIMITS = {
    "max_header_bytes": MAX_HEADER_BYTES,
    "max_str_len": MAX_STR_LEN,
    "max_blob_bytes": MAX_BLOB_BYTES,
    "max_blobs": MAX_BLOBS,
    "chunk_bytes": CHUNK_BYTES,
    "max_upload_bytes": MAX_UPLOAD_BYTES,
    "max_upload_files": MAX_UPLOAD_FILES,
    "replay_window_s": REPLAY_WINDOW_S,
    "heartbeat_s": HEARTBEAT_S,
}

# --------------------------------------------------------------- error codes
ERROR_CODES = {
    "bad_request": "a field is missing, of the wrong type or out of range",
    "unknown_kind": "the message kind is not part of this protocol",
    "unsupported_version": "the peer speaks a protocol version this side does not",
    "stale": "the message timestamp is outside the replay window (clock skew?)",
    "too_large": "a message, frame or upload exceeds a limit",
    "not_found": "no such job, upload or file",
    "path_not_allowed": "a path is outside the server's allowed roots, or does not exist",
    "bad_state": "the job is not in a state that allows this (e.g. result of a running job)",
    "invalid_config": "the settings do not form a valid configuration",
    "invalid_input": "the engine rejected the clip, masks or edits",
    "upload_error": "an upload is incomplete or its checksum does not match",
    "cancelled": "the job was cancelled",
    "worker_crashed": "the worker process died without reporting",
    "internal": "a bug or an unexpected failure in the backend (see its log)",
    "shutting_down": "the backend is shutting down",
    "quota_exceeded": "an upload would take more of the backend's disk than its per-job or store quota allows",
    # client-side only
    "unreachable": "the backend did not answer (not running, wrong endpoint, firewall, wrong keys)",
    "timeout": "a blocking call gave up waiting",
}

# ------------------------------------------------------------------ job model
JOB_KINDS = ("decompose", "render", "paint_frame")
JOB_STATES = ("queued", "running", "cancelling", "done", "failed", "cancelled")
TERMINAL_STATES = ("done", "failed", "cancelled")
PHASES = ("queued", "load", "flow", "pretrain", "train", "export", "bake", "render", "paint", "done")

# Fields of a job as reported by status/list/job pushes (JobInfo).
JOB_FIELDS = (
    "job_id", "kind", "state", "name", "parent", "created", "updated", "phase", "iteration",
    "iterations", "fraction", "eta_s", "psnr", "message", "error", "attempts", "resumed_from",
    "seq",
    "placement",  # where the job runs: {executor, host|node, gpu|gpus, slot|resources, pid}
)


class ProtocolError(Exception):
    """A message that cannot be accepted. ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail

    def to_dict(self) -> dict[str, str]:
        return error_dict(self.code, self.message, self.detail)


def error_dict(code: str, message: str, detail: str = "") -> dict[str, str]:
    return {"code": str(code), "message": str(message), "detail": str(detail)}


# ------------------------------------------------------------------- schemas
# A field spec: (types, required, check) where check(value) -> error text or "".
_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_BOOL = (bool,)
_MAP = (dict,)
_LIST = (list,)


def _id_check(v: str) -> str:
    if not (1 <= len(v) <= 64) or not all(c.isascii() and (c.isalnum() or c in "-_") for c in v):
        return "must be 1-64 characters of [A-Za-z0-9_-]"
    return ""


def valid_id(v: Any) -> bool:
    """A message, job or upload id: 1-64 characters of [A-Za-z0-9_-]."""
    return isinstance(v, str) and not _id_check(v)


def _path_check(v: str) -> str:
    if not v or len(v) > MAX_PATH_LEN or "\x00" in v:
        return f"must be a non-empty path of at most {MAX_PATH_LEN} characters"
    return ""


def _source_check(v: Any) -> str:
    """A clip/mask/edit source: a path on the server, or {"upload": id, "path": relpath}."""
    if isinstance(v, str):
        return _path_check(v)
    if isinstance(v, dict):
        if set(v) - {"upload", "path"} or not isinstance(v.get("upload"), str):
            return 'must be a path or {"upload": upload_id, "path": relative path}'
        if _id_check(v["upload"]):
            return "upload id " + _id_check(v["upload"])
        p = v.get("path", "")
        if not isinstance(p, str) or (p and _relpath_check(p)):
            return "path " + (_relpath_check(p) if isinstance(p, str) else "must be a string")
        return ""
    return 'must be a path or {"upload": upload_id, "path": relative path}'


def _relpath_check(v: str) -> str:
    """A relative path inside an upload: no absolute paths, no '..', no odd characters."""
    if not v or len(v) > 1024 or "\x00" in v or "\\" in v or v.startswith("/"):
        return "must be a relative path with '/' separators"
    parts = v.split("/")
    for part in parts:
        if part in ("", ".", "..") or len(part) > 255 or ":" in part:
            return f"has a forbidden component {part!r}"
        if any(ord(c) < 32 for c in part):
            return "has control characters"
    return ""


def _frame_range_check(v: list) -> str:
    if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return "must be [start, stop] integers"
    if v[0] < 0 or v[1] <= v[0]:
        return "must satisfy 0 <= start < stop"
    return ""


def _nonneg(v: Any) -> str:
    return "" if v >= 0 else "must be >= 0"


def _positive(v: Any) -> str:
    return "" if v > 0 else "must be > 0"


def _sha256_check(v: str) -> str:
    return "" if len(v) == 64 and all(c in "0123456789abcdef" for c in v) else "must be 64 hex digits"


def _hashes_check(v: list) -> str:
    if len(v) > MAX_ARRAY_LEN:
        return f"at most {MAX_ARRAY_LEN} digests"
    for x in v:
        if not isinstance(x, str) or _sha256_check(x):
            return "must be a list of sha256 digests (64 hex digits)"
    return ""


def _job_ids_check(v: list) -> str:
    if len(v) > 1024:
        return "at most 1024 ids"
    for x in v:
        if not isinstance(x, str) or _id_check(x):
            return "must be a list of job ids"
    return ""


def _masks_check(v: list) -> str:
    if len(v) > 64:
        return "at most 64 mask sources"
    for x in v:
        e = _source_check(x)
        if e:
            return "each mask " + e
    return ""


def _overrides_check(v: dict) -> str:
    for section, fields in v.items():
        if not isinstance(fields, dict):
            return f"section {section!r} must be a map of field -> value"
    return ""


def _edits_check(v: dict) -> str:
    if not v:
        return "must name at least one layer"
    for k, src in v.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 3):
            return f"keys must be layer indices as strings ('0', '1', ...), got {k!r}"
        e = _source_check(src)
        if e:
            return f"layer {k}: " + e
    return ""


def _opacity_check(v: dict) -> str:
    """Per edit layer its per-frame opacity: {"<layer>": [o_0, ...]} or {"<layer>": {"<frame>": o}},
    every o a number in [0, 1]. The engine checks the lengths against the shot."""
    for k, curve in v.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 3):
            return f"keys must be layer indices as strings ('0', '1', ...), got {k!r}"
        if isinstance(curve, dict):
            items = list(curve.items())
            if any(not (f.isascii() and f.isdigit() and len(f) <= 7) for f, _ in items):
                return f"layer {k}: frame keys must be frame indices as strings ('0', '12', ...)"
        elif isinstance(curve, list):
            items = list(enumerate(curve))
        else:
            return f"layer {k}: must be a list of per-frame values or a map frame -> value"
        for f, o in items:
            if isinstance(o, bool) or not isinstance(o, (int, float)) or not 0.0 <= o <= 1.0:
                return f"layer {k}, frame {f}: opacity must be a number in [0, 1]"
    return ""


def _formats_check(v: list) -> str:
    if not v or any(x not in ("png", "mp4", "exr") for x in v):
        return "must be a non-empty list of 'png', 'mp4', 'exr'"
    return ""


def _states_check(v: list) -> str:
    return "" if all(x in JOB_STATES for x in v) else f"must be a list of {', '.join(JOB_STATES)}"


def _one_of(*choices: str):
    def check(v: str) -> str:
        return "" if v in choices else f"must be one of {', '.join(choices)}"
    return check


def _source_type(v: Any) -> bool:
    return isinstance(v, (str, dict))


# kind -> {field: (types, required, check)}
REQUESTS: dict[str, dict[str, tuple]] = {
    "hello": {"client": (_STR, False, None)},
    "ping": {},
    "submit": {
        "source": ((str, dict), True, _source_check),
        "masks": (_LIST, False, _masks_check),
        "frame_range": (_LIST, False, _frame_range_check),
        "preset": (_STR, False, None),
        "overrides": (_MAP, False, _overrides_check),
        "token": (_STR, False, _id_check),
        "name": (_STR, False, None),
        "watch": (_BOOL, False, None),
    },
    "upload_begin": {"size": (_INT, True, _nonneg), "files": (_INT, False, _nonneg),
                     "linked": (_INT, False, _nonneg)},  # bytes placed from the blob store (upload_link)
    # which of these sha256 digests the backend's blob store holds (content already there)
    "upload_have": {"hashes": (_LIST, True, _hashes_check)},
    # place a file the blob store holds (by digest) into an upload, instead of sending it
    "upload_link": {
        "upload_id": (_STR, True, _id_check),
        "path": (_STR, True, _relpath_check),
        "sha256": (_STR, True, _sha256_check),
    },
    # where an upload stands (after a reconnect): bytes received in all, and of `path`
    "upload_status": {"upload_id": (_STR, True, _id_check), "path": (_STR, False, _relpath_check)},
    "upload_abort": {"upload_id": (_STR, True, _id_check)},  # drop an unfinished upload now
    # can the backend read `path` (a small file the client just wrote) with this content?
    # no: the two machines do not share files, and the client uploads what a job needs
    "probe": {"path": (_STR, True, _path_check), "sha256": (_STR, True, _sha256_check)},
    "upload": {
        "upload_id": (_STR, True, _id_check),
        "path": (_STR, True, _relpath_check),
        "offset": (_INT, True, _nonneg),
        "sha256": (_STR, False, _sha256_check),  # on a file's last chunk: the whole file's digest
    },
    "upload_end": {
        "upload_id": (_STR, True, _id_check),
        "files": (_INT, True, _nonneg),  # number of files sent
        "size": (_INT, True, _nonneg),  # total bytes sent
    },
    "status": {"job_id": (_STR, True, _id_check), "watch": (_BOOL, False, None)},
    "watch": {"job_ids": (_LIST, True, _job_ids_check), "all": (_BOOL, False, None)},
    "cancel": {"job_id": (_STR, True, _id_check)},
    "list": {"states": (_LIST, False, _states_check), "offset": (_INT, False, _nonneg),
             "limit": (_INT, False, _positive)},
    "result": {"job_id": (_STR, True, _id_check)},
    "fetch": {
        "job_id": (_STR, True, _id_check),
        "path": (_STR, True, _relpath_check),
        "offset": (_INT, False, _nonneg),
        "length": (_INT, False, _positive),
    },
    "render": {
        "job_id": (_STR, True, _id_check),
        "edits": (_MAP, True, _edits_check),
        "mode": (_STR, False, _one_of("delta", "replace")),
        "frame_range": (_LIST, False, _frame_range_check),
        "formats": (_LIST, False, _formats_check),
        "opacity": (_MAP, False, _opacity_check),
        "token": (_STR, False, _id_check),
        "name": (_STR, False, None),
        "watch": (_BOOL, False, None),
    },
    # paint on frame `frame` of a done decomposition: `image` (RGBA, straight alpha) goes into the
    # layers' edit images, painted over `edits` when given; the job's out/edits/ holds the result
    "paint_frame": {
        "job_id": (_STR, True, _id_check),
        "frame": (_INT, True, _nonneg),
        "image": ((str, dict), True, _source_check),
        "layer": (_INT, False, _nonneg),
        "edits": (_MAP, False, _edits_check),
        "token": (_STR, False, _id_check),
        "name": (_STR, False, None),
        "watch": (_BOOL, False, None),
    },
    "delete": {"job_id": (_STR, True, _id_check)},
    "shutdown": {},
}

# Messages the server sends without a request (no "re" field).
PUSHES = ("progress", "job", "heartbeat")

# Requests that do not change state, exempt from the timestamp window so that a
# client can learn the server's clock (and its skew) with its first hello.
READ_ONLY = frozenset({"hello", "ping", "status", "list", "result", "fetch", "watch", "upload_have",
                       "upload_status", "probe"})
CLOCK_EXEMPT = frozenset({"hello", "ping"})
# Requests that carry raw blobs: kind -> number of blobs required.
BLOBS_REQUIRED = {"upload": 1}


def validate_body(kind: str, body: Any) -> dict[str, Any]:
    """Check a request body against its schema; raise ProtocolError or return it."""
    schema = REQUESTS.get(kind)
    if schema is None:
        raise ProtocolError("unknown_kind", f"unknown message kind {kind!r}",
                            f"known kinds: {', '.join(sorted(REQUESTS))}")
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", f"{kind}: body must be a map")
    for name in body:
        if name not in schema:
            raise ProtocolError("bad_request", f"{kind}: unknown field {name!r}",
                                f"fields: {', '.join(schema) or '(none)'}")
    for name, (types, required, check) in schema.items():
        if name not in body or body[name] is None:
            if required:
                raise ProtocolError("bad_request", f"{kind}: missing field {name!r}")
            continue
        v = body[name]
        if isinstance(v, bool) and bool not in types:
            raise ProtocolError("bad_request", f"{kind}.{name}: wrong type bool")
        if not isinstance(v, types):
            want = "/".join(t.__name__ for t in types)
            raise ProtocolError("bad_request", f"{kind}.{name}: expected {want}, got {type(v).__name__}")
        if isinstance(v, str) and check is None and len(v) > MAX_STR_LEN:
            raise ProtocolError("too_large", f"{kind}.{name}: string too long")
        if check is not None:
            err = check(v)
            if err:
                raise ProtocolError("bad_request", f"{kind}.{name} {err}")
    return body


# ------------------------------------------------------------------- headers
@dataclass
class Message:
    """A decoded message: its header fields and raw blobs."""

    kind: str
    id: str
    ts: float
    body: dict[str, Any]
    blobs: list[bytes]
    re: str | None = None  # the request id this replies to
    ok: bool = True
    error: dict[str, str] | None = None
    session: str | None = None
    v: int = PROTOCOL_VERSION

    @property
    def is_reply(self) -> bool:
        return self.re is not None


def new_id() -> str:
    return uuid.uuid4().hex


def make_header(kind: str, body: Mapping[str, Any] | None = None, *, msg_id: str | None = None,
                ts: float | None = None, re: str | None = None, ok: bool | None = None,
                error: Mapping[str, str] | None = None, session: str | None = None) -> dict:
    h: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "id": msg_id or new_id(),
        "ts": time.time() if ts is None else float(ts),
        "body": dict(body or {}),
    }
    if re is not None:
        h["re"] = re
        h["ok"] = bool(ok) if ok is not None else error is None
    if error is not None:
        h["error"] = dict(error)
    if session is not None:
        h["session"] = session
    return h


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _ext_hook(code: int, data: bytes) -> Any:
    raise ProtocolError("bad_request", "msgpack extension types are not accepted")


def unpack_header(data: bytes) -> dict[str, Any]:
    """Decode a header with explicit size caps. Raises ProtocolError."""
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, use_list=True, max_buffer_size=MAX_HEADER_BYTES,
        max_str_len=MAX_STR_LEN, max_bin_len=0, max_array_len=MAX_ARRAY_LEN,
        max_map_len=MAX_MAP_LEN, max_ext_len=0, ext_hook=_ext_hook, timestamp=0,
    )
    try:
        unpacker.feed(data)
        obj = unpacker.unpack()
        try:
            unpacker.unpack()
        except msgpack.OutOfData:
            pass
        else:
            raise ProtocolError("bad_request", "trailing data after the header")
    except ProtocolError:
        raise
    except (msgpack.OutOfData, ValueError, TypeError, UnicodeDecodeError, msgpack.StackError,
            msgpack.BufferFull, msgpack.ExtraData, OverflowError, RecursionError) as e:
        raise ProtocolError("bad_request", "header is not valid msgpack", type(e).__name__) from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "header must be a map")
    _check_plain(obj, 0)
    return obj


def _check_plain(obj: Any, depth: int) -> None:
    """Only maps with str keys, lists, str, int, finite float, bool, None; bounded depth."""
    if depth > MAX_DEPTH:
        raise ProtocolError("bad_request", f"header nested deeper than {MAX_DEPTH}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ProtocolError("bad_request", "map keys must be strings")
            _check_plain(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_plain(v, depth + 1)
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise ProtocolError("bad_request", "floats must be finite")
    elif isinstance(obj, int):
        if not -(2**63) <= obj < 2**64:
            raise ProtocolError("bad_request", "integer out of range")
    elif obj is None or isinstance(obj, (str, bool)):
        return
    else:
        raise ProtocolError("bad_request", f"type {type(obj).__name__} is not accepted")


def parse_header(h: dict[str, Any], blobs: list[bytes]) -> Message:
    """Check the envelope fields of a decoded header (not the body schema)."""
    v = h.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError("bad_request", "header.v must be an integer")
    if not PROTOCOL_MIN <= v <= PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version",
                            f"protocol version {v} is not supported (this side: "
                            f"{PROTOCOL_MIN}..{PROTOCOL_VERSION})",
                            "update the add-on or the backend so that both match")
    kind, mid, ts, body = h.get("kind"), h.get("id"), h.get("ts"), h.get("body", {})
    if not isinstance(kind, str) or not kind or len(kind) > 64:
        raise ProtocolError("bad_request", "header.kind must be a short string")
    if not isinstance(mid, str) or _id_check(mid):
        raise ProtocolError("bad_request", "header.id must be 1-64 characters of [A-Za-z0-9_-]")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise ProtocolError("bad_request", "header.ts must be a number")
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "header.body must be a map")
    extra = set(h) - {"v", "kind", "id", "ts", "body", "re", "ok", "error", "session"}
    if extra:
        raise ProtocolError("bad_request", f"unknown header fields: {', '.join(sorted(extra))}")
    re_ = h.get("re")
    if re_ is not None and (not isinstance(re_, str) or _id_check(re_)):
        raise ProtocolError("bad_request", "header.re must be a message id")
    err = h.get("error")
    if err is not None and not (isinstance(err, dict) and all(isinstance(x, str) for x in err.values())):
        raise ProtocolError("bad_request", "header.error must be {code, message, detail} strings")
    sess = h.get("session")
    if sess is not None and not isinstance(sess, str):
        raise ProtocolError("bad_request", "header.session must be a string")
    return Message(kind=kind, id=mid, ts=float(ts), body=body, blobs=blobs, re=re_,
                   ok=bool(h.get("ok", err is None)), error=err, session=sess, v=v)


def check_blobs(kind: str, blobs: list[bytes]) -> None:
    need = BLOBS_REQUIRED.get(kind, 0)
    if len(blobs) != need:
        raise ProtocolError("bad_request", f"{kind} takes {need} raw frame(s), got {len(blobs)}")


# ------------------------------------------------------------------- helpers
def is_loopback_endpoint(endpoint: str) -> bool:
    """True for endpoints reachable only from this machine (127.0.0.0/8, ::1, localhost, ipc)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    rest = endpoint[len("tcp://"):]
    if ";" in rest:  # source-address syntax: source;destination
        return False
    if rest.startswith("["):
        host = rest[1:rest.find("]")] if "]" in rest else ""
    else:
        host = rest.rsplit(":", 1)[0]
    if host in ("localhost", "::1", "lo"):
        return True
    parts = host.split(".")
    return (len(parts) == 4 and parts[0] == "127"
            and all(p.isdigit() and 0 <= int(p) <= 255 for p in parts))


def job_summary(job: Mapping[str, Any]) -> dict[str, Any]:
    """The JobInfo subset of a job record, with every JOB_FIELDS key present."""
    return {k: job.get(k) for k in JOB_FIELDS}


def iter_files(root: str) -> Iterable[tuple[str, str]]:
    """(absolute path, '/'-separated relative path) of every regular file under root, sorted.

    A single file yields itself with its base name as the relative path.
    Symbolic links are not followed.
    """
    if os.path.isfile(root):
        yield root, os.path.basename(root)
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            yield full, rel
