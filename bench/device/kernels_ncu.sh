#!/usr/bin/env bash
# Each kernel of a 1-layer step (gradients only) under ncu, clocks left alone: its time and its
# speed-of-light shares, summed by name over the timed step (ncu_by_kernel.py), at the
# defaults and, with LAYER_FLAGS (cuda_train_bench flags), once more with them. NCU_S: each
# profile's time limit.
set -uo pipefail
source "$(dirname "$0")/env.sh"
metrics=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
metrics=$metrics,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed
profile() {  # name, cuda_train_bench flags...
  local name=$1
  shift
  timeout "${NCU_S:-240}" ncu --clock-control none --metrics "$metrics" --csv --page raw --print-units base \
    "$B/cuda_train_bench" "$CFG" --layers 1 --reps 1 --grads-only "$@" >"$OUT/ncu_$name.csv" 2>"$OUT/ncu_$name.err"
  echo "ncu $name: rc $? ($(wc -l <"$OUT/ncu_$name.csv") lines)"
  tail -2 "$OUT/ncu_$name.err"
  python3 "$(dirname "$0")/ncu_by_kernel.py" "$OUT/ncu_$name.csv" | tee "$OUT/ncu_$name.txt"
}
profile defaults
if [ -n "${LAYER_FLAGS:-}" ]; then profile flags $LAYER_FLAGS; fi
