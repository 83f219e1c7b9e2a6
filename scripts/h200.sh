#!/usr/bin/env bash
# Builds the CUDA backend for the H200 (sm_90a), runs the GPU tests and the benchmarks
# (ours, then the HF transformers peer in its own process), and prints a short table last.
#
#   scripts/h200.sh [--quick] [--layers N] [--no-peer] [--no-tests] [--gemm] [--kernels] [--ncu]
#                   [--train [LAYERS]]
#
# --gemm times every GEMM tile configuration on the prefill shapes; --kernels every decode-step
# kernel alone in CUDA graphs at 1, 8 and 64 tokens (every GEMM configuration); --ncu records each
# kernel's time (Nsight Compute, clocks left alone) over a 2-layer quick run into $OUT/ncu.csv;
# --no-peer skips the HF transformers peer, --no-tests the GPU tests. --train also times the
# trainer: forward + backward at 4 x 2048 tokens on LAYERS layers (default 8; the peer's --train
# beside it), the gradient GEMMs alone at every tile (cuda_outer_sum_bench), the attention
# backward's kernel forms, the two-CTA multicast GEMM (tma_multicast_gemm) and one RL step at
# as many layers (bench/rl_step_bench.sh).
#
# LOCKSTEP_PREBUILT=DIR uses binaries built elsewhere (lockstep_tests_cuda, cuda_bench,
# lockstep, bench_tokenizer, cuda_train_bench, cuda_outer_sum_bench, cuda_attention_backward_bench,
# tma_multicast_gemm in DIR), for GPU machines that lack the project's build
# dependencies; LOCKSTEP_BUILT_SOURCE is then the source path they were built from.
# Logs go to $OUT when set (else ./h200-out).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/h200-out}"
mkdir -p "$OUT"
QUICK=""
LAYERS=48
PEER=1; RUN_TESTS=1; GEMM=0; NCU=0; KERNELS=0; TRAIN=0; TRAIN_LAYERS=8
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK="--quick" ;;
    --layers) LAYERS="$2"; shift ;;
    --no-peer) PEER=0 ;;
    --no-tests) RUN_TESTS=0 ;;
    --gemm) GEMM=1 ;;
    --kernels) KERNELS=1 ;;
    --ncu) NCU=1 ;;
    --train) TRAIN=1; case "${2:-}" in [0-9]*) TRAIN_LAYERS="$2"; shift ;; esac ;;
    *) echo "h200.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "${LOCKSTEP_PREBUILT:-}" ]; then
  BIN="$(cd "$LOCKSTEP_PREBUILT" && pwd)"
  export LD_LIBRARY_PATH="$BIN/lib:${LD_LIBRARY_PATH:-}"
  built="${LOCKSTEP_BUILT_SOURCE:-}"
  # The tests find their fixtures by the source path they were compiled with.
  if [ -n "$built" ] && [ ! -e "$built" ]; then mkdir -p "$(dirname "$built")" && ln -s "$ROOT" "$built"; fi
  TESTS="$BIN/lockstep_tests_cuda"; BENCH="$BIN/cuda_bench"; CLI="$BIN/lockstep"; TOKB="$BIN/bench_tokenizer"
  TRAINB="$BIN/cuda_train_bench"; OUTERB="$BIN/cuda_outer_sum_bench"; ATTNB="$BIN/cuda_attention_backward_bench"
  MULTICASTB="$BIN/tma_multicast_gemm"
