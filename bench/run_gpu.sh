#!/usr/bin/env bash
# Run the SFT benchmark on a CUDA machine: bash bench/run_gpu.sh w2 w1 w3   (results: $OUT/results.jsonl)
# Each workload: build random weights, check fast-vs-naive loss equality, then the naive and fast arms.
# Extra runs: RUNS="w2:fast:{\"varlen\":false} w2:fast:{\"liger\":false}" bash bench/run_gpu.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sft_bench}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CAP=${RUN_CAP_S:-240}; START=$(date +%s); DEADLINE=${DEADLINE_S:-560}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
for W in "$@"; do
  [ -f /tmp/model_$W/.ok ] || { python3 bench/sft_bench.py build --workload $W --out /tmp/model_$W && touch /tmp/model_$W/.ok; }
  timeout $CAP python3 bench/sft_bench.py check --workload $W --model-dir /tmp/model_$W --results "$OUT/results.jsonl" 2>&1 | grep -E "^\[result\]|Error"
  for ARM in naive fast; do
    [ "$(left)" -lt 60 ] && { echo "SKIP $W $ARM: $(left)s left"; continue; }
    T=$(( $(left) < CAP ? $(left) : CAP ))
    timeout $T python3 bench/sft_bench.py run --workload $W --arm $ARM --model-dir /tmp/model_$W --results "$OUT/results.jsonl" 2>&1 | grep -E "^\[result\]|Error|error" | cut -c1-900
  done
done
for R in ${RUNS:-}; do
  IFS=: read -r W ARM OV <<< "$R"
  [ "$(left)" -lt 60 ] && { echo "SKIP $R"; continue; }
  timeout $CAP python3 bench/sft_bench.py run --workload $W --arm $ARM --model-dir /tmp/model_$W --overrides "$OV" --results "$OUT/results.jsonl" 2>&1 | grep -E "^\[result\]|Error" | cut -c1-900
done
echo "done in $(( $(date +%s) - START ))s"
