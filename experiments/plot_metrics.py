"""Plot train and validation loss of one or more train.py runs from their metrics.jsonl.

    python experiments/plot_metrics.py out/sql_tiny --out experiments/results/2026-12-05-sql-tiny-loss.png
    python experiments/plot_metrics.py out/a out/b          # several runs on one figure

Needs matplotlib (pip install matplotlib); W&B shows the same curves for runs logged there.
"""
from __future__ import annotations

import argparse
import json
import os


def read(run: str) -> tuple[list, list]:
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    train, val = [], []
    with open(path) as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:  # a line torn by a crash
                continue
            if "train/loss" in e:
                train.append((e["step"], e["train/loss"]))
            if "val/loss" in e:
                val.append((e["step"], e["val/loss"]))
    return train, val


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="train.py --out directories (or metrics.jsonl files)")
    ap.add_argument("--out", default="loss.png")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(args.runs):
        train, val = read(run)
        name, color = os.path.basename(os.path.normpath(run)), f"C{i}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.6, lw=1, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", ms=3, lw=1.5, label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (weighted CE, nats per trained token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(args.title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
