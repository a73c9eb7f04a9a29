"""Ctrl-C/SIGTERM keep reaching Python's handler when a native library replaces the C-level
disposition (libtriton's LLVM does at the first Triton compile on the GPU machine)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backend.signals import SignalGuard, c_handler

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX sigaction")


def _replace_c_handler_behind_pythons_back(signum: int, value: int) -> None:
    """What a native library does: sigaction() straight from C (here SIG_IGN/SIG_DFL-like)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    buf = ctypes.create_string_buffer(512)
    assert libc.sigaction(signum, None, buf) == 0
    ctypes.c_void_p.from_buffer(buf).value = value
    assert libc.sigaction(signum, buf, None) == 0


def test_guard_rearms_a_handler_replaced_at_c_level():
    got = []
    old = signal.getsignal(signal.SIGUSR1)
    try:
        guard = SignalGuard(lambda s, f: got.append(s), [signal.SIGUSR1])
        python_c = c_handler(signal.SIGUSR1)
        assert python_c not in (None, 0, 1)  # CPython's C trampoline
        assert guard.check(force=True) == 0  # nothing replaced yet
        _replace_c_handler_behind_pythons_back(signal.SIGUSR1, 1)  # SIG_IGN: the signal would be lost
        assert c_handler(signal.SIGUSR1) == 1
        assert signal.getsignal(signal.SIGUSR1) is guard.handler  # Python cannot see it
        assert guard.check(force=True) == 1 and guard.rearmed == 1
        assert c_handler(signal.SIGUSR1) == python_c
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):  # the handler runs at the next bytecode boundary
            if got:
                break
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_cancel_token_polls_rearm_through_the_cli_handler():
    from backend import cli
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        token = cli._cancel_on_signals()
        _replace_c_handler_behind_pythons_back(signal.SIGTERM, 0)  # SIG_DFL: SIGTERM would kill us
        token.signal_guard._next = 0.0
        assert token.cancelled is False  # the poll re-arms
        assert token.signal_guard.rearmed == 1 and c_handler(signal.SIGTERM) not in (0, 1)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            if token.cancelled:
                break
        assert token.cancelled and token.reason == "terminated"
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_the_handlers_message_says_what_the_current_stage_does(capsys):
    from backend import cli
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        token = cli._cancel_on_signals()
        token.note = "stopping the export (the trained model is in its checkpoint: run again to export)"
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):
            if token.cancelled:
                break
        assert token.cancelled and token.reason == "interrupted"
        err = capsys.readouterr().err
        assert "interrupted: stopping the export" in err and "saving a checkpoint" not in err
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_ignored_sigint_stays_ignored_after_a_native_library_takes_it():
    """The service worker ignores SIGINT (the server decides): a C-level replacement (libtriton
    installs a handler that ends the process) is undone at the next poll."""
    old = signal.getsignal(signal.SIGINT)
    try:
        guard = SignalGuard(signal.SIG_IGN, [signal.SIGINT])
        assert c_handler(signal.SIGINT) == 1
        _replace_c_handler_behind_pythons_back(signal.SIGINT, 0)  # SIG_DFL: Ctrl-C would kill
        assert guard.check(force=True) == 1 and c_handler(signal.SIGINT) == 1
        os.kill(os.getpid(), signal.SIGINT)  # ignored: no KeyboardInterrupt, still running
        assert guard.check(force=True) == 0
    finally:
        signal.signal(signal.SIGINT, old)


def _cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (Triton kernels, CUDA graphs)")
def test_gpu_decompose_interrupted_after_the_first_triton_compile_saves_and_resumes(tmp_path):
    """On the GPU the first training steps compile Triton kernels (libtriton/LLVM loads) and
    capture a CUDA graph; SIGINT after that still saves a checkpoint, exits 130 and resumes."""
    from backend.synthetic import make_synthetic_clip
    src = make_synthetic_clip(width=160, height=96, n_frames=8, seed=5).write(tmp_path / "clip")
    out = tmp_path / "dec"
    cmd = [sys.executable, "-m", "backend", "decompose", str(src), "--out", str(out), "--preset", "fast",
           "--device", "cuda", "--iterations", "1000000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines = []
    try:
        for line in proc.stderr:  # event-driven: the first training progress line comes after
            lines.append(line)    # the first compiled, graph-captured steps
            if line.startswith("[train] it"):
                break
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines) + err
    assert proc.returncode == 130, err[-3000:]
    assert "saving a checkpoint" in err and "Run the same command again" in err
    meta = json.loads((out / "checkpoints" / "latest.json").read_text())
    done = meta["iteration"]
    assert done > 0 and not (out / "report.json").exists()
    res = subprocess.run(cmd[:-1] + ["1"], cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from checkpoint at iteration {done}" in res.stderr
    assert json.loads((out / "report.json").read_text())["iterations"] == done
    print(f"interrupted at iteration {done}, resumed and exported")
