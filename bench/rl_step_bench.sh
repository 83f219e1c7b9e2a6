#!/usr/bin/env bash
# One RL step at Qwen3-30B-A3B shapes on one GPU (issue 18's benchmark): 64 prompts x 8 samples
# of arithmetic word problems in chat format (the real Qwen3 tokenizer), rollout, log-prob
# recompute, train (fwd + bwd over canonical micro-batches, AdamW) and the weight update, with
# the time of each part from the run's own perf/* metrics (median over the steps after the
# first, which pays the kernels' first launches).
#
#   bench/rl_step_bench.sh MODEL_CONFIG.json [LAYERS] [STEPS]
#   (LOCKSTEP=path/to/lockstep, default build-cuda/lockstep; RESPONSE_LEN, MICRO_BATCHES)
# The model is MODEL_CONFIG at LAYERS layers (default 2), random bf16 weights (--init-config).
set -euo pipefail
config=${1:?usage: rl_step_bench.sh MODEL_CONFIG.json [LAYERS] [STEPS]}
layers=${2:-2}
steps=${3:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
lockstep=${LOCKSTEP:-$root/build-cuda/lockstep}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$config" "$layers" "$work/model.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["num_hidden_layers"] = int(sys.argv[2])
json.dump(c, open(sys.argv[3], "w"), indent=1)
PY
"$lockstep" arith-data --output-dir "$work/data" --train 2000 --eval 8 > /dev/null
"$lockstep" train --device cuda --dtype bfloat16 --init-config "$work/model.json" \
  --tokenizer "$root/tests/fixtures/qwen3-tokenizer" --prompt-data "$work/data/train.jsonl" --apply-chat-template \
  --rm-type math --sft-warmup-steps 0 --num-rollout "$steps" --rollout-batch-size 64 --n-samples-per-prompt 8 \
  --rollout-max-response-len "${RESPONSE_LEN:-256}" --global-batch-size 512 \
  --num-microbatches "${MICRO_BATCHES:-16}" --output-dir "$work/out" --progress=false
python3 - "$work/out/metrics.jsonl" "$layers" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rl = [r for r in rows if "perf/step_time" in r and "rollout/rewards" in r]
keys = ["perf/step_time", "perf/rollout_time", "perf/log_probs_time", "perf/actor_train_time",
        "perf/update_weights_time"]
later = rl[1:] or rl
out = {"event": "rl_step", "layers": int(sys.argv[2]), "steps": len(rl)}
for k in keys:
    if k in later[0]:
        out[k.split("/")[1]] = round(statistics.median(r[k] for r in later), 3)
for k in ["rollout/response_len/mean", "train/train_rollout_logprob_abs_diff", "perf/tokens_per_gpu_per_sec",
          "perf/recomputed_layers", "perf/layer_major_microbatches"]:
    if k in later[-1]:
        out[k.split("/", 1)[1].replace("/", "_")] = later[-1][k]
print(json.dumps(out))
PY
