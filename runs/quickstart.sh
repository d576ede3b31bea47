#!/usr/bin/env bash
# CPU quick start: SQL workflow -> 2,000 teacher trajectories -> tokenizer -> shards -> a tiny model.
# Data: about 10 seconds on 2 cores (experiments/results/data_sql_2000.json).
# Training: 200 steps of 16k tokens, about 8 minutes on 2 cores (experiments/LOG.md); then 200
# held-out test episodes through the runtime (infer.py --eval).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-data/sql}
python -m data.generate --workflow sql --split train --n 2000 --out $D/train.jsonl
python -m data.generate --workflow sql --split test --n 200 --out $D/test.jsonl
python -m data.tokenizer train --vocab-size 8192 --out $D/tok $D/train.jsonl
python -m data.pack --tokenizer $D/tok.model --seq-len 4096 --out $D/train $D/train.jsonl
python -m data.pack --tokenizer $D/tok.model --seq-len 4096 --out $D/val $D/test.jsonl
python train.py --data=$D/train --val-data=$D/val --model=tiny --batch-size=1 --total-batch-tokens=16384 \
    --epochs=4 --lr=3e-3 --eval-every=25 --out=out/sql_tiny --eval-episodes=0 "$@"
python infer.py --agent=out/sql_tiny --eval --split test --episodes 200
