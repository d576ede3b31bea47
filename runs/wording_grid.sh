#!/usr/bin/env bash
# The whole wording study, one cell after another (on 2 cores never two at once): scratch and
# SmolLM2, rich and plain training wording, 15, 30 and 60 minutes, seed by seed, cheapest cells
# first. Each cell is runs/wording_study.sh, which skips a finished cell and resumes a killed one, so
# running this again continues the grid. About 6 hours a seed on a 2-core CPU (SmolLM2's 60-minute
# cells are 75 minutes with their evaluation).
#   bash runs/wording_grid.sh [SEED ...]        default: 1337 7 42
#   PHRASINGS=rich MINUTES="30 60" bash runs/wording_grid.sh 1337
set -euo pipefail
cd "$(dirname "$0")/.."
for SEED in ${@:-1337 7 42}; do
    for MIN in ${MINUTES:-15 30 60}; do
        for MODEL in scratch smollm2; do
            for PHRASING in ${PHRASINGS:-rich plain}; do
                bash runs/wording_study.sh $MODEL $PHRASING $MIN $SEED
            done
        done
    done
done
ls out/study/*/eval_test_incremental.json 2>/dev/null || true
