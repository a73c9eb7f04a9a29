"""A real local Ray cluster for the Ray executor's tests: ``ray start --head --block`` on
loopback (2 CPUs and a custom ``fake_gpu`` resource of 1, so that fractional-GPU packing
shows on a CPU-only machine), in its own process group, stopped when the session ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Ray on loopback only: with this, Ray takes 127.0.0.1 as the node's address instead of
# the machine's network address (the tests never send traffic off the machine).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, resources: str = '{"fake_gpu": 1}', prefix: list[str] | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = tempfile.mkdtemp(prefix="natlas-ray-", dir="/tmp")  # short: Ray's socket paths
        self.env = dict(os.environ, **RAY_ENV)
        ray_cli = str(Path(sys.executable).parent / "ray")
        cmd = [ray_cli, "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
               "--num-cpus=2", "--num-gpus=0", f"--resources={resources}", "--include-dashboard=false",
               f"--temp-dir={self.temp}", "--disable-usage-stats"]
        self.log = Path(self.temp) / "head.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen((prefix or []) + cmd, env=self.env, stdout=logf, stderr=logf,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start failed:\n{self.log.read_text(errors='replace')}")
            if "Ray runtime started" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"ray start did not come up:\n{self.log.read_text(errors='replace')}")

    def session_pids(self) -> list[int]:
        """Processes of this cluster still alive: everything in the session ``ray start`` leads
        (Ray's workers get process groups of their own, but stay in its session)."""
        out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
        return [int(p) for p, s in (ln.split() for ln in out.splitlines() if ln.strip())
                if int(s) == self.proc.pid]

    def stop(self) -> None:
        """SIGINT to ``ray start --block`` (it stops its processes in a few seconds), then
        SIGKILL whatever of its session is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while self.session_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.session_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        import shutil
        shutil.rmtree(self.temp, ignore_errors=True)
