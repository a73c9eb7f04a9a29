"""The wire modules in addon/core/ ship inside the Blender extension: standard
library, pyzmq and msgpack only, relative imports among themselves, and
syntax that Blender's Python 3.13 accepts."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "addon" / "core"
WIRE = ["__init__.py", "protocol.py", "signing.py", "transport.py", "client.py"]
NO_ZMQ = ["protocol.py", "signing.py", "transport.py"]  # usable where pyzmq is not installed


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append(((node.module or "").split(".")[0], node.level))
    return out


@pytest.mark.parametrize("name", WIRE)
def test_core_imports_only_stdlib_zmq_msgpack_relatively(name):
    for mod, level in _imports(CORE / name):
        if level:  # relative: must stay inside the package
            assert level == 1, f"{name}: relative import above addon/core"
            continue
        assert mod in sys.stdlib_module_names or mod in ("zmq", "msgpack"), f"{name} imports {mod}"
        assert mod not in ("pickle", "marshal", "shelve"), f"{name} imports {mod}"
        if name in NO_ZMQ:
            assert mod != "zmq", f"{name} must not need pyzmq"


def _python313() -> str | None:
    cands = [shutil.which("python3.13")] + sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.13*/bin/python3.13"))
    for c in filter(None, cands):
        try:
            r = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2] == (3, 13))"],
                               capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.stdout.strip() == "True":
            return c
    return None


def test_core_compiles_on_python_313():
    py = _python313()
    if py is None:
        pytest.skip("no Python 3.13 here")
    for name in WIRE:
        r = subprocess.run([py, "-c", "import ast,sys; ast.parse(open(sys.argv[1]).read())",
                            str(CORE / name)], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
