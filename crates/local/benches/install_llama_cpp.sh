#!/usr/bin/env bash
# Installs llama-cpp-python (llama.cpp's Python bindings, built from source) for the peer of
# `cargo bench -p descartes-local` and for the tests against its OpenAI-compatible server.
# Built for x86-64-v3 (AVX2, FMA, F16C), as Descartes' own copy of llama.cpp is: a native build
# (-march=native) died with "Illegal instruction" on multi-token batches in this project's VM.
set -euo pipefail
args="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF"
if [ "$(uname -m)" = "x86_64" ]; then
  args="$args -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
CMAKE_ARGS="$args" python3 -m pip install --quiet 'llama-cpp-python[server]==0.3.*' \
  || CMAKE_ARGS="$args" python3 -m pip install --quiet --break-system-packages 'llama-cpp-python[server]==0.3.*'
