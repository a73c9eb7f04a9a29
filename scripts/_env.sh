# Shared by scripts/demo and scripts/test: create or reuse the backend's
# environment in .venv (Python 3.11 or 3.12, CPU torch 2.13.0 from local disk
# where available). Sourced, not executed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEURAL_ATLAS_VENV:-$ROOT/.venv}"
pick_python() {
  for p in python3.11 python3.12 python3; do
    if command -v "$p" >/dev/null 2>&1; then
      v=$("$p" -c 'import sys;print("%d.%d"%sys.version_info[:2])')
      case "$v" in 3.11|3.12) echo "$p"; return 0;; esac
    fi
  done
  echo "error: Python 3.11 or 3.12 is needed for the backend" >&2; return 1
}
ensure_backend_env() {
  local stamp="$VENV/.neural-atlas-stamp"
  local want
  want=$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-16)
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "[env] preparing $VENV (first run takes a minute)" >&2
  [ -x "$VENV/bin/python" ] || "$(pick_python)" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  # CPU build of torch: 2.13.0 installs from local disk on the project's machines;
  # an already-installed torch that satisfies pyproject is kept.
  "$VENV/bin/python" -c 'import torch' 2>/dev/null || \
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  # ray (the Ray executor's tests run on a real local Ray): a 79 MB wheel, ~300 MB installed
  "$VENV/bin/python" -m pip install -q -e "$ROOT[video,test,ray]"
  echo "$want" > "$stamp"
}

# The Blender side: bpy 5.0.1 (Python 3.11, numpy<2) cannot share the backend's
# environment. pyzmq and msgpack are deliberately NOT installed here: the add-on imports
# them from the wheels bundled in the built extension.
BPY_VENV="${NEURAL_ATLAS_BPY_VENV:-$ROOT/.venv-bpy}"
BPY_PINS=("bpy==5.0.1" "pytest>=8,<10" "mypy>=1.10" "fake-bpy-module-5-0==20260730")

ensure_bpy_env() {
  local stamp="$BPY_VENV/.neural-atlas-bpy-stamp" want
  want=$(printf '%s\n' "${BPY_PINS[@]}" | sha1sum | cut -c1-16)
  if [ -x "$BPY_VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  local py=""
  for p in python3.11 "$HOME/.pyenv/versions/3.11.7/bin/python3.11"; do
    if command -v "$p" >/dev/null 2>&1 && \
       [ "$("$p" -c 'import sys;print("%d.%d"%sys.version_info[:2])')" = "3.11" ]; then py="$p"; break; fi
  done
  [ -n "$py" ] || { echo "error: bpy 5.0.1 needs Python 3.11, none found" >&2; exit 1; }
  echo "[env] preparing $BPY_VENV (bpy 5.0.1 is ~820 MB; first run only)" >&2
  [ -x "$BPY_VENV/bin/python" ] || "$py" -m venv "$BPY_VENV"
  "$BPY_VENV/bin/python" -m pip install -q --disable-pip-version-check "${BPY_PINS[@]}"
  # make sure the bundled-wheel tests are honest
  "$BPY_VENV/bin/python" -m pip uninstall -q -y pyzmq msgpack >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
}


