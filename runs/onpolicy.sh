#!/usr/bin/env bash
# Rounds of on-policy training: the compiled agent plays train tasks, the teacher takes over where
# it goes wrong (DAgger), its solved episodes are kept (expert iteration), and it trains on those
# mixed with a draw of the teacher's data, weighted to the families it fails (the curriculum).
#
#   bash runs/onpolicy.sh                          # two rounds on the quick start's agent
#   AGENT=out/sql_smol D=data/sql TOK=data/sql/smol.bpe.json SEQ=1024 LR=1e-4 bash runs/onpolicy.sh
#
# Round r: agentc.runtime.onpolicy (N episodes of the previous round's agent, fresh train tasks) ->
# agentc.data.mix (its SOURCES records + TEACHER_N of D/train.jsonl, drawn by the agent's failures
# per family when CURRICULUM=1) -> pack, audit -> train.py --init-from the previous agent, STEPS
# steps -> OUT/rR/model. SOURCES=none is the plain recipe: the same steps on teacher data only.
# The test split is touched once, by the final evaluation. Everything resumes: run it again.
# Figures: experiments/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-data/sql}                     # the teacher's data: train.jsonl, tok.model, val (runs/quickstart.sh)
AGENT=${AGENT:-out/sql_mini}         # the agent round 1 starts from
OUT=${OUT:-out/sql_onpolicy}
ROUNDS=${ROUNDS:-2}
N=${N:-600}                          # episodes played per round
TEACHER_N=${TEACHER_N:-1200}         # teacher records per round's mixture
SOURCES=${SOURCES:-dagger,expert}    # dagger, expert, dagger,expert or none
CURRICULUM=${CURRICULUM:-1}
TEMPERATURE=${TEMPERATURE:-0}
STEPS=${STEPS:-300}
LR=${LR:-1e-3}
TOK=${TOK:-$D/tok.model}
SEQ=${SEQ:-2048}
VAL=${VAL:-$D/val}
EPISODES=${EPISODES:-200}
[ -f $D/train.jsonl ] || { echo "no $D/train.jsonl: run runs/quickstart.sh (or its agentc.data.generate lines) first"; exit 1; }
prev=$AGENT
for r in $(seq 1 "$ROUNDS"); do
    R=$OUT/r$r
    mkdir -p "$R"
    mix=()
    if [ "$SOURCES" != none ]; then
        [ -f "$R/onpolicy.jsonl" ] || python -m agentc.runtime.onpolicy --agent "$prev" --episodes "$N" --round "$r" \
            --temperature "$TEMPERATURE" --out "$R/onpolicy.jsonl" --resume
        mix=(--onpolicy "$R/onpolicy.jsonl" --sources "$SOURCES")
        [ "$CURRICULUM" = 1 ] && mix+=(--curriculum "$R/onpolicy.jsonl.stats.json")
    fi
    python -m agentc.data.mix --out "$R/mix.jsonl" --teacher $D/train.jsonl --teacher-n "$TEACHER_N" --seed "$r" "${mix[@]}"
    python -m agentc.data.pack --quiet --tokenizer "$TOK" --seq-len "$SEQ" --system drop --out "$R/train" "$R/mix.jsonl"
    python -m agentc.data.audit --quiet "$R/train"
    python train.py --data="$R/train" --val-data="$VAL" --init-from="$prev" --batch-size=2 --max-steps="$STEPS" \
        --lr="$LR" --eval-every=0 --eval-batches=8 --eval-episodes=0 --save-every=0 --log-every=25 \
        --out="$R/model" --resume "$@"
    prev=$R/model
done
if [ "$EPISODES" -gt 0 ]; then
    python infer.py --agent="$prev" --eval --split test --episodes "$EPISODES"
fi
