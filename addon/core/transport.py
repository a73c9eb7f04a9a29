"""Framing: turning headers and blobs into signed multipart frames and back.

No sockets here (pure bytes in, bytes out) so both the server and the client use
the same checks, and tests can exercise them directly.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from . import protocol as P
from .protocol import (CLOCK_EXEMPT, MAGIC, MAX_BLOB_BYTES, MAX_BLOBS, MAX_HEADER_BYTES,
                       REPLAY_WINDOW_S, SIGNATURE_BYTES, Message, ProtocolError, pack,
                       parse_header, unpack_header)
from .signing import ReplayCache, Signer

# Reasons a message is dropped without a reply (counted by the server).
DROP_REASONS = ("malformed", "oversize", "unsigned", "bad_signature", "replay")


class Dropped(Exception):
    """A message to drop silently: the sender is not proven to hold the key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Rejected(Exception):
    """A signed message that is wrong: answer it with ``error`` when ``msg_id`` is known."""

    def __init__(self, error: ProtocolError, msg_id: str | None, kind: str | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.msg_id = msg_id
        self.kind = kind


class Codec:
    """Signs outgoing messages and checks incoming ones.

    ``replay`` (a ReplayCache) and ``check_clock`` are used by the server; the
    client keeps a smaller replay cache of its own and does not check clocks.
    """

    def __init__(self, key: bytes, *, replay: ReplayCache | None = None, check_clock: bool = False,
                 window_s: float = REPLAY_WINDOW_S, not_before: float | None = None) -> None:
        self.signer = Signer(key)
        self.replay = replay
        self.check_clock = check_clock
        self.window_s = window_s
        # messages stamped before this (e.g. before the server started) are stale
        self.not_before = not_before

    def encode(self, header: Mapping[str, Any], blobs: Sequence[bytes | memoryview] = ()) -> list:
        hbytes = pack(dict(header))
        if len(hbytes) > MAX_HEADER_BYTES:
            raise ProtocolError("too_large", f"header of {len(hbytes)} bytes exceeds {MAX_HEADER_BYTES}")
        if len(blobs) > MAX_BLOBS or any(len(b) > MAX_BLOB_BYTES for b in blobs):
            raise ProtocolError("too_large", f"at most {MAX_BLOBS} blobs of {MAX_BLOB_BYTES} bytes")
        return [MAGIC, self.signer.sign(hbytes, blobs), hbytes, *blobs]

    def decode(self, frames: Sequence[bytes | memoryview]) -> Message:
        """Verify and decode ``[MAGIC, sig, header, *blobs]``. Raises Dropped or Rejected."""
        if len(frames) < 3 or bytes(frames[0]) != MAGIC:
            raise Dropped("malformed", "not a NATLAS/1 message")
        if len(frames) > 3 + MAX_BLOBS:
            raise Dropped("oversize", f"{len(frames)} frames")
        sig, hbytes, blobs = bytes(frames[1]), frames[2], list(frames[3:])
        if len(hbytes) > MAX_HEADER_BYTES or any(len(b) > MAX_BLOB_BYTES for b in blobs):
            raise Dropped("oversize", "frame too large")
        if len(sig) != SIGNATURE_BYTES or not any(sig):
            raise Dropped("unsigned")
        if not self.signer.verify(sig, bytes(hbytes), blobs):
            raise Dropped("bad_signature")
        # From here on the sender holds the key: errors get a reply where possible.
        msg_id = kind = None
        try:
            h = unpack_header(bytes(hbytes))
            mid, kd = h.get("id"), h.get("kind")
            msg_id = mid if P.valid_id(mid) else None  # echoed in the reply: must be clean
            kind = kd if isinstance(kd, str) and 0 < len(kd) <= 64 else None
            msg = parse_header(h, [bytes(b) for b in blobs])
        except ProtocolError as e:
            raise Rejected(e, msg_id, kind) from None
        if self.replay is not None and self.replay.seen(msg.id):
            raise Dropped("replay", msg.id)
        if self.check_clock and msg.kind not in CLOCK_EXEMPT:
            now = time.time()
            if abs(now - msg.ts) > self.window_s or (self.not_before is not None and msg.ts < self.not_before):
                raise Rejected(ProtocolError(
                    "stale", f"message timestamp is {now - msg.ts:+.1f} s from the server's clock",
                    "check the clocks of both machines; the client corrects skew after hello"),
                    msg.id, msg.kind)
        return msg
