#!/usr/bin/env bash
# Starts `lockstep serve` on loopback (any free port), runs bench_serve against it and stops
# the server with SIGTERM. Needs a build with -DLOCKSTEP_BENCH=ON.
#   bench/bench_serve.sh [--model DIR] [--device cpu|cuda] [--dtype D] [--max-running-requests N]
#                        [--max-batch-tokens N] [-- bench_serve flags]
# The same choices by environment: LOCKSTEP_MODEL, LOCKSTEP_DEVICE, LOCKSTEP_DTYPE (flags win).
# Defaults: the tiny test model on the CPU in float32 from build/; with --device cuda the
# dtype is bfloat16 (the GPU's recipe) and the build build-cuda/. BUILD=dir picks the build;
# LOCKSTEP_BIN and BENCH_SERVE_BIN name the two binaries instead (prebuilt ones in any folder, for
# a GPU machine without the build tools). SERVE_START_S: the seconds the model may take to load
# (default 60, 900 on cuda).
set -euo pipefail
# The binaries as the caller named them, before the cd below changes what a relative path means.
lockstep_bin=${LOCKSTEP_BIN:+$(realpath -m -- "$LOCKSTEP_BIN")}
bench_bin=${BENCH_SERVE_BIN:+$(realpath -m -- "$BENCH_SERVE_BIN")}
cd "$(dirname "$0")/.."
model=${LOCKSTEP_MODEL:-tests/fixtures/hf-tiny-qwen3-moe}
device=${LOCKSTEP_DEVICE:-cpu}
dtype=${LOCKSTEP_DTYPE:-}
extra=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  [ $# -ge 2 ] || { echo "bench_serve.sh: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --model) model=$2 ;;
    --device) device=$2 ;;
    --dtype) dtype=$2 ;;
    --max-running-requests | --max-batch-tokens) extra+=("$1" "$2") ;;
    *) echo "bench_serve.sh: unknown flag $1 (bench_serve's flags go after --)" >&2; exit 2 ;;
  esac
  shift 2
done
[ "${1:-}" = "--" ] && shift
case "$device" in
  cpu) build=${BUILD:-build}; dtype=${dtype:-float32}; start_s=${SERVE_START_S:-60} ;;
  cuda) build=${BUILD:-build-cuda}; dtype=${dtype:-bfloat16}; start_s=${SERVE_START_S:-900} ;;
  *) echo "bench_serve.sh: --device must be cpu or cuda, got '$device'" >&2; exit 2 ;;
esac
[ -d "$model" ] || { echo "bench_serve.sh: model directory '$model' not found" >&2; exit 2; }
lockstep_bin=${lockstep_bin:-$build/lockstep}
bench_bin=${bench_bin:-$build/bench/bench_serve}
for bin in "$lockstep_bin" "$bench_bin"; do
  [ -x "$bin" ] || { echo "bench_serve.sh: $bin not found (build with -DLOCKSTEP_BENCH=ON, or set BUILD, or LOCKSTEP_BIN and BENCH_SERVE_BIN)" >&2; exit 2; }
done
serve_flags=(--model "$model" --device "$device" --dtype "$dtype" "${extra[@]}")

log=$(mktemp)
"$lockstep_bin" serve --host 127.0.0.1 --port 0 --max-queued-requests 4096 "${serve_flags[@]}" >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq $((start_s * 10))); do
  grep -q "listening on" "$log" && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
url=$(grep -o 'http://127.0.0.1:[0-9]*' "$log" | head -n 1 || true)
[ -n "$url" ] || { echo "bench_serve.sh: the server did not start within $start_s s" >&2; cat "$log" >&2; exit 1; }
echo "server: ${serve_flags[*]} at $url"
"$bench_bin" --url "$url" "$@"
