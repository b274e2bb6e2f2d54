#!/usr/bin/env bash
# Two-GPU benchmark of the recipe command: DDP, ZeRO-2, ZeRO-3 and FSDP2 on a random Llama-3.2-1B-shaped model.
# Run from the repository root on a machine with 2 GPUs (torch + transformers + peft preinstalled), with the
# wheels from bench/multi_gpu_wheels.sh carried in .mgwhl/:
#   bash bench/multi_gpu.sh [STRATEGY ...]      # default: ddp zero2 zero3 fsdp2
# Prints one "RESULT {json}" line per strategy and writes them to $OUT/multi_gpu.jsonl (OUT defaults to /tmp).
# DEADLINE_S (default 530): no strategy starts after this many seconds; each is cut at the deadline.
set -o pipefail
cd "$(dirname "$0")/.."
START=$(date +%s); DEADLINE_S=${DEADLINE_S:-530}
OUT=${OUT:-/tmp}; mkdir -p "$OUT"; RESULTS="$OUT/multi_gpu.jsonl"; : > "$RESULTS"
STRATEGIES=("$@"); [ ${#STRATEGIES[@]} -eq 0 ] && STRATEGIES=(ddp zero2 zero3 fsdp2)
el() { echo $(( $(date +%s) - START )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       HF_HUB_DISABLE_TELEMETRY=1 DS_BUILD_OPS=0
SITE=/tmp/site_mg
if [ ! -f $SITE/.ok ]; then
  rm -rf $SITE; mkdir -p $SITE
  PIP="python3 -m pip install -q --no-index --no-deps --no-cache-dir --target $SITE"
  $PIP .mgwhl/*.whl || exit 1
  # DeepSpeed ships only as source; build it here against this machine's torch/CUDA (no ops compiled now:
  # DS_BUILD_OPS=0, they are JIT-built if ever needed). The wheel built on a CPU machine is the fallback.
  if ! PYTHONPATH=$SITE python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
         --target $SITE/ds .mgwhl/deepspeed-*.tar.gz; then
    echo "[multi_gpu] building deepspeed from source failed; using the prebuilt wheel with DS_ACCELERATOR=cuda"
    $PIP .mgwhl/prebuilt/deepspeed-*.whl
  else
    cp -r $SITE/ds/* $SITE/ && rm -rf $SITE/ds
  fi
  touch $SITE/.ok
fi
export PYTHONPATH=$SITE:$PWD DS_ACCELERATOR=cuda
echo "[multi_gpu] site ready at $(el)s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, trl, peft, datasets, accelerate, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__, '| accelerate', accelerate.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | grep -v -i warn
PREP=/tmp/mg_prepared
if [ ! -f $PREP/prepared.json ]; then
  python3 bench/multi_gpu.py prepare --out $PREP --shape 1b --device cuda || exit 1
fi
echo "[multi_gpu] model and data ready at $(el)s"
PORT=29600
for S in "${STRATEGIES[@]}"; do
  LEFT=$(( DEADLINE_S - $(el) ))
  if [ $LEFT -lt 45 ]; then echo "[multi_gpu] SKIP $S: only ${LEFT}s left"; echo "{\"strategy\": \"$S\", \"status\": \"skipped: deadline\"}" >> "$RESULTS"; continue; fi
  PORT=$((PORT + 1))
  echo "[multi_gpu] START $S (timeout ${LEFT}s) at $(el)s"
  timeout $LEFT python3 -m accelerate.commands.launch --config_file configs/accelerate/$S.yaml --num_processes 2 \
      --main_process_port $PORT bench/multi_gpu.py train --strategy $S --prepared $PREP --results "$RESULTS" \
      2>&1 | grep -vE "it/s\]|s/it\]|Warning|warnings.warn|^\s*$" | tail -n 40
  RC=$?
  if ! grep -q "\"strategy\": \"$S\"" "$RESULTS"; then
    echo "{\"strategy\": \"$S\", \"status\": \"error\", \"error\": \"exit code $RC (124 = killed at the deadline); see the log above\"}" >> "$RESULTS"
  fi
  echo "[multi_gpu] END $S at $(el)s"
done
echo "[multi_gpu] all done at $(el)s"; cat "$RESULTS"
