#!/usr/bin/env bash
# Installs, builds and runs every test: the CPU suite, the parsers' fuzz tests under
# AddressSanitizer, and (where nvcc exists) a compile of the CUDA backend, whose GPU tests
# skip on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
jobs=$(nproc)

echo "== build (Release, CPU)"
scripts/build.sh
echo "== tests"
ctest --test-dir build --output-on-failure -j "$jobs" --timeout 600

echo "== fuzz tests under AddressSanitizer"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOCKSTEP_ASAN=ON -DLOCKSTEP_BENCH=OFF >/dev/null
cmake --build build-asan -j "$jobs" --target lockstep_tests_checkpoint
ASAN_OPTIONS=detect_leaks=1 build-asan/tests/lockstep_tests_checkpoint --gtest_brief=1
if [ -x build-asan/tests/lockstep_tests_tokenizer ] || cmake --build build-asan -j "$jobs" --target lockstep_tests_tokenizer >/dev/null 2>&1; then
  ASAN_OPTIONS=detect_leaks=1 build-asan/tests/lockstep_tests_tokenizer --gtest_brief=1 --gtest_filter='*Fuzz*:*Invalid*'
fi

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "== CUDA backend (compile; GPU tests skip without a GPU)"
  export PATH="$PATH:/usr/local/cuda/bin"
  LOCKSTEP_BUILD_DIR=build-cuda LOCKSTEP_CUDA=1 scripts/build.sh -DLOCKSTEP_BENCH=OFF
  for t in build-cuda/tests/lockstep_tests_cuda; do
    if [ -x "$t" ]; then "$t" --gtest_brief=1; fi
  done
fi
echo "== all tests passed"
