#!/usr/bin/env bash
# Compile the SQL workflow into SmolLM2-135M-Instruct on a CPU: the quick start's trajectories
# (runs/quickstart.sh makes them) -> the GGUF's own byte-level BPE tokenizer with our special
# tokens -> 1,024-token rows without the system prompt (the agent carries it in its weights, as
# scratch runs do: 430 tokens a trajectory instead of 630) -> train.py --init-from=smollm2-135m,
# every weight trained, bf16 autocast where the CPU has it, STEPS steps of two rows -> EPISODES fresh
# held-out test episodes through the runtime, 16 at a time.
# About 380 tokens/s on 2 cores with AMX: 240 steps are ~22 minutes, the evaluation of 200 episodes
# ~15 more. EPISODES=0 skips the evaluation.
# Figures: experiments/RESULTS.md. Running it again continues the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-data/sql}
OUT=${OUT:-out/sql_smol}
STEPS=${STEPS:-240}
EPISODES=${EPISODES:-200}
[ -f $D/train.jsonl ] || [ -f $D/smol_train.json ] || { echo "no $D/train.jsonl: run runs/quickstart.sh (or its agentc.data.generate lines) first"; exit 1; }
[ -f $D/smol.bpe.json ] || python -m agentc.data.bpe from-gguf smollm2-135m $D/smol.bpe.json
[ -f $D/smol_train.json ] || python -m agentc.data.pack --tokenizer $D/smol.bpe.json --seq-len 1024 --system drop \
    --out $D/smol_train $D/train.jsonl
[ -f $D/smol_val.json ] || python -m agentc.data.pack --tokenizer $D/smol.bpe.json --seq-len 1024 --system drop \
    --out $D/smol_val $D/test.jsonl
python train.py --data=$D/smol_train --val-data=$D/smol_val --init-from=smollm2-135m \
    --batch-size=2 --max-steps=$STEPS --lr=3e-4 --eval-every=$((STEPS / 4)) --eval-batches=4 --eval-episodes=0 \
    --save-every=$((STEPS / 4)) --keep=2 --log-every=10 --out=$OUT --resume "$@"
if [ "$EPISODES" -gt 0 ]; then
    python infer.py --agent=$OUT --eval --split test --episodes $EPISODES
fi
