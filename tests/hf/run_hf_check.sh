#!/usr/bin/env bash
# The whole `--save-hf` -> HF transformers check in one command (issue 19): makes a tiny random
# Qwen3-MoE with the real Qwen3 tokenizer (configs/arith_model.json, tied embeddings, and an
# untied copy of it), trains each for a few SFT steps and one RL step on `lockstep arith-data`
# problems, writes it with --save-hf, scores chat sequences with `lockstep score`, renders and
# encodes chat prompts with `lockstep tokenize`, and runs check_hf_load.py on the result.
#
#   tests/hf/run_hf_check.sh LOCKSTEP_BINARY [WORK_DIR]
#
# Needs python3 with torch and transformers (PYTHON=... picks another interpreter); exits 77
# (ctest: SKIPPED) before any work where they are missing.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 LOCKSTEP_BINARY [WORK_DIR]" >&2
  exit 2
fi
LOCKSTEP=$1
[[ -x $LOCKSTEP ]] || { echo "$0: $LOCKSTEP is not an executable lockstep binary" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${2:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import torch, transformers' 2>/dev/null; then
  echo "SKIP: $PYTHON cannot import torch and transformers"
  exit 77
fi

rm -rf "$WORK"
mkdir -p "$WORK"
"$LOCKSTEP" arith-data --output-dir "$WORK/data" --train 32 --eval 4 --seed 3

# Chat prompts for the tokenizer check (rendered by lockstep tokenize) and, as whole
# conversations, the sequences to score. Plain-text lines check encoding without the template.
"$PYTHON" - "$WORK/data/sft.jsonl" > "$WORK/chat.jsonl" <<'EOF'
import json, sys
demos = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")][:6]
for i, d in enumerate(demos):
    msgs = [{"role": "user", "content": d["prompt"]}]
    if i % 2:  # a finished conversation: the demonstration as the assistant's turn
        msgs.append({"role": "assistant", "content": d["response"]})
        print(json.dumps({"messages": msgs, "add_generation_prompt": False, "enable_thinking": False}))
    else:
        print(json.dumps({"messages": msgs, "enable_thinking": i % 4 == 0}))
print(json.dumps({"messages": [{"role": "system", "content": "Answer in \\boxed{}."},
                               {"role": "user", "content": "Café: 3½ × 2 = ? — 日本語 too"}]}))
for text in ["The answer is \\boxed{\\frac{8}{3}}.", "  leading spaces,\ttabs\nand 12345678 digits", "émoji 🙂 ok"]:
    print(json.dumps({"text": text}))
EOF

run_model() {  # $1: name, $2: model config json
  local name=$1 out="$WORK/$1"
  "$LOCKSTEP" train --init-config "$2" --model-seed 5 --tokenizer "$ROOT/tests/fixtures/qwen3-tokenizer" \
    --prompt-data "$WORK/data/train.jsonl" --sft-data "$WORK/data/sft.jsonl" --apply-chat-template \
    --enable-thinking=false --rm-type math --sft-warmup-steps 4 --num-rollout 1 --rollout-batch-size 2 \
    --n-samples-per-prompt 2 --global-batch-size 4 --num-microbatches 1 --rollout-max-response-len 8 --lr 0.01 \
    --dtype float32 --save-hf "$out/hf" --output-dir "$out/run" --progress=false
  local model="$out/hf/iter_0000001"
  "$LOCKSTEP" tokenize --model "$model" < "$WORK/chat.jsonl" > "$out/chat_ids.jsonl"
  "$PYTHON" -c 'import json, sys
for l in sys.stdin:
    print(json.dumps({"input_ids": json.loads(l)["input_ids"]}))' < "$out/chat_ids.jsonl" > "$out/sequences.jsonl"
  "$LOCKSTEP" score --model "$model" --dtype float32 --input "$out/sequences.jsonl" --output "$out/scores.jsonl"
  echo "== $name: $model"
  "$PYTHON" "$HERE/check_hf_load.py" --model "$model" --sequences "$out/sequences.jsonl" \
    --scores "$out/scores.jsonl" --chat "$WORK/chat.jsonl" --chat-ids "$out/chat_ids.jsonl"
}

run_model tied "$ROOT/configs/arith_model.json"
sed 's/"tie_word_embeddings": true/"tie_word_embeddings": false/' "$ROOT/configs/arith_model.json" > "$WORK/untied.json"
grep -q '"tie_word_embeddings": false' "$WORK/untied.json" || { echo "$0: could not make the untied config" >&2; exit 1; }
run_model untied "$WORK/untied.json"
echo "hf check: both models pass"
