#!/usr/bin/env bash
# Configures and builds lockstep into build/ (extra arguments go to cmake).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${LOCKSTEP_BUILD_DIR:-build}
cuda_flag=()
if [ "${LOCKSTEP_CUDA:-0}" = "1" ]; then cuda_flag=(-DLOCKSTEP_CUDA=ON); fi
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cuda_flag[@]}" "$@" >/dev/null
cmake --build "$build_dir" -j "$(nproc)"
