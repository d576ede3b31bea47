#!/usr/bin/env bash
# CPU quick start, end to end: SQL workflow -> 6,000 teacher trajectories -> tokenizer -> shards ->
# the small preset (7M parameters) for 280 steps of 8k tokens -> 200 held-out test episodes through
# the runtime. Measured time and success rate: README ("Quick start") and experiments/LOG.md.
# Re-running it continues (or, when done, just re-evaluates) the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-data/sql}
OUT=${OUT:-out/sql_small}
python -m data.generate --workflow sql --split train --n 6000 --out $D/train.jsonl
python -m data.generate --workflow sql --split test --n 200 --out $D/test.jsonl
python -m data.tokenizer train --presplit --vocab-size 8192 --out $D/tok $D/train.jsonl
python -m data.pack --tokenizer $D/tok.model --seq-len 2048 --out $D/train $D/train.jsonl
python -m data.pack --tokenizer $D/tok.model --seq-len 2048 --out $D/val $D/test.jsonl
python train.py --data=$D/train --val-data=$D/val --model=small --batch-size=2 --total-batch-tokens=8192 \
    --max-steps=280 --lr=3e-3 --eval-every=70 --eval-batches=8 --eval-episodes=0 --out=$OUT --resume "$@"
python infer.py --agent=$OUT --eval --split test --episodes 200
