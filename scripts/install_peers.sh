#!/usr/bin/env bash
# Installs the optional peer engines that benchmarks/peers.py runs next to eagle3 when present:
# llama.cpp through llama-cpp-python 0.3.36, built from its PyPI source distribution for this CPU
# (-DGGML_NATIVE=ON), plus what converting eagle3's safetensors targets to GGUF needs: the `gguf` and
# `sentencepiece` packages and llama.cpp's convert_hf_to_gguf.py with the `conversion/` and `gguf-py/`
# folders it imports, copied out of the same sdist into ${EAGLE3_HOME:-$HOME/.cache/eagle3}/peers/llama.cpp/.
#
# Installs into the current `python` (activate .venv first). Needs network access to PyPI, a C/C++ compiler
# and CMake (pip fetches CMake and Ninja if missing). Compiling llama.cpp uses every core and takes 10-15
# minutes on a 2-core machine; a rerun finds it installed and only refreshes the convert script (seconds).
# Exits 2 with a one-line reason when a step fails.
#
#     source .venv/bin/activate && bash scripts/install_peers.sh [--convert-only]
#
# --convert-only: just the convert script and what it needs (seconds; `eagle3 convert --to gguf` uses it), no build.
set -euo pipefail
CONVERT_ONLY=0
[ "${1:-}" = "--convert-only" ] && CONVERT_ONLY=1

VERSION=0.3.36
GGUF_VERSION=0.19.0 # the version vendored in that sdist (for its dependencies; see gguf-py below)
PY=${PYTHON:-python}
DEST="${EAGLE3_HOME:-$HOME/.cache/eagle3}/peers/llama.cpp"
JOBS=$(nproc 2>/dev/null || echo 2)

fail() {
  echo "install_peers: $*" >&2
  exit 2
}

"$PY" -m pip --version >/dev/null 2>&1 || fail "no pip for $PY; activate the project's .venv first"

log=$(mktemp -t install_peers.XXXXXX.log)
tmp=$(mktemp -d -t install_peers.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

if [ "$CONVERT_ONLY" = 1 ]; then
  echo "fetching llama.cpp's convert script only (no build)"
elif "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" >/dev/null 2>&1; then
  echo "llama-cpp-python $VERSION already installed"
else
  echo "building llama-cpp-python $VERSION from source for this CPU ($JOBS jobs; several minutes, log: $log)"
  # --no-binary: always compile (a prebuilt wheel would not target this CPU); --no-cache-dir: a cached wheel
  # built with other CMAKE_ARGS would be reused silently.
  if ! CMAKE_ARGS="-DGGML_NATIVE=ON ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    "$PY" -m pip install --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$VERSION" >"$log" 2>&1; then
    fail "building llama-cpp-python $VERSION failed (compiler or CMake problem?); see $log"
  fi
  "$PY" -c "import llama_cpp" >>"$log" 2>&1 || fail "llama-cpp-python $VERSION installed but does not import; see $log"
fi

# sentencepiece: the convert script's Llama vocab path imports it even for BPE tokenizers.
"$PY" -m pip install -q "gguf==$GGUF_VERSION" "sentencepiece>=0.1.98,<0.3.0" >>"$log" 2>&1 ||
  fail "installing gguf $GGUF_VERSION and sentencepiece failed; see $log"

# The convert script is not part of the installed package: take it from the same sdist, so it matches the
# llama.cpp that was just built, with what it imports from there: `conversion/`, and `gguf-py/` (which the
# script puts first on sys.path), because the vendored gguf is ahead of PyPI's release of the same version
# number (PyPI's gguf 0.19.0 lacks gguf.LazyChunkedTensor, which the script uses).
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION" >>"$log" 2>&1 ||
  fail "downloading the llama-cpp-python $VERSION sdist failed; see $log"
sdist=$(ls "$tmp"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null) || fail "no llama-cpp-python sdist in the download"
root="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar -xzf "$sdist" -C "$tmp" "$root/convert_hf_to_gguf.py" "$root/conversion" "$root/gguf-py/gguf" ||
  fail "the sdist lacks $root/convert_hf_to_gguf.py, $root/conversion or $root/gguf-py/gguf"
rm -rf "$DEST"
mkdir -p "$DEST/gguf-py"
cp -r "$tmp/$root/convert_hf_to_gguf.py" "$tmp/$root/conversion" "$DEST/"
cp -r "$tmp/$root/gguf-py/gguf" "$DEST/gguf-py/"
# Check the script loads (its imports: torch, transformers, gguf, conversion) before declaring success.
"$PY" "$DEST/convert_hf_to_gguf.py" --help >>"$log" 2>&1 || fail "$DEST/convert_hf_to_gguf.py does not run; see $log"

if [ "$CONVERT_ONLY" = 1 ]; then
  echo "llama.cpp's convert script ready in $DEST"
else
  echo "llama.cpp peer ready: llama-cpp-python $VERSION, convert script in $DEST"
fi
rm -f "$log"
