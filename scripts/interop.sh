#!/usr/bin/env bash
# Installs the engines eagle3's drafts are checked against, where they install on this machine, and runs the
# interop tests (each skips with its reason when its engine is absent).
#   speculators (vLLM's draft library): from PyPI, without its CUDA dependencies (setup.sh does this too).
#   llama.cpp: built from source by scripts/install_peers.sh (about 12 minutes here; pass --llama-cpp).
# Not yet covered (partial, issue 17): SpecForge (it pins torch 2.11 and SGLang), OpenVINO GenAI and
# optimum-intel (optimum-intel pins transformers < 5.6), and GGUF / OpenVINO draft exports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ "${1:-}" = "--llama-cpp" ]; then
  bash scripts/install_peers.sh
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q -rs tests/test_interop_speculators.py
