"""Real server processes on loopback for the service tests (never a mock).

``server_factory(...)`` starts ``python -m backend.service serve`` on a free
port (``tcp://127.0.0.1:*``; the bound endpoint is read back from
WORKSPACE/server.json) in its own process group; every process started is
killed, group and all, when the test ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neural_atlas.core.client import Client
from neural_atlas.core.signing import load_key

ROOT = Path(__file__).resolve().parents[2]
FAKE_ENGINE = "tests.service.fake_engine"


class ServerProc:
    def __init__(self, workspace: Path, keys: Path, *, endpoint: str = "tcp://127.0.0.1:*",
                 engine: str | None = FAKE_ENGINE, extra: list[str] | None = None,
                 probe_device: bool = False, env: dict | None = None) -> None:
        self.workspace, self.keys = workspace, keys
        self.args = [sys.executable, "-m", "backend.service", "serve", "--endpoint", endpoint,
                     "--workspace", str(workspace), "--keys", str(keys), *(extra or [])]
        if not probe_device:
            self.args.append("--no-device-probe")
        self.env = dict(os.environ, **(env or {}))
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        if engine:
            self.env["NEURAL_ATLAS_ENGINE"] = engine
        else:
            self.env.pop("NEURAL_ATLAS_ENGINE", None)
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.log = workspace.parent / f"{workspace.name}-server.log"

    def start(self, wait: bool = True) -> "ServerProc":
        self.workspace.mkdir(parents=True, exist_ok=True)
        info = self.workspace / "server.json"
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.args, cwd=str(ROOT), env=self.env, stdout=logf, stderr=logf,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        if not wait:
            return self
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                d = json.loads(info.read_text())
                if d.get("pid") == self.proc.pid:
                    self.endpoint = d["endpoint"]
                    self.session = d["session"]
                    return self
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            time.sleep(0.02)
        raise RuntimeError(f"server did not start:\n{self.read_log()}")

    def read_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def client(self, **kw) -> Client:
        kw.setdefault("timeout", 3.0)
        kw.setdefault("retries", 1)
        if "key" not in kw:
            kw["keys_dir"] = self.keys
        return Client(self.endpoint, **kw)

    @property
    def key(self) -> bytes:
        return load_key(self.keys)

    def kill9(self) -> None:
        """SIGKILL the server process only (its worker notices and stops by itself)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and any worker it started
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def server_factory(tmp_path):
    procs: list[ServerProc] = []
    clients: list[Client] = []

    def make(workspace: Path | None = None, keys: Path | None = None, start: bool = True, **kw) -> ServerProc:
        s = ServerProc(workspace or tmp_path / "ws", keys or tmp_path / "keys", **kw)
        procs.append(s)
        if start:
            s.start()
        orig = s.client

        def client(**ckw) -> Client:
            c = orig(**ckw)
            clients.append(c)
            return c
        s.client = client  # type: ignore[method-assign]
        return s

    yield make
    for c in clients:
        try:
            c.close()
        except Exception:
            pass
    for s in procs:
        s.cleanup()


@pytest.fixture
def server(server_factory):
    return server_factory()


@pytest.fixture
def clip_dir(tmp_path) -> Path:
    """A 'clip' for the fake engine: a folder with a file, under the server's allowed roots (home)."""
    d = tmp_path / "ws" / "clips" / "shot1"
    d.mkdir(parents=True)
    (d / "00000.png").write_bytes(b"fake frame")
    return d


def fast(iterations: int = 50, every: int = 10) -> dict:
    return {"train": {"iterations": iterations, "checkpoint_every": every}}


# ------------------------------------------------------------------ Ray (farm)
@pytest.fixture(scope="session")
def ray_head():
    """One real local Ray cluster for every Ray test of the session (loopback, 2 CPUs, a
    ``fake_gpu`` resource of 1), stopped at the end. Skipped only where Ray is not installed."""
    pytest.importorskip("ray", reason="the Ray executor's tests need `pip install neural-atlas[ray]`")
    from .ray_cluster import RayHead
    head = RayHead()
    yield head
    head.stop()
