#!/usr/bin/env bash
# GPU baseline: the ~125M preset on the SQL shards at 4,096 tokens per row, bf16 autocast,
# 8 rows x 4096 = 32k tokens per rank per micro-batch, 128k tokens per optimizer step.
# Make the data first (the data part of runs/quickstart.sh). Pass more flags through: --max-time=1h
# On N GPUs (N = 1, 2 or 4): NPROC=N runs/gpu_baseline.sh; gradient accumulation shrinks to keep
# 128k tokens a step.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-data/sql}
torchrun --standalone --nproc_per_node=${NPROC:-1} train.py --data=$D/train --val-data=$D/val \
    --model=125m --batch-size=8 --total-batch-tokens=131072 --epochs=20 --lr=1e-3 --eval-every=50 \
    --compile --out=out/sql_125m "$@"
