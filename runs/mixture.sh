#!/usr/bin/env bash
# Five workflows in one agent on a CPU: sql, files, code, shop and support -> N teacher
# trajectories each, worded by the paraphrase grammar (10% of calls open with a deliberate,
# untrained mistake and its fix; 5% of tool attempts fail transiently and are retried) -> rows
# without the system prompts (the agent tells the workflows apart by the request), equal weights
# -> one of two recipes -> EPISODES fresh held-out test episodes per workflow.
#   MODEL=scratch (default): one tokenizer of 4,096 pieces over all five, 2,048-token rows, the
#       quick start's `mini` with its copy circuit for 5,000 steps; N=6000, EPISODES=100.
#   MODEL=smollm2: SmolLM2-135M-Instruct by runs/smollm2_sql.sh's recipe (1,024-token rows, every
#       weight trained, bf16) for STEPS=240 steps (~23 min); N=2000, EPISODES=40 (~15 min).
# Figures: experiments/RESULTS.md. Running it again continues the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-scratch}
case "$MODEL" in
    scratch) D=${D:-data/mix}; OUT=${OUT:-out/mix_mini}; N=${N:-6000}; EPISODES=${EPISODES:-100};;
    smollm2) D=${D:-data/mix_smol}; OUT=${OUT:-out/mix_smol}; N=${N:-2000}; EPISODES=${EPISODES:-40};;
    *) echo "mixture.sh: MODEL is scratch or smollm2, got $MODEL"; exit 2;;
esac
WORKFLOWS="sql files code shop support"
for w in $WORKFLOWS; do
    extra=(); [ $w = sql ] && extra=(--workflow-arg invented=0.9)
    [ -f $D/train_$w.jsonl ] || python -m agentc.data.generate --workflow $w --split train --n $N --mistake-rate 0.1 \
        --fault-rate 0.05 "${extra[@]}" --out $D/train_$w.jsonl --resume
    [ -f $D/test_$w.jsonl ] || python -m agentc.data.generate --workflow $w --split test --n 100 --out $D/test_$w.jsonl
done
if [ $MODEL = scratch ]; then
    [ -f $D/tok.model ] || python -m agentc.data.tokenizer train --vocab-size 4096 --out $D/tok $D/train_*.jsonl
    [ -f $D/train.json ] || python -m agentc.data.pack --tokenizer $D/tok.model --seq-len 2048 --system drop \
        --out $D/train $D/train_*.jsonl
    [ -f $D/val.json ] || python -m agentc.data.pack --tokenizer $D/tok.model --seq-len 2048 --system drop \
        --out $D/val $D/test_*.jsonl
    python -m agentc.data.audit --quiet $D/train $D/val
    python train.py --data=$D/train --val-data=$D/val --model=mini --batch-size=2 --max-steps=5000 \
        --lr=5e-3 --eval-every=1000 --eval-batches=8 --eval-episodes=0 --log-every=50 --out=$OUT --resume "$@"
else
    [ -f $D/smol.bpe.json ] || python -m agentc.data.bpe from-gguf smollm2-135m $D/smol.bpe.json
    [ -f $D/smol_train.json ] || python -m agentc.data.pack --tokenizer $D/smol.bpe.json --seq-len 1024 --system drop \
        --out $D/smol_train $D/train_*.jsonl
    [ -f $D/smol_val.json ] || python -m agentc.data.pack --tokenizer $D/smol.bpe.json --seq-len 1024 --system drop \
        --out $D/smol_val $D/test_*.jsonl
    D=$D OUT=$OUT STEPS=${STEPS:-240} EPISODES=0 bash runs/smollm2_sql.sh "$@"
fi
python infer.py --agent=$OUT --eval --workflow all --split test --episodes $EPISODES
