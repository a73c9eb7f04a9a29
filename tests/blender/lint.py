"""mypy over the bpy shell with the fake-bpy-module-5-0 stubs, so that names removed in
Blender 5.0 (``SequenceEditor.sequences``, ``bpy.types.Sequence``, ...) cannot creep in.

Usage: .venv-bpy/bin/python tests/blender/lint.py [FILE...]   (exit code = mypy's)
The add-on package is linked as ``neural_atlas`` under build/mypy so relative imports
resolve; zmq/msgpack (bundled wheels, not installed in .venv-bpy) are not checked.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = """[mypy]
python_version = 3.11
check_untyped_defs = True
warn_unused_ignores = False
ignore_missing_imports = False
follow_imports = normal
explicit_package_bases = True
# The point is API drift (removed/renamed bpy names): keep attr-defined, name-defined,
# call-arg and import errors; the stubs' Optional/Literal strictness is noise here.
disable_error_code = union-attr, arg-type, override, misc, return-value, assignment, index,
    operator, call-overload, list-item, dict-item, var-annotated, has-type, return, func-returns-value
[mypy-zmq.*,msgpack.*,addon_utils.*]
ignore_missing_imports = True
[mypy-neural_atlas.core.client,neural_atlas.core.transport,neural_atlas.core.protocol,neural_atlas.core.signing]
ignore_errors = True
"""


def main(argv: list[str]) -> int:
    base = os.path.join(ROOT, "build", "mypy")
    os.makedirs(base, exist_ok=True)
    link = os.path.join(base, "neural_atlas")
    if not os.path.islink(link):
        if os.path.exists(link):
            os.remove(link)
        os.symlink(os.path.join(ROOT, "addon"), link)
    cfg = os.path.join(base, "mypy.ini")
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(CONFIG)
    targets = argv or [os.path.join(link, "blender"), os.path.join(link, "__init__.py"),
                       os.path.join(link, "core", "jobs.py"), os.path.join(link, "core", "strips.py"),
                       os.path.join(ROOT, "scripts", "batch.py")]
    cmd = [sys.executable, "-m", "mypy", "--config-file", cfg, "--cache-dir", os.path.join(base, "cache"),
           *targets]
    r = subprocess.run(cmd, cwd=base)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
