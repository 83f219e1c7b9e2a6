#!/usr/bin/env bash
# The newcomer job at a GPU size on one GPU (configs/arith_grpo_cuda.toml, --device cuda
# --dtype bfloat16): makes the data, trains, and prints the curve (scripts/newcomer.sh).
#
#   [LOCKSTEP=build-cuda/lockstep] [OUT=arith_cuda_out] scripts/newcomer_cuda.sh [train flags...]
set -euo pipefail
export LOCKSTEP="${LOCKSTEP:-build-cuda/lockstep}"
export CONFIG="${CONFIG:-configs/arith_grpo_cuda.toml}"
export OUT="${OUT:-arith_cuda_out}"
exec "$(dirname "$0")/newcomer.sh" "$@"
