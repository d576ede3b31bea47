#!/usr/bin/env bash
# Learning rate x model size (experiments/sweeps/lr_size.yaml) with W&B. Needs `wandb login` and
# the SQL shards (the data part of runs/quickstart.sh). Start more agents on other machines with
# the printed `wandb agent ...` line.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=$(wandb sweep --project agentc experiments/sweeps/lr_size.yaml 2>&1 | tee /dev/stderr |
        sed -n 's/.*wandb agent \(.*\)$/\1/p' | tail -1)
wandb agent "$SWEEP"