else
  BUILD="$ROOT/build-h200"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DLOCKSTEP_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DCMAKE_CUDA20_STANDARD_COMPILE_OPTION=-std=c++20 -DCMAKE_CUDA20_EXTENSION_COMPILE_OPTION=-std=c++20 \
    >"$OUT/configure.log" 2>&1 || { tail -20 "$OUT/configure.log"; exit 1; }
  cmake --build "$BUILD" -j"$(nproc)" --target lockstep_tests_cuda cuda_bench lockstep bench_tokenizer cuda_train_bench \
    cuda_outer_sum_bench cuda_attention_backward_bench tma_multicast_gemm \
    >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  TESTS="$BUILD/tests/lockstep_tests_cuda"; BENCH="$BUILD/bench/cuda_bench"; CLI="$BUILD/lockstep"
  TOKB="$BUILD/bench/bench_tokenizer"; TRAINB="$BUILD/bench/cuda_train_bench"
  OUTERB="$BUILD/bench/cuda_outer_sum_bench"; ATTNB="$BUILD/bench/cuda_attention_backward_bench"
  MULTICASTB="$BUILD/bench/tma_multicast_gemm"
fi

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"

TESTS_RC=skipped
if [ "$RUN_TESTS" = 1 ]; then
  echo "== GPU tests"
  "$TESTS" --gtest_color=no 2>&1 | tee "$OUT/tests.log" | grep -E '^\[( +OK|  FAILED|  PASSED|  SKIPPED) |^\[cuda|^\[30B|Failure|error' | head -60
  TESTS_RC=${PIPESTATUS[0]}

  echo "== lockstep score --device cuda"
  printf '{"input_ids":[1,2,3,4,5,6,7,8]}\n{"input_ids":[9,8,7]}\n' >"$OUT/score_in.jsonl"
  [ -x "$CLI" ] && "$CLI" score --model "$ROOT/tests/fixtures/hf-tiny-qwen3-moe" --dtype bfloat16 --device cuda \
    --input "$OUT/score_in.jsonl" --output "$OUT/score_out.jsonl" && head -c 300 "$OUT/score_out.jsonl"; echo
fi

if [ "$GEMM" = 1 ]; then
  echo "== GEMM tile configurations (prefill shapes)"
  "$BENCH" "$ROOT/models/qwen3-30b-a3b/config.json" --gemm 2>&1 | tee "$OUT/gemm.log"
fi
if [ "$KERNELS" = 1 ]; then
  echo "== decode-step kernels (us per call in CUDA graphs)"
  "$BENCH" "$ROOT/models/qwen3-30b-a3b/config.json" --decode-kernels 2>&1 | tee "$OUT/decode_kernels.log" | tail -40
fi
if [ "$NCU" = 1 ]; then
  echo "== ncu kernel times (2 layers, quick)"
  timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw --print-units base \
    --launch-count 900 "$BENCH" "$ROOT/models/qwen3-30b-a3b/config.json" --layers 2 --quick >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
  echo "ncu rc $? ($(wc -l <"$OUT/ncu.csv") lines)"; tail -3 "$OUT/ncu.err"
fi

echo "== cuda_bench"
"$BENCH" "$ROOT/models/qwen3-30b-a3b/config.json" --layers "$LAYERS" $QUICK 2>&1 | tee "$OUT/bench.log"
if [ "$PEER" = 1 ]; then
  echo "== HF transformers peer"
  PYTHONUNBUFFERED=1 timeout 420 python3 "$ROOT/bench/hf_peer.py" "$ROOT/models/qwen3-30b-a3b/config.json" \
    --layers "$LAYERS" $QUICK 2>&1 | grep -v Warning | tee "$OUT/hf.log"
fi

