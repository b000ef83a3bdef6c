#!/usr/bin/env bash
# Create .venv and install loratune with its test extras. Idempotent: re-running is cheap.
# torch is pinned to 2.13.0 when absent: that CPU build is what the reference machine serves;
# an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.loratune-installed
want=$(cat pyproject.toml | sha1sum | cut -c1-40)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# pip prints one "Location ... is ignored" warning per package for find-links folders that some machines
# configure globally; drop those lines, keep everything else (pipefail keeps pip's exit status).
pip_install() { "$VPY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  pip_install torch==2.13.0
fi
echo "[setup] installing loratune (editable) with test extras"
pip_install -e ".[test]"
echo "$want" > "$stamp"
