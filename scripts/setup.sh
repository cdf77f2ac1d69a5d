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
# speculators (vLLM's draft library), for the interop tests: its declared dependencies include torchvision and
# torchaudio, which would replace the pinned CPU torch with a CUDA build, so it goes in without them, then the
# packages it imports. Optional: without it those tests are skipped, saying why.
if ! python -c 'import speculators.models.eagle3' >/dev/null 2>&1; then
  { python -m pip install -q --no-deps "speculators==0.9.0" "hs-connectors==0.9.0" &&
    python -m pip install -q "datasets>=4.0,<=5.1.0" "loguru>=0.7.2,<=0.7.3" pydantic-settings protobuf; } ||
    echo "note: speculators could not be installed; its interop tests will be skipped" >&2
fi
# SpecForge (SGLang's draft trainer), for the interop tests: it pins torch 2.11 and SGLang, which its EAGLE-3
# draft model does not use, so it goes in without its dependencies (a pure-Python wheel).
if ! python -c 'import specforge.modeling.auto' >/dev/null 2>&1; then
  python -m pip install -q --no-deps "specforge==0.2.0" ||
    echo "note: SpecForge could not be installed; its interop tests will be skipped" >&2
fi
