#!/usr/bin/env bash
# The load test of `lockstep serve` at a real model's shapes where no checkpoint is at hand: takes
# a config.json (default Qwen3-30B-A3B's), keeps its vocabulary and hidden/expert shapes but only
# --layers decoder layers, writes a random-init model of it with `lockstep init` (Qwen3 tokenizer
# copied in), then runs bench/bench_serve.sh once per load and prints one table last. Random
# weights sample random tokens; ignore_eos fixes every output's length, so the timing is a real
# model's (of that depth) all the same.
#
#   bench/serve_real_size.sh [--device cuda|cpu] [--config F] [--layers 4] [--out DIR]
#                            [--loads "1:512:40 16:512:320 64:512:640"] [--max-tokens 128]
#                            [--warmup N] [--tokenizer DIR|none] [--model-seed 7]
#
# A load is CONCURRENCY:PROMPT_TOKENS:REQUESTS; each runs on a fresh server after --warmup
# requests (default: the load's concurrency) left out of its figures. --out (default
# serve-real-size-out) gets config.json, model/ (kept for the next run with the same config, seed
# and tokenizer), load_cC_pP_rR.json per load (bench_serve's JSON) and table.txt. The binaries: LOCKSTEP_BIN and
# BENCH_SERVE_BIN (default build-cuda/ on cuda, build/ on cpu: BUILD picks another build).
# Exits 1 when a load had failed requests (the table still prints).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
device=cuda config=$root/models/qwen3-30b-a3b/config.json layers=4 out=serve-real-size-out
loads="1:512:40 16:512:320 64:512:640" max_tokens=128 warmup="" model_seed=7
tokenizer=$root/tests/fixtures/qwen3-tokenizer
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "serve_real_size.sh: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --device) device=$2 ;;
    --config) config=$2 ;;
    --layers) layers=$2 ;;
    --out) out=$2 ;;
    --loads) loads=$2 ;;
    --max-tokens) max_tokens=$2 ;;
    --warmup) warmup=$2 ;;
    --tokenizer) tokenizer=$2 ;;
    --model-seed) model_seed=$2 ;;
    *) echo "serve_real_size.sh: unknown flag $1" >&2; exit 2 ;;
  esac
  shift 2
done
[ -f "$config" ] || { echo "serve_real_size.sh: --config $config not found" >&2; exit 2; }
[[ "$layers" =~ ^[1-9][0-9]*$ ]] || { echo "serve_real_size.sh: --layers must be a positive integer, got '$layers'" >&2; exit 2; }
[[ "$max_tokens" =~ ^[1-9][0-9]*$ ]] || { echo "serve_real_size.sh: --max-tokens must be a positive integer, got '$max_tokens'" >&2; exit 2; }
[ -z "$warmup" ] || [[ "$warmup" =~ ^[0-9]+$ ]] || { echo "serve_real_size.sh: --warmup must be an integer >= 0, got '$warmup'" >&2; exit 2; }
for load in $loads; do
  [[ "$load" =~ ^[1-9][0-9]*:[1-9][0-9]*:[1-9][0-9]*$ ]] ||
    { echo "serve_real_size.sh: --loads: '$load' is not CONCURRENCY:PROMPT_TOKENS:REQUESTS" >&2; exit 2; }
done
[ -n "$loads" ] || { echo "serve_real_size.sh: --loads is empty" >&2; exit 2; }
if [ "$tokenizer" = none ]; then tokenizer=""; else
  [ -f "$tokenizer/tokenizer.json" ] || { echo "serve_real_size.sh: --tokenizer $tokenizer has no tokenizer.json (or say none)" >&2; exit 2; }
fi

case "$device" in
  cpu) build=${BUILD:-$root/build} ;;
  cuda) build=${BUILD:-$root/build-cuda} ;;
  *) echo "serve_real_size.sh: --device must be cpu or cuda, got '$device'" >&2; exit 2 ;;
esac
LOCKSTEP_BIN=${LOCKSTEP_BIN:-$build/lockstep}
BENCH_SERVE_BIN=${BENCH_SERVE_BIN:-$build/bench/bench_serve}
for bin in "$LOCKSTEP_BIN" "$BENCH_SERVE_BIN"; do
  [ -x "$bin" ] || { echo "serve_real_size.sh: $bin not found (set LOCKSTEP_BIN and BENCH_SERVE_BIN, or BUILD)" >&2; exit 2; }
