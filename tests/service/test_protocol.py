"""The protocol, signing and framing, in-process (no sockets)."""

from __future__ import annotations

import os
import time

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from neural_atlas.core import protocol as P
from neural_atlas.core.protocol import ProtocolError, validate_body
from neural_atlas.core.signing import KeyFileError, ReplayCache, Signer, ensure_key, load_key
from neural_atlas.core.transport import Codec, Dropped, Rejected

KEY = b"k" * 32


def test_validate_body_accepts_and_rejects():
    assert validate_body("status", {"job_id": "abc-1"}) == {"job_id": "abc-1"}
    cases = [
        ("status", {}, "missing field"),
        ("status", {"job_id": 5}, "expected str"),
        ("status", {"job_id": "../x"}, "job_id must be"),
        ("status", {"job_id": "a", "extra": 1}, "unknown field"),
        ("submit", {"source": 3}, "expected str/dict"),
        ("submit", {"source": {"upload": "u1", "path": "../x"}}, "forbidden component"),
        ("submit", {"source": "/a", "frame_range": [5, 2]}, "start < stop"),
        ("submit", {"source": "/a", "watch": 1}, "expected bool"),
        ("list", {"limit": True}, "wrong type bool"),
        ("render", {"job_id": "j", "edits": {"x": "/a"}}, "layer indices"),
        ("render", {"job_id": "j", "edits": {"0": "/a"}, "formats": ["gif"]}, "png"),
        ("upload", {"upload_id": "u", "path": "/etc/passwd", "offset": 0}, "relative path"),
        ("upload", {"upload_id": "u", "path": "a/../../b", "offset": 0}, "forbidden"),
        ("upload", {"upload_id": "u", "path": "a", "offset": -1}, ">= 0"),
    ]
    for kind, body, text in cases:
        with pytest.raises(ProtocolError) as e:
            validate_body(kind, body)
        assert e.value.code == "bad_request" and text in e.value.message, (kind, body, e.value.message)
    with pytest.raises(ProtocolError) as e:
        validate_body("launch_missiles", {})
    assert e.value.code == "unknown_kind"


def test_header_limits():
    with pytest.raises(ProtocolError) as e:
        P.unpack_header(b"\x00" * (P.MAX_HEADER_BYTES + 1))
    assert e.value.code == "too_large"
    for bad in [b"\x91" * 5000 + b"\x00",  # nesting
                msgpack.packb({"a": float("nan")}), msgpack.packb({1: 2}, strict_types=False),
                msgpack.packb({"b": b"bytes"}, use_bin_type=True), msgpack.packb([1, 2]),
                msgpack.packb({"x": msgpack.ExtType(5, b"zz")}), msgpack.packb({"a": 1}) + b"\x01",
                b"\xc1", b""]:
        with pytest.raises(ProtocolError):
            P.unpack_header(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_unpack_header_never_raises_anything_else(data):
    try:
        h = P.unpack_header(data)
        P.parse_header(h, [])
    except ProtocolError:
        pass


_plain = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                      lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(P.REQUESTS)), st.dictionaries(st.text(max_size=12), _plain, max_size=5))
def test_validate_body_only_raises_protocol_errors(kind, body):
    try:
        validate_body(kind, body)
    except ProtocolError as e:
        assert e.code in P.ERROR_CODES


def test_codec_sign_verify_replay_and_clock():
    server = Codec(KEY, replay=ReplayCache(60), check_clock=True, window_s=60)
    client = Codec(KEY)
    frames = client.encode(P.make_header("status", {"job_id": "j1"}), [])
    msg = server.decode(frames)
    assert msg.kind == "status" and msg.body == {"job_id": "j1"}
    with pytest.raises(Dropped) as e:
        server.decode(frames)
    assert e.value.reason == "replay"
    # a flipped bit anywhere: bad signature; no signature: unsigned; wrong key: bad signature
    f2 = client.encode(P.make_header("status", {"job_id": "j2"}))
    f2[2] = f2[2][:-1] + bytes([f2[2][-1] ^ 1])
    with pytest.raises(Dropped, match="bad_signature"):
        server.decode(f2)
    f3 = client.encode(P.make_header("ping"))
    f3[1] = b"\x00" * 32
    with pytest.raises(Dropped, match="unsigned"):
        server.decode(f3)
    with pytest.raises(Dropped, match="bad_signature"):
        server.decode(Codec(b"x" * 32).encode(P.make_header("ping")))
    # blobs are covered by the signature, with their lengths (no splicing)
    f4 = client.encode(P.make_header("upload", {"upload_id": "u", "path": "a", "offset": 0}), [b"abc"])
    f4[3] = b"abd"
    with pytest.raises(Dropped, match="bad_signature"):
        server.decode(f4)
    # stale timestamps get a replyable rejection (except hello/ping, which teach the clock)
    old = client.encode(P.make_header("status", {"job_id": "j3"}, ts=time.time() - 3600))
    with pytest.raises(Rejected) as r:
        server.decode(old)
    assert r.value.error.code == "stale" and r.value.msg_id
    assert server.decode(client.encode(P.make_header("hello", ts=time.time() - 3600))).kind == "hello"
    with pytest.raises(Dropped, match="malformed"):
        server.decode([b"hello"])


def test_signer_and_replay_cache_bounds():
    s = Signer(KEY)
    assert s.verify(s.sign(b"h", [b"a", b"b"]), b"h", [b"a", b"b"])
    assert not s.verify(s.sign(b"h", [b"ab"]), b"h", [b"a", b"b"])
    with pytest.raises(ValueError):
        Signer(b"short")
    rc = ReplayCache(window_s=10, max_entries=100)
    for i in range(1000):
        assert not rc.seen(f"id{i}", now=float(i) / 1000)
    assert len(rc) <= 100
    assert rc.seen("id999", now=1.0)


def test_key_file_is_private(tmp_path):
    key = ensure_key(tmp_path / "k")
    assert len(key) == 32 and load_key(tmp_path / "k") == key
    f = tmp_path / "k" / "signing.key"
    if os.name == "posix":
        assert f.stat().st_mode & 0o777 == 0o600
        os.chmod(f, 0o644)
        with pytest.raises(KeyFileError, match="chmod 600"):
            load_key(tmp_path / "k")
    with pytest.raises(KeyFileError, match="keys init"):
        load_key(tmp_path / "missing")


def test_loopback_detection():
    for ep in ["tcp://127.0.0.1:5557", "tcp://127.1.2.3:1", "tcp://localhost:1", "tcp://[::1]:5",
               "ipc:///tmp/x"]:
        assert P.is_loopback_endpoint(ep), ep
    for ep in ["tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://192.168.1.2:1", "tcp://example.com:1",
               "tcp://127.0.0.1.evil.com:1", "tcp://eth0;127.0.0.1:1", "udp://127.0.0.1:1"]:
        assert not P.is_loopback_endpoint(ep), ep
