#!/usr/bin/env bash
# Packs binaries built here (build-cuda: stripped) and the shared libraries they need beyond
# glibc, libstdc++ and CUDA's own into .devpack/bin.tar.xz, for a GPU machine that lacks the
# project's build dependencies; the build's source path goes with them (the tests find their
# fixtures there). .devpack/ is ignored by git and carried to the device (bench/device/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${LOCKSTEP_BUILD_DIR:-build-cuda}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/devpack_bin/lib" .devpack
for b in lockstep tests/lockstep_tests_cuda bench/cuda_train_bench bench/cuda_attention_backward_bench \
  bench/cuda_outer_sum_bench bench/cuda_bench; do
  if [ -x "$build/$b" ]; then
    cp "$build/$b" "$stage/devpack_bin/"
    strip "$stage/devpack_bin/$(basename "$b")"
  fi
done
for f in "$stage"/devpack_bin/*; do [ -f "$f" ] && ldd "$f" | awk '/=>/ {print $3}'; done | sort -u |
  grep -v -E 'libc\.so|libm\.so|libdl|libpthread|ld-linux|libcuda\.so|librt|libstdc\+\+|libgcc_s|libcublas|libnccl|libcudart' |
  while read -r lib; do cp -L "$lib" "$stage/devpack_bin/lib/"; done
sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$build/CMakeCache.txt" >"$stage/devpack_bin/source_dir"
tar -C "$stage" -cJf .devpack/bin.tar.xz devpack_bin
ls -la .devpack/bin.tar.xz
