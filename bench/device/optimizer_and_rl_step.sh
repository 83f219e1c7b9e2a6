#!/usr/bin/env bash
# On an H200 (8 layers with AdamW need ~120 GB): the 8-layer step with AdamW, then the RL step
# at 8 layers (bench/rl_step_bench.sh), the host's and the GPU's memory sampled every 5 s.
# TRAIN_FLAGS: cuda_train_bench flags; RL_S: the RL step's time limit; RL_STEPS: its steps.
set -uo pipefail
source "$(dirname "$0")/env.sh"
t0=$(date +%s)
(while true; do
  echo "$(($(date +%s) - t0)) $(free -m | awk '/Mem:/ {print $3, $7}')" \
    "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)"
  sleep 5
done) >"$OUT/mem.log" 2>&1 &
sampler=$!
timeout 150 "$B/cuda_train_bench" "$CFG" --layers 8 --reps 2 ${TRAIN_FLAGS:-} >"$OUT/adamw.log" 2>&1
echo "8 layers with AdamW: rc $? $(grep -o '"seconds":[0-9.]*\|"adamw_seconds":[0-9.]*\|"mfu_vs_measured_peak":[0-9.]*' \
  "$OUT/adamw.log" | tr '\n' ' ')"
tail -3 "$OUT/adamw.log" | cut -c1-300
LOCKSTEP=$B/lockstep RESPONSE_LEN=64 MICRO_BATCHES=8 timeout "${RL_S:-330}" bench/rl_step_bench.sh "$CFG" 8 \
  "${RL_STEPS:-3}" >"$OUT/rl.log" 2>&1
echo "RL step, 8 layers: rc $?"
tail -4 "$OUT/rl.log" | cut -c1-900
kill $sampler
echo "the most host memory used (s, MB used, MB available, GPU MiB):"
sort -k2 -n "$OUT/mem.log" | tail -1
echo "the most GPU memory:"
sort -k4 -n "$OUT/mem.log" | tail -1
echo "total $(($(date +%s) - t0)) s"
