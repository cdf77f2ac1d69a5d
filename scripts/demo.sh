#!/usr/bin/env bash
# Sets up .venv, fetches the default model (SmolLM2-135M-Instruct, converted once into ~/.cache/eagle3)
# and generates a chat answer with it. Extra arguments go to `eagle3 generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ "$#" -eq 0 ]; then
  set -- --chat --max-new-tokens 128 "Explain in three sentences why the sky is blue."
fi
eagle3 generate "$@"
