"""Held-out success against training tokens for several train.py runs, from what they left on disk.

Every checkpoint of a run (RUN/step_NNNNNN) that infer.py --eval has evaluated holds agent.json
(tokens seen, parameters) and eval_SPLIT_MODE.json (success rate, failures). This collects them
into one JSON (with the machine and versions) and one plot:

    python infer.py --agent out/sql_mini_s42/step_000850 --eval --episodes 200   # each point you want
    python experiments/compare_runs.py smollm2-120=out/sql_smol smollm2-240=out/sql_smol240 \\
        scratch-s1337=out/sql_mini scratch-s42=out/sql_mini_s42 --out experiments/results/2026-12-02-smollm2-vs-scratch
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform

import torch


def step_seconds(run_dir: str) -> dict[int, float]:
    """Seconds spent in optimizer steps up to each step (validation excluded), from RUN/metrics.jsonl."""
    steps = {}  # step -> (cumulative tokens, tokens/s); a resumed run repeats steps: the last record wins
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                m = json.loads(line)
                if "train/tokens_per_s" in m:
                    steps[m["step"]] = (m["train/tokens"], m["train/tokens_per_s"])
    out, total, prev_tokens = {}, 0.0, 0
    for step in sorted(steps):
        tokens, rate = steps[step]
        total += (tokens - prev_tokens) / rate
        out[step], prev_tokens = total, tokens
    return out


def points(run_dir: str, split: str, mode: str) -> list[dict]:
    out, seconds = [], step_seconds(run_dir)
    for step_dir in sorted(glob.glob(os.path.join(run_dir, "step_*"))):
        ev = os.path.join(step_dir, f"eval_{split}_{mode}.json")
        if not os.path.isfile(ev):
            continue
        with open(os.path.join(step_dir, "agent.json")) as f:
            summary = json.load(f).get("training", {})
        with open(ev) as f:
            e = json.load(f)
        out.append({"checkpoint": step_dir, "step": summary.get("step"), "tokens_seen": summary.get("tokens_seen"),
                    "parameters": summary.get("parameters"), "val_loss": summary.get("val/loss"),
                    # training compute by the usual 6 x parameters x tokens (all parameters counted)
                    "train_flops_6nd": 6 * summary["parameters"] * summary["tokens_seen"],
                    "train_seconds": round(seconds[summary["step"]], 1) if summary.get("step") in seconds else None,
                    "success_rate": e["success_rate"], "episodes": e["episodes"], "failures": e.get("failures"),
                    "decode_tokens_per_s": e.get("decode_tokens_per_s")})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (a train.py --out directory)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--mode", default="incremental")
    ap.add_argument("--out", required=True, help="prefix: writes PREFIX.json and PREFIX.png")
    args = ap.parse_args(argv)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "runs": {}}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not os.path.isdir(path):
            ap.error(f"{item!r}: expected LABEL=RUN_DIR with an existing directory")
        result["runs"][label] = points(path, args.split, args.mode)
        if not result["runs"][label]:
            ap.error(f"{path} has no evaluated checkpoint (eval_{args.split}_{args.mode}.json in a step_* directory)")
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in result["runs"].items():
        ax.plot([p["tokens_seen"] for p in pts], [100 * p["success_rate"] for p in pts], "o-",
                label=f"{label} ({pts[-1]['parameters'] / 1e6:.1f}M)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a log axis
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"held-out success (%), {args.split} split")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"{'run':<12} {'step':>6} {'tokens':>12} {'6ND FLOPs':>10} {'train s':>8} {'success':>8}  episodes")
    for label, pts in result["runs"].items():
        for p in pts:
            secs = f"{p['train_seconds']:.0f}" if p["train_seconds"] is not None else "?"
            print(f"{label:<12} {p['step']:>6} {p['tokens_seen']:>12,} {p['train_flops_6nd']:>10.2e} {secs:>8} "
                  f"{100 * p['success_rate']:>7.1f}%  {p['episodes']}")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