done
# bench_serve.sh runs the same two binaries, named absolutely (it changes directory).
LOCKSTEP_BIN=$(realpath -- "$LOCKSTEP_BIN") BENCH_SERVE_BIN=$(realpath -- "$BENCH_SERVE_BIN")
export LOCKSTEP_BIN BENCH_SERVE_BIN

# (a) The config at the asked depth: every other field (vocabulary, shapes, experts) kept.
[ "$(grep -c '"num_hidden_layers"' "$config")" = 1 ] ||
  { echo "serve_real_size.sh: $config: expected one \"num_hidden_layers\" field" >&2; exit 2; }
vocab=$(grep -o '"vocab_size"[[:space:]]*:[[:space:]]*[0-9]*' "$config" | grep -o '[0-9]*$' || true)
[ -n "$vocab" ] || { echo "serve_real_size.sh: $config: no \"vocab_size\" field" >&2; exit 2; }
mkdir -p "$out"
out=$(realpath -- "$out")
sed -E "s/(\"num_hidden_layers\"[[:space:]]*:[[:space:]]*)[0-9]+/\1$layers/" "$config" >"$out/config.json"

# (b) The random-init model directory (bfloat16: the exact weights the GPU serves, half the bytes),
# remade only when the config, seed or tokenizer changed: at real shapes it is gigabytes.
stamp="$(cat "$out/config.json")
seed $model_seed
tokenizer ${tokenizer:+$(realpath -- "$tokenizer")}"
t0=$SECONDS
if [ -f "$out/model/config.json" ] && [ "$stamp" = "$(cat "$out/model.source" 2>/dev/null)" ]; then
  echo "model: $out/model (reused: the same config, seed and tokenizer)"
else
  rm -rf "$out/model" "$out/model.source"
  "$LOCKSTEP_BIN" init --config "$out/config.json" --output "$out/model" --dtype bfloat16 \
    --model-seed "$model_seed" ${tokenizer:+--tokenizer "$tokenizer"}
  printf '%s\n' "$stamp" >"$out/model.source"
  echo "model: $out/model (num_hidden_layers $layers, written in $((SECONDS - t0)) s)"
fi

# (c) One fresh server per load (bench_serve.sh starts and stops it).
max_id=$((vocab < 150000 ? vocab : 150000))  # below Qwen3's special tokens, inside the vocabulary
status=0
jsons=()
for load in $loads; do
  IFS=: read -r conc prompt requests <<<"$load"
  json=$out/load_c${conc}_p${prompt}_r${requests}.json
  echo "== load: concurrency $conc, prompt $prompt, output $max_tokens tokens, $requests requests"
  t0=$SECONDS
  if ! "$root/bench/bench_serve.sh" --device "$device" --model "$out/model" -- --requests "$requests" \
    --concurrency "$conc" --prompt-tokens "$prompt" --max-tokens "$max_tokens" --max-id "$max_id" \
    --warmup "${warmup:-$conc}" --json 2>&1 | tee "$out/load.log"; then
    status=1
  fi
  # bench_serve's JSON is its one line that starts with '{'; a server that never started leaves none.
  grep '^{' "$out/load.log" | tail -n 1 >"$json" || { echo "serve_real_size.sh: no result for load $load" >&2; status=1; }
  jsons+=("$json")
  echo "   ($((SECONDS - t0)) s with the server's start)"
done
rm -f "$out/load.log"

# (d) The table, last.
field() { grep -o "\"$2\":[^,}]*" "$1" | head -n 1 | cut -d: -f2; }
{
  echo "lockstep serve --device $device: $config's shapes, num_hidden_layers $layers (random init),"
  echo "output $max_tokens tokens per request (ignore_eos); figures after each load's warmup"
  printf '%-11s %-7s %-9s %-11s %-13s %-13s %-15s %s\n' concurrency prompt requests requests/s \
    "p50 lat ms" "p99 lat ms" "output tok/s" failures
  for json in "${jsons[@]}"; do
    if [ -s "$json" ]; then
      printf '%-11s %-7s %-9s %-11.2f %-13.1f %-13.1f %-15.1f %s\n' "$(field "$json" concurrency)" \
        "$(field "$json" prompt_tokens)" "$(field "$json" requests)" "$(field "$json" requests_per_s)" \
        "$(field "$json" latency_p50_ms)" "$(field "$json" latency_p99_ms)" \
        "$(field "$json" output_tokens_per_s)" "$(field "$json" failures)"
    else
      echo "$(basename "$json"): no result (see the log above)"
    fi
  done
} | tee "$out/table.txt"
exit $status
