#!/usr/bin/env bash
# Runs the newcomer job (docs/train.md, "A job a newcomer can run") and prints its curve: makes
# the arithmetic data with `lockstep arith-data` (the flags of the config's "# arith-data:" line),
# trains with CONFIG, then prints SFT loss,
# rollout reward and eval/arith (mean reward, pass@k) by step from metrics.jsonl.
#
#   [LOCKSTEP=build/lockstep] [CONFIG=configs/arith_grpo.toml] [OUT=arith_out] scripts/newcomer.sh [train flags...]
#
# Extra flags go to `lockstep train` and win over the config (e.g. --num-rollout 20).
# scripts/newcomer_cuda.sh is this with the GPU config.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"  # the configs name the data, model config and tokenizer relative to the root
LOCKSTEP="${LOCKSTEP:-build/lockstep}"
CONFIG="${CONFIG:-configs/arith_grpo.toml}"
OUT="${OUT:-arith_out}"
[ -x "$LOCKSTEP" ] || { echo "newcomer.sh: $LOCKSTEP is not an executable lockstep binary (set LOCKSTEP)" >&2; exit 2; }
[ -f "$CONFIG" ] || { echo "newcomer.sh: no config $CONFIG" >&2; exit 2; }
command -v python3 >/dev/null || { echo "newcomer.sh: python3 is needed to print the curve" >&2; exit 2; }

# The config's "# arith-data: FLAGS" line names the data it reads (default: level 2 in arith_data).
read -r -a DATA_FLAGS <<< "$(sed -n 's/^# arith-data: //p' "$CONFIG" | head -1)"
[ ${#DATA_FLAGS[@]} -gt 0 ] || DATA_FLAGS=(--output-dir arith_data)
"$LOCKSTEP" arith-data "${DATA_FLAGS[@]}"  # deterministic: the same files every time
start=$(date +%s)
"$LOCKSTEP" train --config "$CONFIG" --output-dir "$OUT" --progress=false "$@" 2>&1 | tee "$OUT.log"
echo "wall time: $(( $(date +%s) - start )) s (training and evaluation)"
python3 scripts/metrics_curve.py "$OUT/metrics.jsonl"
