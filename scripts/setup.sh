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
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  "$VPY" -m pip install -q torch==2.13.0
fi
echo "[setup] installing loratune (editable) with test extras"
"$VPY" -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
