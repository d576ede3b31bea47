#!/usr/bin/env bash
# Compile the SQL workflow into SmolLM2-135M-Instruct on a CPU: the quick
# start's trajectories (runs/quickstart.sh makes them) -> the GGUF's own byte-level BPE tokenizer
# with our special tokens -> 1,024-token rows WITH the system prompt (a pretrained model can read
# the instructions and the tool list) -> train.py --init-from=smollm2-135m for STEPS steps of one
# row -> EPISODES fresh held-out test episodes through the runtime, on the last checkpoint
# (EVAL_ALL=1: on each of the 4). Figures: experiments/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-data/sql}
OUT=${OUT:-out/sql_smol}
STEPS=${STEPS:-120}
EPISODES=${EPISODES:-50}
[ -f $D/train.jsonl ] || { echo "no $D/train.jsonl: run runs/quickstart.sh (or its agentc.data.generate lines) first"; exit 1; }
python -m agentc.data.bpe from-gguf smollm2-135m $D/smol.bpe.json
python -m agentc.data.pack --tokenizer $D/smol.bpe.json --seq-len 1024 --out $D/smol_train $D/train.jsonl
python -m agentc.data.pack --tokenizer $D/smol.bpe.json --seq-len 1024 --out $D/smol_val $D/test.jsonl
python train.py --data=$D/smol_train --val-data=$D/smol_val --init-from=smollm2-135m --batch-size=1 \
    --max-steps=$STEPS --lr=2e-4 --eval-every=$((STEPS / 4)) --eval-batches=4 --eval-episodes=0 \
    --save-every=$((STEPS / 4)) --keep=4 --log-every=5 --out=$OUT --resume "$@"
# Decoding a 135M model on a CPU takes tens of seconds an episode, so by default only the last
# checkpoint is evaluated; EVAL_ALL=1 adds the others (success against training tokens:
# experiments/compare_runs.py), skipping those already done.
if [ "${EVAL_ALL:-0}" = 1 ]; then
    for CK in $OUT/step_*; do
        [ -f $CK/eval_test_incremental.json ] || python infer.py --agent=$CK --eval --split test --episodes $EPISODES
    done
else
    python infer.py --agent=$OUT --eval --split test --episodes $EPISODES
fi
