#!/usr/bin/env bash
# Create or reuse .venv, install torch first (CPU build unless ACTDB_TORCH says otherwise), then actdb itself.
# A bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine, hence the explicit order.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${ACTDB_TORCH:-torch==2.13.0}
EXTRAS=${ACTDB_EXTRAS:-dev}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "installing $TORCH_SPEC ..." >&2
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
stamp=.venv/.actdb-installed
want="$(cat pyproject.toml setup.py store/files/*.c | sha256sum | cut -c1-16)-$EXTRAS"  # the C pass rebuilt when it changes
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing actdb[$EXTRAS] ..." >&2
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
