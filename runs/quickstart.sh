#!/usr/bin/env bash
# The quick start on a CPU, end to end: SQL workflow -> 12,000 teacher trajectories (train shops
# mix made-up names into their pools; 10% of calls start with a deliberate, untrained mistake and
# its fix) -> the (presplit) tokenizer -> 2,048-token rows without the constant system prompt,
# which the agent learns instead -> the `mini` preset with its copy circuit, 1,700 steps of 4k
# tokens -> 200 fresh held-out test episodes through the runtime, 16 at a time.
# Figures: experiments/RESULTS.md. Running it again continues the same run (or, when it is done,
# evaluates it again). N=... and train.py flags after the script's name change the run (the last
# value of a flag wins): N=48000 bash runs/quickstart.sh --max-steps=6800 is four times the compute.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-data/sql}
OUT=${OUT:-out/sql_mini}
N=${N:-12000}
python -m agentc.data.generate --workflow sql --split train --n $N --mistake-rate 0.1 --workflow-arg invented=0.9 \
    --out $D/train.jsonl
python -m agentc.data.generate --workflow sql --split test --n 200 --out $D/test.jsonl
python -m agentc.data.tokenizer train --vocab-size 2048 --out $D/tok $D/train.jsonl
python -m agentc.data.pack --tokenizer $D/tok.model --seq-len 2048 --system drop --out $D/train $D/train.jsonl
python -m agentc.data.pack --tokenizer $D/tok.model --seq-len 2048 --system drop --out $D/val $D/test.jsonl
python -m agentc.data.audit --quiet $D/train $D/val  # only the model's own tokens are trained
python train.py --data=$D/train --val-data=$D/val --model=mini --batch-size=2 --max-steps=1700 --lr=5e-3 \
    --eval-every=425 --eval-batches=8 --eval-episodes=0 --log-every=25 --out=$OUT --resume "$@"
python infer.py --agent=$OUT --eval --split test --episodes 200
