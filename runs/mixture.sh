#!/usr/bin/env bash
# Five workflows in one agent on a CPU: sql, files, code, shop and support -> 6,000 teacher
# trajectories each (10% of calls open with a deliberate, untrained mistake and its fix; 5% of
# tool attempts fail transiently and are retried) -> one tokenizer of 4,096 pieces over all of
# them -> 2,048-token rows, system prompts dropped (the agent tells the workflows apart by the
# request), equal weights -> the quick start's recipe (`mini` with its copy circuit) for 5,000
# steps -> 100 fresh held-out test episodes per workflow. Figures: experiments/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-data/mix}
OUT=${OUT:-out/mix_mini}
N=${N:-6000}
WORKFLOWS="sql files code shop support"
for w in $WORKFLOWS; do
    extra=(); [ $w = sql ] && extra=(--workflow-arg invented=0.9)
    python -m agentc.data.generate --workflow $w --split train --n $N --mistake-rate 0.1 --fault-rate 0.05 "${extra[@]}" \
        --out $D/train_$w.jsonl
    python -m agentc.data.generate --workflow $w --split test --n 100 --out $D/test_$w.jsonl
done
python -m agentc.data.tokenizer train --vocab-size 4096 --out $D/tok $D/train_*.jsonl
python -m agentc.data.pack --tokenizer $D/tok.model --seq-len 2048 --system drop --out $D/train $D/train_*.jsonl
python -m agentc.data.pack --tokenizer $D/tok.model --seq-len 2048 --system drop --out $D/val $D/test_*.jsonl
python -m agentc.data.audit --quiet $D/train $D/val
python train.py --data=$D/train --val-data=$D/val --model=mini --batch-size=2 --max-steps=5000 \
    --lr=5e-3 --eval-every=1000 --eval-batches=8 --eval-episodes=0 --log-every=50 --out=$OUT --resume "$@"
python infer.py --agent=$OUT --eval --workflow all --split test --episodes 100
