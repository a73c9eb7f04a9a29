"""Message signing (HMAC-SHA256), the per-installation key file and the replay cache.

As in Jupyter's kernel protocol, every message carries an HMAC of its content
under a shared secret kept in an owner-only file. The digest covers the header
and every raw blob, each prefixed with its length so frames cannot be spliced.
Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

from .protocol import SIGNATURE_BYTES

SIGNING_KEY_FILE = "signing.key"
KEY_BYTES = 32
ENV_KEYS_DIR = "NEURAL_ATLAS_KEYS"


class KeyFileError(Exception):
    """The key file is missing, malformed or readable by other users."""


def default_keys_dir() -> Path:
    """Where keys live unless told otherwise: $NEURAL_ATLAS_KEYS, else the user config dir."""
    env = os.environ.get(ENV_KEYS_DIR)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "neural-atlas" / "keys"


def _check_private(path: Path) -> None:
    if os.name != "posix":
        return  # Windows: the file lives in the user's profile; ACLs are not checked here
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path} is readable by other users; run: chmod 600 {path}")


def make_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.name == "posix":
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never readable by others, even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_key(keys_dir: str | Path | None = None) -> bytes:
    """Read the signing key from ``keys_dir/signing.key`` (hex). Raises KeyFileError."""
    path = Path(keys_dir or default_keys_dir()) / SIGNING_KEY_FILE
    try:
        _check_private(path)
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise KeyFileError(
            f"no signing key at {path}; start the backend once, or run "
            f"`python -m backend keys init --keys {path.parent}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read {path}: {e}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{path} does not hold a hex key") from None
    if len(key) < 16:
        raise KeyFileError(f"{path} holds a key shorter than 16 bytes")
    return key


def ensure_key(keys_dir: str | Path | None = None) -> bytes:
    """Load the signing key, creating a new random one (mode 0600) when absent."""
    d = Path(keys_dir or default_keys_dir())
    path = d / SIGNING_KEY_FILE
    if not path.exists():
        make_private_dir(d)
        write_private(path, (secrets.token_hex(KEY_BYTES) + "\n").encode("ascii"))
    return load_key(d)


class Signer:
    """HMAC-SHA256 over [len(header), header, len(blob), blob, ...]."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
            raise ValueError("the signing key must be at least 16 bytes")
        self._key = bytes(key)

    def sign(self, header: bytes, blobs: Iterable[bytes | memoryview] = ()) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        mac.update(len(header).to_bytes(8, "big"))
        mac.update(header)
        for b in blobs:
            mac.update(len(b).to_bytes(8, "big"))
            mac.update(b)
        return mac.digest()

    def verify(self, signature: bytes, header: bytes, blobs: Iterable[bytes | memoryview] = ()) -> bool:
        if len(signature) != SIGNATURE_BYTES:
            return False
        return hmac.compare_digest(signature, self.sign(header, blobs))


class ReplayCache:
    """Remembers message ids seen within the replay window (bounded, oldest evicted).

    Together with the timestamp window this rejects replays: a message older than
    the window is refused by timestamp, a newer one by its id.
    """

    def __init__(self, window_s: float, max_entries: int = 200_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, msg_id: str, now: float | None = None) -> bool:
        """True if ``msg_id`` was already seen; otherwise remember it and return False."""
        now = time.monotonic() if now is None else now
        if msg_id in self._seen:
            return True
        self._seen[msg_id] = now
        horizon = now - 2 * self.window_s
        while self._seen:
            first_id, t = next(iter(self._seen.items()))
            if t >= horizon and len(self._seen) <= self.max_entries:
                break
            self._seen.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._seen)
