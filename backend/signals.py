"""Keep Ctrl-C and SIGTERM reaching Python's handler while native libraries load.

On the GPU machine SIGINT/SIGTERM stopped reaching the CLI's handler: a native library loaded
during the run (libtriton's LLVM at the first Triton compile installs its own C-level signal
handlers) replaces the process's C-level disposition, which ``signal.getsignal`` cannot see (it
reports what Python last installed). So the handler's C-level address is read back with libc's
``sigaction`` and, when something replaced it, Python's handler is installed again
(``signal.signal``, main thread only). ``SignalGuard.check()`` is cheap (one syscall per
signal, at most every ``interval_s``); the engine's cancel token calls it from its polls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
import threading
import time
from typing import Callable, Optional

_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        if sys.platform == "win32":
            _libc = False
        else:
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                _libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            except (OSError, AttributeError):
                _libc = False
    return _libc or None


def c_handler(signum: int) -> Optional[int]:
    """The C-level handler address installed for ``signum`` now (0 = SIG_DFL, 1 = SIG_IGN), or
    None where it cannot be read (Windows). ``struct sigaction`` starts with the handler on
    Linux and macOS; the buffer is larger than either layout."""
    libc = _load_libc()
    if libc is None:
        return None
    buf = ctypes.create_string_buffer(512)
    if libc.sigaction(int(signum), None, buf) != 0:
        return None
    return ctypes.c_void_p.from_buffer(buf).value or 0


class SignalGuard:
    """Installs ``handler`` for ``signums`` and re-installs it wherever a native library took
    the C-level disposition over. ``rearmed`` counts the re-installs (for logs and tests)."""

    def __init__(self, handler: Callable, signums, interval_s: float = 0.25) -> None:
        self.handler = handler
        self.signums = [s for s in signums if s is not None]
        self.interval_s = interval_s
        self.rearmed = 0
        self._expected: dict[int, Optional[int]] = {}
        self._next = 0.0
        self.install()

    def install(self) -> None:
        for s in self.signums:
            signal.signal(s, self.handler)
            self._expected[s] = c_handler(s)  # CPython's own C trampoline

    def check(self, force: bool = False) -> int:
        """Re-arm what was replaced; returns how many were. Only from the main thread (where
        ``signal.signal`` works); elsewhere it does nothing."""
        now = time.monotonic()
        if not force and now < self._next:
            return 0
        self._next = now + self.interval_s
        if threading.current_thread() is not threading.main_thread():
            return 0
        n = 0
        for s in self.signums:
            want = self._expected.get(s)
            now_h = c_handler(s)
            if want is None or now_h is None:
                continue
            if now_h != want or signal.getsignal(s) is not self.handler:
                signal.signal(s, self.handler)
                self._expected[s] = c_handler(s)
                n += 1
        self.rearmed += n
        return n
