"""Setting up, repairing and removing the backend's environment (no bpy, no threads).

A :class:`Job` runs a *script*: a generator that yields :class:`Run` requests (a
subprocess: pip, venv, the probe) and receives each one's :class:`Result`. The job
starts the subprocess with its output going to the log file and returns at once;
``poll()`` (the GUI timer) reads what the subprocess has written since, folds pip's
lines into the progress, and resumes the script when the subprocess ends.
``run()`` is the blocking driver for background mode, where timers never fire.
Cancel interrupts pip (SIGINT: pip rolls back the package it was installing), then
kills it; the stamp is only marked complete after the final check, so a cancelled
or failed setup is never used and the next one continues where it stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping, Optional, Sequence

from . import environment as E

#: Seconds each step takes on a typical machine: the weights of the overall progress bar.
STEP_SECONDS = {"check": 1, "probe": 5, "venv": 8, "pip": 6, "torch": 40, "backend": 35, "verify": 8, "remove": 3}
TORCH_SECONDS = {"cpu": 40, "mps": 40, "cuda": 300}
CANCEL_GRACE_S = 15.0
LOG_KEEP_BYTES = 5_000_000
#: The subprocess that deletes folders (a 7 GB environment must not freeze the UI).
RMTREE_CODE = "import shutil, sys\nfor p in sys.argv[1:]:\n    shutil.rmtree(p, ignore_errors=True)\n"
LEFTOVER_MARK = ".removing-"
STEP_LABELS = {"check": "Checking this machine", "probe": "Checking the existing environment",
               "venv": "Creating the environment", "pip": "Updating pip", "torch": "Installing PyTorch",
               "backend": "Installing the backend", "verify": "Checking the backend loads",
               "remove": "Removing the environment"}


@dataclass
class Run:
    argv: list[str]
    pip: bool = False                 # fold its output into download/install progress
    expected_bytes: int = 0
    span: tuple[float, float] = (0.0, 1.0)  # the part of its step's bar this command fills


@dataclass
class Result:
    returncode: int
    output: str


@dataclass
class Status:
    state: str = "idle"               # idle | running | done | failed | cancelled
    kind: str = "setup"               # setup | repair | remove
    step: str = ""
    label: str = ""
    detail: str = ""
    fraction: float = 0.0
    message: str = ""
    hint: str = ""
    code: str = ""
    log_path: str = ""
    reused: bool = False
    steps: list[str] = field(default_factory=list)  # what this run installs ([] = reused as it is)
    probe: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0

    @property
    def active(self) -> bool:
        return self.state == "running"

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started if self.started else 0.0

    def line(self) -> str:
        """One progress line for a terminal or the status bar."""
        text = f"{self.fraction * 100:3.0f}% {self.label}"
        return text + (f": {self.detail}" if self.detail else "")


Script = Generator[Run, Result, None]


class Job:
    """Runs one script; never blocks in ``poll``; owns at most one subprocess."""

    def __init__(self, script: Callable[["Job"], Script], *, log_path: str, env: Mapping[str, str], cwd: str,
                 kind: str = "setup", scratch: str = "") -> None:
        """``scratch``: a folder made for the job's temporary files and deleted when it ends."""
        self.log_path, self.env, self.cwd, self.scratch = log_path, dict(env), cwd, scratch
        self.status = Status(state="running", kind=kind, log_path=log_path, started=time.time())
        self._weights: list[tuple[str, float]] = []
        self._base = 0.0
        self._done_weight = 0.0
        self._step_weight = 0.0
        self._proc: Optional[subprocess.Popen] = None
        self._run: Optional[Run] = None
        self._pip = E.PipProgress()
        self._start_pos = 0
        self._read_pos = 0
        self._partial = ""
        self._cancel_at = 0.0
        self._killed = False
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        if os.path.isfile(log_path) and os.path.getsize(log_path) > LOG_KEEP_BYTES:
            os.replace(log_path, log_path + ".1")  # keep the previous runs, not all of them
        os.makedirs(cwd, exist_ok=True)
        if scratch:
            os.makedirs(scratch, exist_ok=True)
        self._log(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {kind} started\n")
        self._gen = script(self)
        self._advance(None)

    # ----------------------------------------------------------- the script's API
    def plan(self, steps: Sequence[str], variant: str = "cpu") -> None:
        """The steps still to come (with their weights), after the ones begun so far."""
        weights = []
        for s in steps:
            sec = TORCH_SECONDS.get(variant, 60) if s == "torch" else STEP_SECONDS.get(s, 5)
            weights.append((s, float(sec)))
        self._weights = weights
        self._done_weight = 0.0
        self._step_weight = 0.0
        self._base = self.status.fraction  # a new plan continues the bar, never moves it back
        self._update_fraction(0.0)

    def begin(self, step: str, label: str = "") -> None:
        self._done_weight += self._step_weight
        self._step_weight = dict(self._weights).get(step, 0.0)
        self.status.step, self.status.label = step, label or STEP_LABELS.get(step, step)
        self.status.detail = ""
        self._log(f"---- {time.strftime('%H:%M:%S')} {self.status.label}\n")
        self._update_fraction(0.0)

    def note(self, text: str) -> None:
        self._log(text.rstrip("\n") + "\n")

    # ------------------------------------------------------------------ drivers
    def poll(self) -> Status:
        """Advance without blocking (the GUI timer calls this)."""
        if self.status.state != "running":
            return self.status
        p = self._proc
        if p is None:
            return self.status
        self._read_output()
        code = p.poll()
        if code is None:
            if self._cancel_at and not self._killed and time.monotonic() - self._cancel_at > CANCEL_GRACE_S:
                self._kill(hard=True)
            return self.status
        self._read_output(final=True)
        out = self._output()
        self._proc = None
        if self._cancel_at:
            self._gen.close()
            self._finish("cancelled", "Setup cancelled" if self.status.kind != "remove" else "Removal cancelled",
                         self._cancel_hint())
            return self.status
        self._advance(Result(code, out))
        return self.status

    def run(self, on_progress: Optional[Callable[[Status], None]] = None, timeout: Optional[float] = None,
            interval: float = 0.2) -> Status:
        """The blocking driver (background mode): poll until finished; Ctrl-C cancels."""
        end = time.monotonic() + timeout if timeout else None
        last = self.status.line()
        if on_progress is not None:  # the first step, even when it already failed
            on_progress(self.status)
        try:
            while self.status.state == "running":
                self.poll()
                line = self.status.line()
                if on_progress is not None and line != last and self.status.state == "running":
                    last = line
                    on_progress(self.status)
                if end is not None and time.monotonic() > end and not self._cancel_at:
                    self.note(f"timed out after {timeout:.0f} s")
                    self.cancel()
                if self.status.state == "running":
                    time.sleep(interval)
        except KeyboardInterrupt:
            self.cancel()
            while self.status.state == "running":
                self.poll()
                time.sleep(interval)
            raise
        return self.status

    @property
    def pid(self) -> Optional[int]:
        """The running subprocess's id (None between steps)."""
        return self._proc.pid if self._proc is not None else None

    def cancel(self) -> None:
        if self.status.state != "running" or self._cancel_at:
            return
        self._cancel_at = time.monotonic()
        self.status.detail = "cancelling..."
        self._log(f"---- {time.strftime('%H:%M:%S')} cancel requested\n")
        if self._proc is None:
            self._gen.close()
            self._finish("cancelled", "Setup cancelled", self._cancel_hint())
        else:
            self._kill(hard=False)

    # ---------------------------------------------------------------- internals
    def _cancel_hint(self) -> str:
        if self.status.kind == "remove":
            return "Remove again to delete the rest"
        return ("The environment is incomplete and is not used; Set up backend continues where it stopped "
                "(finished downloads and installs are kept)")

    def _advance(self, result: Optional[Result]) -> None:
        try:
            req = self._gen.send(result) if result is not None else next(self._gen)
        except StopIteration:
            if self.status.state == "running":
                self._finish("done", self.status.message or "Done")
            return
        except E.SetupError as e:
            self._log(f"ERROR: {e.message}\n       {e.hint}\n")
            self._finish("failed", e.message, e.hint, e.code)
            return
        except Exception as e:  # noqa: BLE001 - anything else is our bug: say so, keep the traceback
            self._log(traceback.format_exc())
            self._finish("failed", f"Setup stopped by an internal error: {type(e).__name__}: {e}",
                         f"See the log: {self.log_path}", "internal")
            return
        self._start(req)

    def _start(self, req: Run) -> None:
        self._run = req
        self._pip = E.PipProgress(expected_bytes=req.expected_bytes)
        self._log(f"$ {' '.join(req.argv)}\n")
        self._start_pos = self._read_pos = os.path.getsize(self.log_path)
        self._partial = ""
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NO_WINDOW", 0)
                                       | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
        else:
            kwargs["start_new_session"] = True  # its own group: cancel reaches pip's children too
        with open(self.log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen(req.argv, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, cwd=self.cwd, env=self.env, **kwargs)
            except OSError as e:
                self._proc = None
                self._log(f"could not start: {e}\n")
                self._advance(Result(127, f"could not start {req.argv[0]}: {e}"))

    def _kill(self, hard: bool) -> None:
        p = self._proc
        if p is None or p.poll() is not None:
            return
        try:
            if os.name == "nt":
                p.kill() if hard else p.terminate()
            else:
                os.killpg(p.pid, signal.SIGKILL if hard else signal.SIGINT)
        except (OSError, ProcessLookupError):
            pass
        self._killed = hard

    def _read_output(self, final: bool = False) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._read_pos)
                data = f.read()
        except OSError:
            return
        if not data:
            return
        self._read_pos += len(data)
        text = self._partial + data.decode("utf-8", "replace")
        lines = text.split("\n")
        self._partial = "" if final else lines.pop()
        if self._run is not None and self._run.pip:
            for ln in lines:
                for part in ln.split("\r"):
                    E.pip_line(self._pip, part)
            if self._pip.detail and not self._cancel_at:
                self.status.detail = self._pip.detail
            a, b = self._run.span
            self._update_fraction(a + (b - a) * self._pip.fraction)

    def _output(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._start_pos)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _update_fraction(self, step_fraction: float) -> None:
        total = sum(w for _, w in self._weights) or 1.0
        raw = (self._done_weight + self._step_weight * step_fraction) / total
        self.status.fraction = max(self.status.fraction, min(1.0, self._base + (1.0 - self._base) * raw))

    def _finish(self, state: str, message: str, hint: str = "", code: str = "") -> None:
        self.status.state, self.status.message, self.status.hint, self.status.code = state, message, hint, code
        self.status.finished = time.time()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if state == "done":
            self.status.fraction, self.status.detail = 1.0, ""
        self._log(f"==== {time.strftime('%H:%M:%S')} {state}: {message}" + (f" ({hint})" if hint else "") +
                  f" after {self.status.seconds:.0f} s\n")

    def _log(self, text: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text)


# ------------------------------------------------------------------- setup
@dataclass
class SetupConfig:
    user_dir: str                       # the extension's user folder: everything goes below it
    base_python: str                    # the interpreter the environment is made from
    wheel: str                          # the backend wheel shipped with the extension
    torch: E.TorchChoice
    platform_name: str
    repair: bool = False
    online: bool = True                 # Blender's "Allow Online Access"
    nvidia: Optional[E.Nvidia] = None
    required_bytes: Optional[int] = None  # None = the estimate for the steps to run
    pip_args: tuple[str, ...] = ()      # extra pip arguments (e.g. --retries 1)
    helper_python: str = ""             # runs the folder deletions ('' = base_python)

    @property
    def env_dir(self) -> str:
        return os.path.join(self.user_dir, E.ENV_DIRNAME)

    @property
    def log_path(self) -> str:
        return os.path.join(self.user_dir, "logs", "setup.log")


def start_setup(c: SetupConfig, base_env: Optional[Mapping[str, str]] = None) -> Job:
    env = E.child_env(os.environ if base_env is None else base_env, c.user_dir)
    return Job(lambda job: _setup_script(job, c), log_path=c.log_path, env=env, cwd=c.user_dir,
               kind="repair" if c.repair else "setup", scratch=env["TMPDIR"])


def _pip_supports_raw(version: str) -> bool:
    return E.version_tuple(version) >= (24, 1)


def _setup_script(job: Job, c: SetupConfig) -> Script:
    env_dir = c.env_dir
    job.plan(["check", "probe"])
    job.begin("check")
    E.check_platform(c.platform_name)
    if not os.path.isfile(c.wheel):
        raise E.SetupError("no_wheel", f"The backend package is missing from the extension ({c.wheel})",
                           "Reinstall the extension from its zip (Preferences > Get Extensions > Install from Disk)")
    if not c.base_python or not os.path.isfile(c.base_python):
        raise E.SetupError("python_missing", f"no Python interpreter at {c.base_python or '(not set)'}",
                           "Pick the python executable of a Python 3.11 or 3.12 installation in Preferences")
    r = yield Run(E.python_check_command(c.base_python))
    py = E.parse_python_check(c.base_python, r.returncode, r.output)
    job.note(f"python {py.text} at {py.path}; PyTorch: {c.torch.label} {c.torch.requirement} "
             f"from {c.torch.index_url or 'pip configuration'} ({c.torch.reason})")
    left = _leftovers(c.user_dir)
    if left:  # what an interrupted removal left behind
        yield Run([c.helper_python or py.path, "-c", RMTREE_CODE, *left])
    target = E.Target(py, c.wheel, E.sha256(c.wheel), c.torch)
    stamp = E.read_stamp(env_dir)
    interrupted = str(stamp.get("running") or "")  # a step a cancel or crash cut short
    envpy = E.env_python(env_dir)
    probe = None
    if stamp and os.path.isfile(envpy):
        job.begin("probe")
        r = yield Run([envpy, "-c", E.PROBE_CODE])
        probe = E.parse_probe(r.output)
    steps = E.plan(target, stamp, probe, env_dir, repair=c.repair)
    if not steps:
        job.status.reused, job.status.probe = True, dict(probe or {})
        job.status.message = "The existing environment is complete: nothing to install"
        job.note(job.status.message)
        return
    job.note(f"steps to run: {', '.join(steps)}")
    job.status.steps = [*steps, "verify"]
    job.plan(job.status.steps, c.torch.variant)
    if not c.online:
        raise E.SetupError("offline", "Setting up downloads PyTorch and the backend's packages, and Blender's "
                           "online access is off", "Allow Online Access (Preferences > System > Network), "
                           "then Set up backend")
    needed = c.required_bytes if c.required_bytes is not None else E.required_bytes(steps, c.torch.variant)
    free = E.check_disk(c.user_dir, needed)
    job.note(f"disk: {E.gb(free)} free, about {E.gb(needed)} needed")
    os.makedirs(os.path.join(c.user_dir, "cache", "pip"), exist_ok=True)

    if "venv" in steps:
        job.begin("venv")
        if os.path.lexists(env_dir):
            yield from _delete(job, c.helper_python or py.path, [env_dir])
        stamp = {"python": py.path, "python_version": py.text, "steps": {}, "complete": False}
        r = yield Run([py.path, "-m", "venv", env_dir])
        if r.returncode != 0 or not os.path.isfile(envpy):
            raise E.SetupError("venv_failed", f"Python {py.text} could not create the environment in {env_dir}: "
                               f"{_last_line(r.output)}", "Pick another Python 3.11/3.12 in Preferences "
                               f"(python.org installers work), then Set up backend (log: {job.log_path})")
        E.mark_step(env_dir, stamp, "venv", {"python": py.path, "python_version": py.text})

    pip = [envpy, "-m", "pip", "install", "--no-input", "--only-binary=:all:", *c.pip_args]
    if "pip" in steps:
        job.begin("pip")
        r = yield Run(pip + ["--upgrade", f"pip>={'.'.join(map(str, E.MIN_PIP))}"], pip=True)
        if r.returncode != 0:
            err = E.classify_failure(r.output, r.returncode, what="pip", log_path=job.log_path)
            if err.code in ("network", "network_tls", "disk_full"):
                raise err
            job.note(f"keeping the environment's own pip ({err.message})")
        else:
            E.mark_step(env_dir, stamp, "pip", {"min": list(E.MIN_PIP)})
    r = yield Run([envpy, "-c", "import pip; print(pip.__version__)"])
    if _pip_supports_raw(_last_line(r.output)):
        pip += ["--progress-bar", "raw"]
    errors = dict((probe or {}).get("errors") or {})

    if "torch" in steps:
        job.begin("torch", f"Installing PyTorch ({c.torch.label})")
        E.mark_step(env_dir, stamp, "torch", None)
        args = pip + [c.torch.requirement] + (["--index-url", c.torch.index_url] if c.torch.index_url else [])
        if (c.repair and "torch" in errors) or interrupted == "torch":
            args.append("--force-reinstall")  # torch and its dependencies, from pip's cache
        r = yield Run(args, pip=True, expected_bytes=E.TORCH_MB.get(c.torch.variant, (3000, 0))[0] * 10**6)
        if r.returncode != 0:
            raise E.classify_failure(r.output, r.returncode, what=f"PyTorch ({c.torch.label})",
                                     index_urls=[c.torch.index_url] if c.torch.index_url else _pip_indexes(r.output),
                                     python=py.short, platform_name=c.platform_name, log_path=job.log_path)
        E.mark_step(env_dir, stamp, "torch", {"key": c.torch.key()})

    if "backend" in steps:
        job.begin("backend")
        E.mark_step(env_dir, stamp, "backend", None)
        r = yield Run([envpy, "-c", "import importlib.metadata as m; print(m.version('torch'))"])
        torch_version = _last_line(r.output) if r.returncode == 0 else ""
        pin = []
        if torch_version:  # the backend's dependencies never swap the torch chosen above
            cfile = os.path.join(job.scratch, "torch-constraint.txt")
            with open(cfile, "w", encoding="utf-8") as f:
                f.write(f"torch=={torch_version}\n")
            pin = ["--constraint", cfile]
        broken = [E.MODULE_DISTS[m] for m, err in errors.items() if m in E.MODULE_DISTS
                  and not err.startswith("ModuleNotFoundError")]  # installed, but does not load
        forced = c.repair or interrupted == "backend" or bool(broken)
        if forced:
            r = yield Run(pip + ["--force-reinstall", "--no-deps", c.wheel, *broken], pip=True, span=(0.0, 0.3))
            if r.returncode != 0:
                raise E.classify_failure(r.output, r.returncode, what="the backend", python=py.short,
                                         platform_name=c.platform_name, log_path=job.log_path)
        spec = c.wheel + (f"[{','.join(target.extras)}]" if target.extras else "")
        r = yield Run(pip + pin + [spec], pip=True, expected_bytes=E.BACKEND_DEPS_MB[0] * 10**6,
                      span=(0.3, 1.0) if forced else (0.0, 1.0))
        if r.returncode != 0:
            raise E.classify_failure(r.output, r.returncode, what="the backend's packages",
                                     index_urls=_pip_indexes(r.output), python=py.short,
                                     platform_name=c.platform_name, log_path=job.log_path)
        E.mark_step(env_dir, stamp, "backend", {"key": target.backend_key()})

    job.begin("verify")
    r = yield Run([envpy, "-c", E.PROBE_CODE, "--size"])
    probe = E.parse_probe(r.output)
    err = E.probe_problem(probe, c.torch, c.nvidia)
    if err is None and not E.probe_ok(probe, env_dir):
        err = E.SetupError("verify_failed", "The backend does not load from the new environment",
                           f"Repair reinstalls it (log: {job.log_path})")
    if err is not None:
        raise err
    assert probe is not None
    stamp["complete"] = True
    stamp["verified"] = {k: probe.get(k) for k in ("python", "torch", "torch_cuda", "device", "backend", "size")}
    E.write_stamp(env_dir, stamp)
    job.status.probe = dict(probe)
    shutil.rmtree(os.path.join(c.user_dir, "cache"), ignore_errors=True)  # a few downloaded wheels: quick
    job.status.message = (f"Installed PyTorch {probe.get('torch')} ({c.torch.label}) and the backend "
                          f"{probe.get('backend')}: {E.gb(probe.get('size') or 0)}")


def _delete(job: Job, python: str, paths: Sequence[str]) -> Script:
    """Rename at once (the folder is gone for everybody), delete in a subprocess."""
    trash = []
    for p in paths:
        if not os.path.lexists(p):
            continue
        t = f"{p}{LEFTOVER_MARK}{int(time.time() * 1000)}"
        try:
            os.replace(p, t)
        except OSError as e:
            raise E.SetupError("permission", f"Could not remove {p}: {e}",
                               "Stop the backend (Atlas tab > Stop) and anything else using that folder, "
                               "then try again") from None
        trash.append(t)
    if trash:
        yield Run([python, "-c", RMTREE_CODE, *trash])


def _leftovers(user_dir: str) -> list[str]:
    """Renamed folders an interrupted removal did not finish deleting."""
    try:
        names = os.listdir(user_dir)
    except OSError:
        return []
    return [os.path.join(user_dir, n) for n in names if LEFTOVER_MARK in n]


def _last_line(text: str) -> str:
    return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")


def _pip_indexes(output: str) -> list[str]:
    """The indexes pip says it looks in (``Looking in indexes: a, b``)."""
    for ln in output.splitlines():
        if ln.startswith("Looking in indexes:"):
            return [u.strip() for u in ln.split(":", 1)[1].split(",") if u.strip().startswith("http")]
    return ["https://pypi.org/simple"]


# ------------------------------------------------------------------ remove
def start_removal(user_dir: str, helper_python: str, base_env: Optional[Mapping[str, str]] = None) -> Job:
    """Delete the environment (and the setup's cache and temporary files), nothing else."""
    env = E.child_env(os.environ if base_env is None else base_env, user_dir)
    log = os.path.join(user_dir, "logs", "setup.log")

    def script(job: Job) -> Script:
        job.plan(["remove"])
        job.begin("remove")
        paths = [os.path.join(user_dir, E.ENV_DIRNAME), os.path.join(user_dir, "cache"), os.path.join(user_dir, "tmp")]
        paths += _leftovers(user_dir)
        yield from _delete(job, helper_python, paths)
        job.status.message = "Removed the backend environment"

    return Job(script, log_path=log, env=env, cwd=user_dir, kind="remove")


__all__ = ["Job", "Run", "Result", "Status", "SetupConfig", "start_setup", "start_removal", "STEP_LABELS"]
