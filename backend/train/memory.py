"""Peak host memory while a phase runs: a thread samples /proc/self/status (Linux).

``RssAnon`` is the anonymous memory (what has to fit in RAM); ``VmRSS`` also counts the resident
pages of memory-mapped files (frames, flow caches), which the kernel can drop under pressure.
Elsewhere only the process's lifetime peak (``ru_maxrss``) is known.
"""

from __future__ import annotations

import threading
from typing import Optional

_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def read_status() -> dict[str, float]:
    """The current values in GiB (empty where /proc is missing)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _FIELDS:
                    out[key] = int(rest.split()[0]) / 2 ** 20  # kB -> GiB
    except OSError:
        pass
    return out


def lifetime_peak_gb() -> Optional[float]:
    try:
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2 ** 30 if sys.platform == "darwin" else peak / 2 ** 20
    except (ImportError, OSError):
        return None


class HostMemorySampler:
    """``with HostMemorySampler() as m: ...`` then ``m.report()``: peaks over the block."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        for k, v in read_status().items():
            if v > self.peak.get(k, 0.0):
                self.peak[k] = v

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "HostMemorySampler":
        self._sample()
        self._thread = threading.Thread(target=self._run, name="host-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def report(self) -> dict:
        r = {f"peak_{k.lower()}_gb": round(v, 3) for k, v in self.peak.items()}
        life = lifetime_peak_gb()
        if life is not None:
            r["process_peak_rss_gb"] = round(life, 3)  # since the process started (any phase)
        return r
