#!/usr/bin/env bash
# The GPU suite, the attention backward's kernel forms, the 8-layer step (gradients only) at the
# defaults and with AB_FLAGS (cuda_train_bench flags; several settings separated by ';', each
# run after a defaults run, the whole round twice), and the HF transformers peer, in one lease.
# SUITE_S: the suite's time limit; SUITE_FILTER: a gtest filter; PEER=0: no peer.
set -uo pipefail
source "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
timeout "${SUITE_S:-280}" "$B/lockstep_tests_cuda" --gtest_color=no ${SUITE_FILTER:+--gtest_filter=$SUITE_FILTER} \
  >"$OUT/tests.log" 2>&1
echo "suite rc $? in $(($(date +%s) - t0)) s"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|Failure|rror" "$OUT/tests.log" | head -20
timeout 60 "$B/cuda_attention_backward_bench" >"$OUT/attn.jsonl" 2>&1
sed 's/"event":"attention_backward",//' "$OUT/attn.jsonl"
runs=("" "")
if [ -n "${AB_FLAGS:-}" ]; then
  IFS=';' read -r -a variants <<<"$AB_FLAGS"
  runs=()
  for round in 1 2; do
    for v in "${variants[@]}"; do runs+=("" "$v"); done
  done
fi
for flags in "${runs[@]}"; do
  timeout 120 "$B/cuda_train_bench" "$CFG" --layers 8 --grads-only --reps 3 $flags >"$OUT/step.log" 2>&1
  echo "8 layers [$flags] $(grep -o '"seconds":[0-9.]*\|"mfu_vs_measured_peak":[0-9.]*' "$OUT/step.log" | tr '\n' ' ')"
  cat "$OUT/step.log" >>"$OUT/train_bench.log"
done
if [ "${PEER:-1}" = 1 ]; then
  PYTHONUNBUFFERED=1 timeout 240 python3 bench/hf_peer.py "$CFG" --train --layers 8 2>&1 | grep -v Warn |
    tee "$OUT/hf.log" | grep hf_train
fi
echo "total $(($(date +%s) - t0)) s"
