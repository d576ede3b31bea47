#!/usr/bin/env bash
# Each on-policy lever measured on its own, from one agent: the plain recipe (more steps on teacher
# data), + DAgger, + expert iteration, + the family curriculum, each for ROUNDS rounds of
# runs/onpolicy.sh with the same steps and the same teacher records, then the same 200 test tasks.
# Round 1's collection is shared by the arms (the same agent plays the same tasks); later rounds
# collect from each arm's own agent.
#   AGENT=out/qs_full D=data/qs_full OUT=out/levers bash experiments/onpolicy_levers.sh
#   AGENT=out/smol_base D=data/qs_full OUT=out/smol_levers N=150 QUANT=int8 TOK=data/qs_full/smol.bpe.json \
#       SEQ=1024 VAL=data/qs_full/smol_val LR=1e-4 STEPS=80 TEACHER_N=400 EVAL_EPISODES=100 \
#       ARMS="dagger_expert_curriculum plain" bash experiments/onpolicy_levers.sh      # SmolLM2
# Other variables go to runs/onpolicy.sh; EVAL_EPISODES test tasks (default 200) judge each arm.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENT=${AGENT:-out/sql_mini}
D=${D:-data/sql}
OUT=${OUT:-out/onpolicy_levers}
N=${N:-600}
ROUNDS=${ROUNDS:-1}
ARMS=${ARMS:-"plain dagger dagger_expert dagger_expert_curriculum"}
mkdir -p $OUT/shared
[ -f $OUT/shared/onpolicy.jsonl ] || python -m agentc.runtime.onpolicy --agent $AGENT --episodes $N --round 1 --quant ${QUANT:-fp32} \
    --out $OUT/shared/onpolicy.jsonl --resume
for arm in $ARMS; do
    case $arm in
        plain) S=none C=0 ;;
        dagger) S=dagger C=0 ;;
        expert) S=expert C=0 ;;
        dagger_expert) S=dagger,expert C=0 ;;
        dagger_expert_curriculum) S=dagger,expert C=1 ;;
        *) echo "unknown arm $arm"; exit 1 ;;
    esac
    mkdir -p $OUT/$arm/r1
    for f in onpolicy.jsonl onpolicy.jsonl.stats.json onpolicy.jsonl.episodes.jsonl; do
        [ "$S" = none ] || [ -f $OUT/$arm/r1/$f ] || cp $OUT/shared/$f $OUT/$arm/r1/$f
    done
    D=$D AGENT=$AGENT OUT=$OUT/$arm ROUNDS=$ROUNDS N=$N SOURCES=$S CURRICULUM=$C EPISODES=0 bash runs/onpolicy.sh
    python infer.py --agent=$OUT/$arm/r$ROUNDS/model --eval --split test --episodes ${EVAL_EPISODES:-200} \
        --out $OUT/$arm/eval_r$ROUNDS.json > $OUT/$arm/eval_r$ROUNDS.log 2>&1
    tail -12 $OUT/$arm/eval_r$ROUNDS.log
done
