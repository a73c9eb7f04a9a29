"""What the backend can compute on: device name, GPU memory, torch/triton/tinycudann.

``probe()`` imports torch (slow, and it would pin a CUDA context), so the server
runs it in a child process (``python -m backend.service.device`` prints JSON)
from a background thread and never imports torch itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def probe() -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": "cpu", "type": "cpu", "memory_total": None, "memory_free": None,
        "torch": None, "cuda": None, "triton": _has("triton"), "tinycudann": _has("tinycudann"),
        "error": "",
    }
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - reported, not raised
        info["error"] = f"torch is not importable: {e}"
        return info
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    try:
        if torch.cuda.is_available():
            idx = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(idx)
            info.update(name=torch.cuda.get_device_name(idx), type="cuda",
                        memory_total=int(total), memory_free=int(free))
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            info.update(name="Apple MPS", type="mps")
    except Exception as e:  # noqa: BLE001
        info["error"] = f"GPU query failed: {e}"
    if info["type"] == "cpu":
        try:
            from ..hostinfo import cpu_model
            info["name"] = cpu_model()
            pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            avail = os.sysconf("SC_AVPHYS_PAGES")
            info["memory_total"], info["memory_free"] = int(pages * size), int(avail * size)
        except (ValueError, OSError, AttributeError):
            pass
    return info


def probe_subprocess(timeout: float = 120.0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run probe() in a fresh interpreter; never raises."""
    try:
        out = subprocess.run([sys.executable, "-m", "backend.service.device"], capture_output=True,
                             timeout=timeout, text=True, stdin=subprocess.DEVNULL, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return {"name": "unknown", "type": "unknown", "memory_total": None, "memory_free": None,
                "torch": None, "cuda": None, "triton": _has("triton"),
                "tinycudann": _has("tinycudann"), "error": f"device probe failed: {e}"}


def visible_gpus() -> list[str]:
    """The CUDA devices jobs may be spread over, as CUDA_VISIBLE_DEVICES entries, without
    importing torch: that variable when set, else the indices ``nvidia-smi`` lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip().isdigit()] if out.returncode == 0 else []


if __name__ == "__main__":
    print(json.dumps(probe()))
