#!/usr/bin/env bash
# Rounds of on-policy training: the compiled agent plays train tasks, the teacher takes over where
# it goes wrong (DAgger), its solved episodes are kept (expert iteration), and it trains on those
# mixed with a draw of the teacher's data, weighted to the families it fails (the curriculum).
#
#   AGENT=out/sql_mini bash runs/onpolicy.sh       # two rounds on the quick start's agent
#   AGENT=out/sql_smol TOK=data/sql/smol.bpe.json SEQ=1024 VAL=data/sql/smol_val LR=1e-4 QUANT=int8 \
#       bash runs/onpolicy.sh                      # SmolLM2 (runs/smollm2_sql.sh)
#   AGENT=out/mix_smol D=data/mix_smol WORKFLOWS="sql files code shop support" \
#       TEACHER="$(ls data/mix_smol/train_*.jsonl)" ... bash runs/onpolicy.sh   # a mixture
#
# Round r: agentc.runtime.onpolicy (N episodes of the previous round's agent on fresh train tasks,
# per workflow of WORKFLOWS) -> agentc.data.mix (their SOURCES records + TEACHER_N teacher records,
# drawn by the agent's failures per family when CURRICULUM=1) -> pack, audit -> train.py
# --init-from the previous agent, STEPS steps -> OUT/rR/model. SOURCES=none is the plain recipe:
# the same steps on teacher data only. The test split is touched once, by the final evaluation.
# Everything resumes: run it again. Figures: experiments/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-data/sql}                     # the teacher's data and tokenizer (runs/quickstart.sh)
TEACHER=${TEACHER:-$D/train.jsonl}   # teacher trajectories (several files: space-separated)
AGENT=${AGENT:-out/sql_mini}         # the agent round 1 starts from
OUT=${OUT:-out/sql_onpolicy}
WORKFLOWS=${WORKFLOWS:-}             # a mixture agent's workflows to play (default: its first)
ROUNDS=${ROUNDS:-2}
N=${N:-600}                          # episodes played per round and workflow
TEACHER_N=${TEACHER_N:-1200}         # teacher records per round's mixture
SOURCES=${SOURCES:-dagger,expert}    # dagger, expert, dagger,expert or none
CURRICULUM=${CURRICULUM:-1}
TEMPERATURE=${TEMPERATURE:-0}
QUANT=${QUANT:-fp32}                 # decoding weights while playing (int8: faster on a CPU)
STEPS=${STEPS:-300}
LR=${LR:-1e-3}
TOK=${TOK:-$D/tok.model}
SEQ=${SEQ:-2048}
VAL=${VAL:-$D/val}
EPISODES=${EPISODES:-200}
for t in $TEACHER; do
    [ -f "$t" ] || { echo "no $t: run runs/quickstart.sh (or its agentc.data.generate lines) first"; exit 1; }
done
teacher=(); for t in $TEACHER; do teacher+=(--teacher "$t"); done
prev=$AGENT
for r in $(seq 1 "$ROUNDS"); do
    R=$OUT/r$r
    mkdir -p "$R"
    mix=()
    if [ "$SOURCES" != none ]; then
        mix=(--sources "$SOURCES")
        for wf in ${WORKFLOWS:-first}; do
            if [ "$wf" = first ]; then f=$R/onpolicy.jsonl; pick=(); else f=$R/onpolicy_$wf.jsonl; pick=(--workflow "$wf"); fi
            [ -f "$f" ] || python -m agentc.runtime.onpolicy --agent "$prev" "${pick[@]}" --episodes "$N" --round "$r" \
                --temperature "$TEMPERATURE" --quant "$QUANT" --out "$f" --resume
            mix+=(--onpolicy "$f")
            [ "$CURRICULUM" = 1 ] && mix+=(--curriculum "$f.stats.json")
        done
    fi
    python -m agentc.data.mix --out "$R/mix.jsonl" "${teacher[@]}" --teacher-n "$TEACHER_N" --seed "$r" "${mix[@]}"
    python -m agentc.data.pack --quiet --tokenizer "$TOK" --seq-len "$SEQ" --system drop --out "$R/train" "$R/mix.jsonl"
    python -m agentc.data.audit --quiet "$R/train"
    python train.py --data="$R/train" --val-data="$VAL" --init-from="$prev" --batch-size=2 --max-steps="$STEPS" \
        --lr="$LR" --eval-every=0 --eval-batches=8 --eval-episodes=0 --save-every=0 --log-every=25 \
        --out="$R/model" --resume "$@"
    prev=$R/model
done
if [ "$EPISODES" -gt 0 ]; then
    python infer.py --agent="$prev" --eval --split test --episodes "$EPISODES" ${WORKFLOWS:+--workflow all}
fi
