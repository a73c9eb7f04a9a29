"""Hostile input against a real server: every message is answered with a clear
error or dropped silently (and counted), and the server still answers hello."""

from __future__ import annotations

import random
import time

import msgpack
import pytest
import zmq

from neural_atlas.core import protocol as P
from neural_atlas.core.transport import Codec, Dropped

WRONG_KEY = b"wrong-key-" * 4


class Raw:
    """A bare DEALER socket with the codec: sends exactly the frames it is given."""

    def __init__(self, endpoint: str, key: bytes) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.codec = Codec(key)

    def frames(self, kind: str, body=None, blobs=(), **hdr) -> list[bytes]:
        return self.codec.encode(P.make_header(kind, body, **hdr), blobs)

    def recv(self, timeout: float = 15.0):  # generous: only a missing reply waits this long
        """The next message that is not a heartbeat push (a session that said hello gets one
        every few seconds, which a slow machine sees between a request and its reply)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                return None
            msg = self.codec.decode(self.sock.recv_multipart())
            if msg is not None and msg.kind == "heartbeat" and msg.re is None:
                continue
            return msg

    def ask(self, frames: list[bytes], timeout: float = 15.0):
        self.sock.send_multipart(frames)
        return self.recv(timeout)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def raw(server):
    r = Raw(server.endpoint, server.key)
    yield r
    r.close()


def _counters(raw: Raw) -> dict:
    mid = P.new_id()
    raw.sock.send_multipart(raw.frames("hello", msg_id=mid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # skip replies to earlier messages
        reply = raw.recv(max(0.01, deadline - time.monotonic()))
        if reply is not None and reply.re == mid:
            assert reply.ok and reply.kind == "hello"
            return reply.body["counters"]
    raise AssertionError("no hello reply")


def test_unsigned_wrong_signature_and_replay_are_dropped(raw):
    f = raw.frames("status", {"job_id": "x"})
    f[1] = b""
    assert raw.ask(f, timeout=0.3) is None
    f = raw.frames("status", {"job_id": "x"})
    f[1] = b"\x00" * 32
    assert raw.ask(f, timeout=0.3) is None
    assert raw.ask(Codec(WRONG_KEY).encode(P.make_header("hello")), timeout=0.3) is None
    f = raw.frames("status", {"job_id": "x"})
    first = raw.ask(f)
    assert first is not None and first.error["code"] == "not_found"
    assert raw.ask(f, timeout=0.3) is None  # the same bytes again: a replay
    # replies themselves are signed with the installation key
    with pytest.raises(Dropped):
        Codec(WRONG_KEY).decode(raw.codec.encode(P.make_header("hello")))
    c = _counters(raw)
    assert c["dropped_unsigned"] >= 2 and c["dropped_bad_signature"] >= 1 and c["dropped_replay"] >= 1


def test_oversized_messages(server, raw):
    big = raw.frames("upload", {"upload_id": "u", "path": "a", "offset": 0}, [b"x"])
    big[3] = b"\x00" * (P.MAX_FRAME_BYTES + 1)  # over zmq.MAXMSGSIZE: libzmq drops the connection
    raw.sock.send_multipart(big)
    assert raw.recv(0.5) is None
    # a signed header over the header cap, and too many frames: dropped and counted
    hb = P.pack(P.make_header("hello", {"client": "x" * 10}) | {"pad": ["y" * 8000] * 40})
    assert len(hb) > P.MAX_HEADER_BYTES
    other = Raw(server.endpoint, server.key)
    try:
        assert other.ask([P.MAGIC, other.codec.signer.sign(hb), hb], timeout=0.3) is None
        assert other.ask(other.frames("hello") + [b"a", b"b", b"c"], timeout=0.3) is None
        c = _counters(other)
        assert c["dropped_oversize"] >= 2
        # the first socket reconnects by itself and is served again
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = raw.ask(raw.frames("ping"), timeout=0.5)
            if r is not None:
                break
        assert r is not None and r.ok
    finally:
        other.close()


def test_wrong_types_unknown_kinds_and_bad_envelopes(raw, clip_dir):
    cases = [
        (raw.frames("status", {"job_id": 12}), "bad_request"),
        (raw.frames("status", {"job_id": "a", "evil": True}), "bad_request"),
        (raw.frames("frobnicate", {}), "unknown_kind"),
        (raw.frames("progress", {"job_id": "a"}), "unknown_kind"),  # a push kind, not a request
        (raw.frames("hello", re=P.new_id(), ok=True), "unknown_kind"),  # a reply is not a request
        (raw.frames("status", {"job_id": "a"}, ts=time.time() - 10_000), "stale"),
        (raw.frames("status", {"job_id": "a"}, [b"blob"]), "bad_request"),
        (raw.frames("upload", {"upload_id": "u", "path": "a", "offset": 0}), "bad_request"),
        (raw.frames("fetch", {"job_id": "a", "path": "../job.json"}), "bad_request"),
        (raw.frames("submit", {"source": "../../etc/passwd"}), "path_not_allowed"),
        (raw.frames("submit", {"source": str(clip_dir), "preset": "demo",
                               "overrides": {"train": {"iterations": [1]}}}), "invalid_config"),
        (raw.frames("render", {"job_id": "nope", "edits": {"0": "/etc/passwd"}}), "not_found"),
        (raw.frames("list", {"states": ["weird"]}), "bad_request"),
    ]
    for body in ({"v": 99}, {"body": [1, 2]}, {"ts": "now"}, {"extra_field": 1}):
        h = P.make_header("hello") | body
        hb = P.pack(h)
        cases.append(([P.MAGIC, raw.codec.signer.sign(hb), hb],
                      "unsupported_version" if "v" in body else "bad_request"))
    for frames, code in cases:
        reply = raw.ask(frames)
        assert reply is not None, code
        assert not reply.ok and reply.error["code"] == code, (code, reply.error)
        assert set(reply.error) == {"code", "message", "detail"} and reply.error["message"]
    # signed but with no usable id: nothing to answer, dropped
    hb = P.pack({"v": 1, "kind": "hello", "ts": time.time(), "body": {}})
    assert raw.ask([P.MAGIC, raw.codec.signer.sign(hb), hb], timeout=0.3) is None
    hb = b"\xc1garbage"
    assert raw.ask([P.MAGIC, raw.codec.signer.sign(hb), hb], timeout=0.3) is None
    assert _counters(raw)["rejected_bad_request"] >= 8


def _random_value(rng: random.Random, depth: int = 0):
    pick = rng.randrange(12 if depth < 3 else 8)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if pick == 3:
        return rng.choice([0.5, -1e308, 1e-300, rng.random()])
    if pick in (4, 5):
        return rng.choice(["", "a", "../../etc/passwd", "/etc/shadow", "..", "x" * 300, "\u202e\u0000",
                           "0", "demo", "upload", "0" * 64, P.new_id(), "~/", "C:\\Windows", "a/b/../c"])
    if pick in (6, 7):
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(0, 20)))
    if pick in (8, 9):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(["source", "upload", "path", "job_id", "0", "train", "x", ""]): _random_value(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))}


def _random_body(rng: random.Random, kind: str) -> dict:
    fields = list(P.REQUESTS.get(kind, {})) + ["bogus", "path", "job_id"]
    return {rng.choice(fields): _random_value(rng) for _ in range(rng.randrange(0, 5))}


def test_ten_thousand_random_and_mutated_messages(server, raw):
    """Whatever arrives, the server stays up; every signed request with a usable id gets one
    well-formed reply (a result or a clear error). Sent in windows of WINDOW messages, each
    window's replies awaited before the next: nothing depends on how fast the server is (a
    burst of 10,000 could fill the reply queue's high-water mark, where ZeroMQ drops)."""
    rng = random.Random(20240611)
    kinds = [k for k in P.REQUESTS if k != "shutdown"] + ["", "x" * 70, "hello ", "progress", "job"]
    good = [raw.frames("status", {"job_id": "j"}), raw.frames("hello"),
            raw.frames("upload", {"upload_id": "u1", "path": "a/b", "offset": 0}, [b"data"]),
            raw.frames("list", {"states": ["done"]})]
    WINDOW = 64
    pending: dict[str, bool] = {}  # id of a signed, well-formed request -> must it be refused?
    answered = n_signed = replies = 0

    def take(msg) -> None:
        nonlocal answered, replies
        replies += 1
        assert msg.re is not None and (msg.ok or msg.error["code"] in P.ERROR_CODES), msg
        if not msg.ok:
            assert set(msg.error) == {"code", "message", "detail"} and msg.error["message"], msg.error
        if msg.re in pending:
            must_refuse = pending.pop(msg.re)
            assert not (must_refuse and msg.ok), msg
            answered += 1

    t0 = time.monotonic()
    for i in range(10_000):
        mode = rng.randrange(5)
        if mode == 0:  # random frames
            frames = [rng.randbytes(rng.randrange(0, 120)) for _ in range(rng.randrange(1, 7))]
            if rng.random() < 0.5:
                frames[0] = P.MAGIC
        elif mode == 1:  # a valid message with bytes flipped, frames dropped or truncated
            frames = list(rng.choice(good))
            j = rng.randrange(len(frames))
            b = bytearray(frames[j])
            if b and rng.random() < 0.7:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            else:
                b = b[: rng.randrange(len(b) + 1)]
            frames[j] = bytes(b)
            if rng.random() < 0.2:
                del frames[rng.randrange(1, len(frames))]
        elif mode == 2:  # signed random msgpack (any shape) as the header
            hb = P.pack(_random_value(rng) if rng.random() < 0.3 else
                        {rng.choice(["v", "kind", "id", "ts", "body", "re", "x"]): _random_value(rng)
                         for _ in range(rng.randrange(0, 7))})
            frames = [P.MAGIC, raw.codec.signer.sign(hb), hb]
            n_signed += 1
        else:  # signed, well-formed envelope, random kind and body: always answered
            kind = rng.choice(kinds)
            h = P.make_header(kind, _random_body(rng, kind), ts=time.time() + rng.choice([0, 0, 0, -500]))
            if rng.random() < 0.1:
                h["v"] = rng.choice([0, 2, -1])
            blobs = [rng.randbytes(rng.randrange(0, 64))] if rng.random() < 0.3 else []
            if kind == "upload" and rng.random() < 0.5:
                blobs = [b"x"]
            hb = P.pack(h)
            frames = [P.MAGIC, raw.codec.signer.sign(hb, blobs), hb, *blobs]
            pending[h["id"]] = kind not in P.REQUESTS or h["v"] != P.PROTOCOL_VERSION
            n_signed += 1
        raw.sock.send_multipart(frames)
        while raw.sock.poll(0):  # keep the inbox drained
            take(raw.codec.decode(raw.sock.recv_multipart()))
        if (i + 1) % WINDOW == 0 or i == 9_999:
            deadline = time.monotonic() + 120  # generous: a loaded 2-core machine
            while pending and time.monotonic() < deadline:
                if raw.sock.poll(200):
                    take(raw.codec.decode(raw.sock.recv_multipart()))
            assert not pending, f"message {i}: {len(pending)} signed requests got no reply"
    # in order on one connection: the reply to this hello comes after every message above
    c = _counters(raw)
    assert c["received"] == 10_001, c
    dropped = sum(v for k, v in c.items() if k.startswith("dropped_"))
    rejected = sum(v for k, v in c.items() if k.startswith("rejected_"))
    handled = sum(v for k, v in c.items() if k.startswith("handled_"))
    # every message ends in exactly one bucket (the hello reporting them is not counted yet)
    assert dropped + rejected + handled == c["received"] - 1
    assert c["dropped_malformed"] > 0 and c["dropped_bad_signature"] > 0 and c["rejected_bad_request"] > 0
    assert answered > 0
    print(f"fuzz: 10000 messages in {time.monotonic() - t0:.1f} s, {n_signed} signed, "
          f"{answered} well-formed requests all answered, {replies} replies, counters {c}")
    assert server.proc.poll() is None
    assert server.client().hello()["session"] == server.session
