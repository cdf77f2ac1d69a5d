#!/usr/bin/env bash
# Creates .venv (if missing) and installs eagle3 into it, offline-friendly.
# torch is pinned first: an unpinned torch in a fresh environment would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c 'import torch' >/dev/null 2>&1; then
  python -m pip install -q "torch==${EAGLE3_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[test]"
