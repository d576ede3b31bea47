#!/usr/bin/env bash
# CPU quick start, the data path: SQL workflow -> 2,000 teacher trajectories -> tokenizer -> shards.
# About 10 seconds on 2 cores (see experiments/results/data_sql_2000.json).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-data/sql}
python -m data.generate --workflow sql --split train --n 2000 --out $D/train.jsonl
python -m data.generate --workflow sql --split test --n 200 --out $D/test.jsonl
python -m data.tokenizer train --vocab-size 8192 --out $D/tok $D/train.jsonl
python -m data.pack --tokenizer $D/tok.model --seq-len 4096 --out $D/train $D/train.jsonl
python -m data.pack --tokenizer $D/tok.model --seq-len 4096 --out $D/val $D/test.jsonl