if [ "$TRAIN" = 1 ]; then
  echo "== trainer: forward + backward, $TRAIN_LAYERS layers"
  LOCKSTEP_PROFILE_TRAIN=events "$TRAINB" "$ROOT/models/qwen3-30b-a3b/config.json" --layers "$TRAIN_LAYERS" --reps 2 2>&1 |
    tee "$OUT/train_bench.log" | tail -2
  # The TMA kernels in clusters of two CTAs (an operand multicast; the same bits), gradients only.
  "$TRAINB" "$ROOT/models/qwen3-30b-a3b/config.json" --layers "$TRAIN_LAYERS" --reps 3 --grads-only 2>&1 | tail -1 |
    sed 's/^/one CTA: /' | tee -a "$OUT/train_bench.log"
  "$TRAINB" "$ROOT/models/qwen3-30b-a3b/config.json" --layers "$TRAIN_LAYERS" --reps 3 --grads-only --tma-cluster 2 \
    --gemm-cluster 2 2>&1 | tail -1 | sed 's/^/clusters of two: /' | tee -a "$OUT/train_bench.log"
  [ "$PEER" = 1 ] && timeout 420 python3 "$ROOT/bench/hf_peer.py" "$ROOT/models/qwen3-30b-a3b/config.json" --train \
    --layers "$TRAIN_LAYERS" 2>&1 | grep hf_train | tee -a "$OUT/train_bench.log"
  echo "== the gradient GEMMs alone, every tile"
  [ -x "$OUTERB" ] && timeout 120 "$OUTERB" 2>&1 | tee "$OUT/outer_sum_bench.jsonl" | grep -v split_hi_lo |
    sed 's/[{}"]//g'
  echo "== the attention backward, each kernel form"
  [ -x "$ATTNB" ] && timeout 60 "$ATTNB" 2>&1 | tee "$OUT/attention_backward_bench.jsonl"
  echo "== the TMA GEMM with a two-CTA multicast cluster (development kernel)"
  [ -x "$MULTICASTB" ] && timeout 120 "$MULTICASTB" 2>&1 | tee "$OUT/tma_multicast_gemm.jsonl"
  # At 8 layers the step's 8 micro-batches run layer by layer (one gradient buffer: docs/train.md).
  echo "== one RL step, $TRAIN_LAYERS layers"
  LOCKSTEP="$CLI" RESPONSE_LEN=64 MICRO_BATCHES=8 timeout 600 "$ROOT/bench/rl_step_bench.sh" \
    "$ROOT/models/qwen3-30b-a3b/config.json" "$TRAIN_LAYERS" 3 2>&1 | tail -2 | tee "$OUT/rl_step.log"
fi

if [ "$PEER" = 1 ] && [ -x "$TOKB" ] && [ -f "$ROOT/bench/hf_tokenizer_peer.py" ]; then
  echo "== tokenizer"
  export LOCKSTEP_TOKENIZER_DIR="$ROOT/tests/fixtures/qwen3-tokenizer"
  "$TOKB" --dump-text /tmp/tok.txt --dump-ids /tmp/tok_ids.json >/dev/null 2>&1
  "$TOKB" --benchmark_min_time=1 2>&1 | tail -6 | tee "$OUT/tokenizer.log"
  timeout 120 python3 "$ROOT/bench/hf_tokenizer_peer.py" --tokenizer "$LOCKSTEP_TOKENIZER_DIR" --text /tmp/tok.txt \
    --ids /tmp/tok_ids.json 2>&1 | tail -4 | tee -a "$OUT/tokenizer.log"
fi

python3 - "$OUT/bench.log" "$OUT/hf.log" "$TESTS_RC" <<'PY'
import json, sys
ours, peer = {}, {}
for path, into in ((sys.argv[1], ours), (sys.argv[2], peer)):
    try:
        for line in open(path):
            if line.startswith("{"):
                d = json.loads(line)
                ev = d["event"].replace("hf_", "")
                if ev in ("prefill", "decode"):
                    into[(ev, d["batch"])] = d
    except OSError:
        pass
print("\n%-16s %11s %11s %8s %11s %8s" % ("benchmark", "tok/s", "bound", "of bound", "HF tok/s", "vs HF"))
for key in sorted(ours, key=lambda k: (k[0] != "prefill", k[1])):
    d = ours[key]
    bound = d.get("bound_tok_s")
    if key[0] == "prefill":
        bound = d["tok_s"] * 771.0 / d["tflops"]
    p = peer.get(key, {}).get("tok_s")
    print("%-16s %11.1f %11.1f %7.1f%% %11s %8s" % (
        "%s b%d" % key, d["tok_s"], bound, 100 * d["tok_s"] / bound,
        "%.1f" % p if p else "-", "%.2fx" % (d["tok_s"] / p) if p else "-"))
print("GPU tests exit code:", sys.argv[3])
PY
