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
  "$VENV/bin/python" -m pip install -q -e "$ROOT[video,test]"
  echo "$want" > "$stamp"
}
