"""Key management: the signing key and CURVE certificates (``python -m backend keys ...``).

Layout of a keys folder (default: ``neural_atlas.core.signing.default_keys_dir()``)::

    signing.key              HMAC key shared by the server and its clients (0600)
    server.key               the server's CURVE public certificate (give it to clients)
    server.key_secret        the server's CURVE secret certificate (0600, never copy)
    clients/<name>.key       public certificates of the clients allowed to connect
    issued/<name>.key_secret client certificates made by ``keys add-client`` (copy, then delete)

A client machine's keys folder holds ``signing.key``, ``server.key`` and
``client.key_secret`` (its own certificate, renamed from ``issued/<name>.key_secret``).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from neural_atlas.core.signing import ensure_key, make_private_dir

SERVER_NAME = "server"


def _private(path: Path) -> None:
    if os.name == "posix":
        os.chmod(path, 0o600)


def _create_cert(folder: Path, name: str) -> tuple[Path, Path]:
    import zmq.auth
    make_private_dir(folder)
    pub, sec = zmq.auth.create_certificates(str(folder), name)
    _private(Path(sec))
    return Path(pub), Path(sec)


def init(keys_dir: Path, *, force: bool = False) -> dict[str, str]:
    """Create the signing key and the server certificate when absent."""
    make_private_dir(keys_dir)
    ensure_key(keys_dir)
    (keys_dir / "clients").mkdir(exist_ok=True)
    pub, sec = keys_dir / f"{SERVER_NAME}.key", keys_dir / f"{SERVER_NAME}.key_secret"
    if force or not (pub.exists() and sec.exists()):
        pub, sec = _create_cert(keys_dir, SERVER_NAME)
    return {"signing": str(keys_dir / "signing.key"), "server_public": str(pub),
            "server_secret": str(sec), "clients": str(keys_dir / "clients")}


def add_client(keys_dir: Path, name: str) -> dict[str, str]:
    """Make a client certificate and allow its public key."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ValueError("a client name is 1-64 characters of [A-Za-z0-9_-]")
    init(keys_dir)
    pub, sec = _create_cert(keys_dir / "issued", name)
    allowed = keys_dir / "clients" / f"{name}.key"
    shutil.copyfile(pub, allowed)
    return {"client_secret": str(sec), "client_public": str(allowed),
            "server_public": str(keys_dir / f"{SERVER_NAME}.key"),
            "signing": str(keys_dir / "signing.key")}


def server_curve(keys_dir: Path) -> tuple[bytes, bytes, Path] | None:
    """(public, secret, clients folder) when the server certificate and at least one client exist."""
    sec = keys_dir / f"{SERVER_NAME}.key_secret"
    clients = keys_dir / "clients"
    if not sec.is_file() or not clients.is_dir() or not any(clients.glob("*.key")):
        return None
    import zmq.auth
    public, secret = zmq.auth.load_certificate(str(sec))
    if not secret:
        return None
    return public, secret, clients


def curve_help(keys_dir: Path) -> str:
    return (f"create them with:\n"
            f"  python -m backend keys init --keys {keys_dir}\n"
            f"  python -m backend keys add-client NAME --keys {keys_dir}\n"
            f"then copy signing.key, server.key and issued/NAME.key_secret (as client.key_secret) "
            f"to the client's keys folder")
