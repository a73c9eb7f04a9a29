"""Path policy (allowed roots) and process liveness for the service."""

from __future__ import annotations

import os
from pathlib import Path

from neural_atlas.core.protocol import ProtocolError


def _norm(p: str) -> str:
    return os.path.normcase(os.path.realpath(p))


class AllowedRoots:
    """Paths a client may name are resolved (symlinks followed) and must lie under a root."""

    def __init__(self, roots: list[Path]) -> None:
        seen: list[str] = []
        for r in roots:
            n = _norm(str(Path(r).expanduser()))
            if n not in seen:
                seen.append(n)
        self.roots = seen

    def resolve(self, path: str, *, what: str = "path") -> str:
        """The real path of ``path``, or ProtocolError(path_not_allowed)."""
        if not os.path.isabs(path):
            raise ProtocolError("path_not_allowed", f"{what} must be an absolute path", path)
        real = _norm(path)
        for root in self.roots:
            try:
                inside = os.path.commonpath([real, root]) == root
            except ValueError:  # different drives on Windows
                inside = False
            if inside:
                break
        else:
            raise ProtocolError("path_not_allowed", f"{what} is outside the allowed roots",
                                f"{path}; allowed: {', '.join(self.roots)} (server option --allow-root)")
        if not os.path.exists(real):
            raise ProtocolError("path_not_allowed", f"{what} does not exist", path)
        return os.path.realpath(path)


def within(path: Path, root: Path) -> bool:
    """True when the real path of ``path`` lies under the real path of ``root``."""
    real, r = _norm(str(path)), _norm(str(root))
    try:
        return os.path.commonpath([real, r]) == r
    except ValueError:
        return False


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
