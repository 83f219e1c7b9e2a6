#!/usr/bin/env bash
# Starts `lockstep serve` on loopback (any free port), runs bench_serve against it and stops
# the server with SIGTERM. Needs a build with -DLOCKSTEP_BENCH=ON.
#   bench/bench_serve.sh [--model DIR] [--device cpu|cuda] [--dtype D] [-- bench_serve flags]
# Defaults: the tiny test model on the CPU, then bench_serve's defaults. BUILD=dir picks the build.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-build}
serve_flags=(--model tests/fixtures/hf-tiny-qwen3-moe)
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --model) serve_flags[1]=$2; shift 2 ;;
    --device | --dtype | --max-running-requests | --max-batch-tokens) serve_flags+=("$1" "$2"); shift 2 ;;
    *) echo "bench_serve.sh: unknown flag $1 (bench_serve's flags go after --)" >&2; exit 2 ;;
  esac
done
[ "${1:-}" = "--" ] && shift

log=$(mktemp)
"$build/lockstep" serve --host 127.0.0.1 --port 0 --max-queued-requests 4096 "${serve_flags[@]}" >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 600); do  # up to 60 s for the model to load
  grep -q "listening on" "$log" && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
url=$(grep -o 'http://127.0.0.1:[0-9]*' "$log" | head -n 1)
[ -n "$url" ] || { echo "bench_serve.sh: the server did not start" >&2; cat "$log" >&2; exit 1; }
echo "server: ${serve_flags[*]} at $url"
"$build/bench/bench_serve" --url "$url" "$@"
