"""What this machine's processor is, in words, for reports and benchmarks (no torch, no numpy)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_description() -> str:
    """``"<model> (<n> cores)"``."""
    return f"{cpu_model()} ({os.cpu_count()} cores)"
