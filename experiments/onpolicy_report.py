"""Gather the arms of experiments/onpolicy_levers.sh into one JSON and one plot.

    python experiments/onpolicy_report.py out/levers --base out/qs_full --name 2026-12-08-onpolicy-scratch

For each arm directory (ARM/rR/{onpolicy.jsonl.stats.json, mix.jsonl.stats.json, model/metrics.jsonl}
and ARM/eval_rR.json): test success overall, by wording and by family with 95% intervals, the
agent's success on its train tasks in each round's collection, where its failures left the
teacher's plan, the records kept, and the CPU seconds of each round (playing, labelling, training).
--base adds the starting agent's own evaluation (its eval_test_incremental.json). Writes
experiments/results/NAME.json and NAME.png (success with intervals per arm and round).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _read(path: str) -> dict | None:
    return json.load(open(path)) if os.path.exists(path) else None


def train_seconds(metrics: str) -> float | None:
    """The sum of the logged steps' times (tokens per step / tokens per second)."""
    if not os.path.exists(metrics):
        return None
    last, total = 0, 0.0
    for line in open(metrics):
        m = json.loads(line)
        if "train/tokens_per_s" in m:
            total += (m["train/tokens"] - last) / m["train/tokens_per_s"]
            last = m["train/tokens"]
    return round(total, 1)


def evaluation(s: dict) -> dict:
    keep = ("success", "by_wording", "by_family", "failures", "repeats")
    return {k: s[k] for k in keep if k in s} | {k: v for k, v in s.items() if k.startswith("pass^")}


def arm(path: str) -> dict:
    rounds = []
    for r in sorted(glob.glob(os.path.join(path, "r*")), key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)))):
        col = _read(os.path.join(r, "onpolicy.jsonl.stats.json"))
        mix = _read(os.path.join(r, "mix.jsonl.stats.json"))
        rounds.append({
            "round": os.path.basename(r),
            "collection": col and {k: col[k] for k in ("episodes", "success_rate", "records", "skipped", "departures",
                                                       "failures", "seconds", "by_family")},
            "mixture": mix and {k: mix[k] for k in ("onpolicy", "teacher", "curriculum_weights")},
            "train_seconds": train_seconds(os.path.join(r, "model", "metrics.jsonl")),
        })
    evals = {os.path.basename(p)[:-5]: evaluation(json.load(open(p)))
             for p in sorted(glob.glob(os.path.join(path, "eval_*.json")))}
    return {"rounds": rounds, "eval": evals}


def cpu_flags() -> list[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|amx[a-z_0-9]*)\b", text)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="experiments/onpolicy_levers.sh's OUT")
    ap.add_argument("--base", default=None, help="the starting agent's directory (its evaluation is the baseline)")
    ap.add_argument("--name", required=True, help="result name under experiments/results/")
    args = ap.parse_args()
    import torch
    arms = {os.path.basename(p): arm(p) for p in sorted(glob.glob(os.path.join(args.root, "*")))
            if os.path.isdir(p) and os.path.basename(p) != "shared"}
    out = {"root": args.root, "arms": arms,
           "machine": {"cpu_flags": cpu_flags(), "cores": os.cpu_count(), "python": platform.python_version(),
                       "torch": torch.__version__}}
    if args.base:
        from agentc.runtime.agent import resolve
        base = _read(os.path.join(resolve(args.base), "eval_test_incremental.json"))
        out["base"] = base and evaluation(base)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", args.name + ".json")
    json.dump(out, open(path, "w"), indent=1)
    print(f"wrote {path}")
    rows = ([("base", out["base"]["success"])] if out.get("base") else []) + \
        [(f"{a} {e.split('_')[-1]}", ev["success"]) for a, v in arms.items() for e, ev in v["eval"].items()]
    for name, s in rows:
        print(f"{name:36s} {100 * s['rate']:5.1f}%  [{100 * s['ci95'][0]:.0f}-{100 * s['ci95'][1]:.0f}]  n={s['n']}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    for i, (name, s) in enumerate(rows):
        ax.errorbar(100 * s["rate"], i, xerr=[[100 * (s["rate"] - s["ci95"][0])], [100 * (s["ci95"][1] - s["rate"])]],
                    fmt="o", capsize=3, color="k" if name == "base" else "C0")
    ax.set_yticks(range(len(rows)), [n for n, _ in rows])
    ax.set_xlabel("test success, % (95% Wilson interval)")
    ax.set_title(os.path.basename(args.name))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "results", args.name + ".png"), dpi=110)


if __name__ == "__main__":
    main()
