"""Start and stop a local backend process (no bpy here).

The add-on starts ``<python> <args...> --endpoint E --workspace W --parent-pid P``
(default args ``-m backend serve``) with stdout/stderr going to a log file, so the
backend exits when Blender dies, and the artist can read the log.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import Optional


@dataclass
class LocalBackend:
    proc: subprocess.Popen
    command: list[str]
    log_path: str
    endpoint: str
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def exit_code(self) -> Optional[int]:
        return self.proc.poll()

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class LaunchError(RuntimeError):
    pass


def build_command(python: str, args: str, endpoint: str, workspace: str,
                  keys_dir: str = "", parent_pid: Optional[int] = None,
                  allow_roots: Optional[list[str]] = None) -> list[str]:
    if not python:
        raise LaunchError("set the backend's Python interpreter in the add-on preferences "
                          "(the python of the environment where the backend is installed)")
    if not os.path.isfile(python) or not os.access(python, os.X_OK):
        raise LaunchError(f"the backend Python {python!r} does not exist or is not executable")
    cmd = [python, *shlex.split(args or "-m backend serve", posix=(os.name != "nt"))]
    cmd += ["--endpoint", endpoint, "--workspace", workspace,
            "--parent-pid", str(parent_pid if parent_pid is not None else os.getpid())]
    if keys_dir:
        cmd += ["--keys", keys_dir]
    # the add-on's own folders (edits, rasterised masks: the first root) are always readable;
    # the other defaults (the user's home, for clips) only when the arguments name no roots
    roots = list(allow_roots or [])
    for root in roots if "--allow-root" not in cmd else roots[:1]:
        cmd += ["--allow-root", root]
    return cmd


def start(python: str, args: str, endpoint: str, workspace: str, log_path: str,
          keys_dir: str = "", env: Optional[dict] = None,
          allow_roots: Optional[list[str]] = None) -> LocalBackend:
    cmd = build_command(python, args, endpoint, workspace, keys_dir, allow_roots=allow_roots)
    os.makedirs(workspace, exist_ok=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "ab")
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
    log.flush()
    kwargs: dict = {}
    if os.name == "nt":
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    else:
        kwargs["start_new_session"] = True  # Ctrl-C in Blender's terminal does not kill it mid-write
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    # Blender's own Python settings must not leak into the backend's interpreter
    for k in ("PYTHONHOME", "PYTHONPATH"):
        full_env.pop(k, None)
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workspace, env=full_env, **kwargs)
    except OSError as e:
        log.close()
        raise LaunchError(f"could not start the backend ({cmd[0]}): {e}") from None
    log.close()  # the child holds its own handle
    return LocalBackend(proc=proc, command=cmd, log_path=log_path, endpoint=endpoint, started=time.time())


def stop(backend: Optional[LocalBackend], timeout: float = 5.0) -> Optional[int]:
    """Terminate the process (SIGTERM, then SIGKILL after ``timeout``); returns its exit code."""
    if backend is None:
        return None
    p = backend.proc
    if p.poll() is None:
        try:
            p.terminate()
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        except OSError:
            pass
    return p.poll()


def python_default() -> str:
    """A guess for the preferences' backend Python: $NEURAL_ATLAS_BACKEND_PYTHON."""
    return os.environ.get("NEURAL_ATLAS_BACKEND_PYTHON", "")


__all__ = ["LocalBackend", "LaunchError", "build_command", "start", "stop", "python_default"]
