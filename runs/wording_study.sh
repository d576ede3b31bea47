#!/usr/bin/env bash
# Scratch against a pretrained base, with and without the paraphrase grammar, at equal training
# time: one cell per call, resumable (a finished cell is skipped; a killed one continues).
#
#   bash runs/wording_study.sh MODEL PHRASING MINUTES [SEED]
#       MODEL     scratch (the quick start's mini recipe) | smollm2 (runs/smollm2_sql.sh's recipe)
#       PHRASING  rich | plain: how the training prompts are worded (the test split is always rich)
#       MINUTES   15 | 30 | 60: the training budget; steps follow from the speeds measured on a
#                 2-core Xeon with AMX (scratch 3.6 steps/s of 4,096 tokens: 1,700 per 15 min, with
#                 12,000 trajectories per 15 min; smollm2 5.6 s a step of 2,048: 160 per 15 min)
#       SEED      1337 (default), 7, 42
#
# Each cell writes out/study/MODEL_PHRASING_MINUTESm_sSEED/ with its checkpoints, a TIMES file
# (seconds of data, training and evaluation) and, from its evaluation of 200 fresh test
# episodes, eval_test_incremental.json. Collect them with experiments/plot_wording.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?MODEL: scratch or smollm2}; PHRASING=${2:?PHRASING: rich or plain}; MIN=${3:?MINUTES: 15, 30 or 60}
SEED=${4:-1337}
case "$MODEL/$PHRASING/$MIN" in
    scratch/*/15|scratch/*/30|scratch/*/60|smollm2/*/15|smollm2/*/30|smollm2/*/60) ;;
    *) echo "wording_study.sh: expected MODEL in scratch|smollm2 and MINUTES in 15|30|60, got $MODEL $MIN"; exit 2;;
esac
case "$PHRASING" in rich|plain) ;; *) echo "wording_study.sh: PHRASING is rich or plain, got $PHRASING"; exit 2;; esac
N=$((12000 * MIN / 15))
D=data/study/sql_${PHRASING}_$N
OUT=out/study/${MODEL}_${PHRASING}_${MIN}m_s$SEED
mkdir -p $D $OUT
[ -f $OUT/TIMES ] && grep -q eval $OUT/TIMES && { echo "$OUT is done: $(cat $OUT/TIMES)"; exit 0; }
t0=$(date +%s)
[ -f $D/train.jsonl ] || python -m agentc.data.generate --workflow sql --split train --n $N --mistake-rate 0.1 \
    --workflow-arg invented=0.9 --workflow-arg phrasing=$PHRASING --out $D/train.jsonl --resume
[ -f $D/test.jsonl ] || python -m agentc.data.generate --workflow sql --split test --n 200 --out $D/test.jsonl
t1=$(date +%s)
if [ $MODEL = scratch ]; then
    [ -f $D/tok.model ] || python -m agentc.data.tokenizer train --vocab-size 2048 --out $D/tok $D/train.jsonl
    for S in train val; do
        [ -f $D/$S.json ] || python -m agentc.data.pack --tokenizer $D/tok.model --seq-len 2048 --system drop \
            --out $D/$S $D/$([ $S = train ] && echo train || echo test).jsonl
    done
    STEPS=$((1700 * MIN / 15))
    python train.py --data=$D/train --val-data=$D/val --model=mini --batch-size=2 --max-steps=$STEPS --lr=5e-3 \
        --eval-every=$((STEPS / 4)) --eval-batches=8 --eval-episodes=0 --log-every=100 --seed=$SEED --out=$OUT --resume
else
    STEPS=$((160 * MIN / 15))
    D=$D OUT=$OUT STEPS=$STEPS EPISODES=0 bash runs/smollm2_sql.sh --seed=$SEED
fi
t2=$(date +%s)
python infer.py --agent=$OUT --eval --split test --episodes 200 --out $OUT/eval_test_incremental.json
t3=$(date +%s)
echo "data $((t1 - t0)) train $((t2 - t1)) eval $((t3 - t2))" > $OUT/TIMES
cat $OUT/TIMES
