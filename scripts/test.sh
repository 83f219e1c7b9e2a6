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
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOCKSTEP_ASAN=ON -DLOCKSTEP_BENCH=OFF \
  -DLOCKSTEP_TESTS_NEED_BINARY=OFF >/dev/null
cmake --build build-asan -j "$jobs" --target lockstep_tests_checkpoint lockstep_tests_tokenizer
ASAN_OPTIONS=detect_leaks=1 build-asan/tests/lockstep_tests_checkpoint --gtest_brief=1
ASAN_OPTIONS=detect_leaks=1 build-asan/tests/lockstep_tests_tokenizer --gtest_brief=1 --gtest_filter='*Fuzz*:*Invalid*'

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "== CUDA backend (compile; GPU tests skip without a GPU)"
  export PATH="$PATH:/usr/local/cuda/bin"
  cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOCKSTEP_CUDA=ON -DLOCKSTEP_BENCH=OFF >/dev/null
  cmake --build build-cuda -j "$jobs" --target lockstep lockstep_tests_cuda
  build-cuda/tests/lockstep_tests_cuda --gtest_brief=1
fi
echo "== all tests passed"
